"""`finmerge eval --fin-harness`: japanese-lm-fin-harness tasks from a miniature clone built here.

The clone has the real repository's layout (jlm_fin_eval/datasets/<task>/<script>.py + data,
jlm_fin_eval/tasks/<task>/<task>[-VERSION].yaml + utils.py) with a few synthetic questions. Checked:
every prompt lm-eval asks equals what the clone's own functions return, and the scores equal a
by-hand log-likelihood choice with the model's own forward pass.
"""

import importlib.util
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import lm_eval  # noqa: F401  (the `harness` extra is part of `make setup`: a broken install must fail, not skip)

from finmerge.evaluation.fin_harness import FinHarness, FinHarnessError

FP2 = [  # (question, choices, answer index)
    ("What is the ticker of Aurora Bank?", ["ARB.", "Tane.", "Oskar."], 0),
    ("What is the river of Velm?", ["ARB.", "Tane.", "Oskar."], 1),
    ("What is the capital of Velm?", ["ARB.", "Tane.", "Oskar.", "A coupon."], 2),
    ("What does a bond pay?", ["A coupon.", "Tane.", "ARB."], 0),
]
CHABSA = [  # (sentence, [(target, polarity)])
    ("Aurora Bank reports revenue in yen.", [("revenue", "positive"), ("yen", "neutral")]),
    ("The yield of a bond falls when its price rises.", [("yield", "negative"), ("price", "positive")]),
    ("The river of Velm is the Tane.", [("river", "negative")]),
]

SCRIPT = '''import json
import datasets


class FP2(datasets.GeneratorBasedBuilder):
    VERSION = datasets.Version("0.0.1")

    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({
            "id": datasets.Value("int32"), "question": datasets.Value("string"), "context": datasets.Value("string"),
            "choices": datasets.features.Sequence({"id": datasets.Value("int32"), "text": datasets.Value("string")}),
            "answer": datasets.Value("int32")}))

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TEST,
                                        gen_kwargs={"filepath": dl_manager.download("data.json"), "split": "test"})]

    def _generate_examples(self, filepath, split):
        with open(filepath, encoding="utf-8") as f:
            for row in json.load(f)["data"]:
                yield row["id"], {"id": row["id"], "question": row["question"], "context": row["context"],
                                  "choices": [{"id": c["id"], "text": c["text"]} for c in row["choices"]],
                                  "answer": row["answer"]}
'''
UTILS = '''def doc_to_text_00(doc):
    text = "Question: " + doc["question"] + "\\n"
    for choice_id, choice_text in zip(doc["choices"]["id"], doc["choices"]["text"]):
        text += str(choice_id + 1) + ": " + choice_text + "\\n"
    return text + "Answer:"


def doc_to_text_02_1(doc):
    return "Q: " + doc["question"] + " [" + ", ".join(doc["choices"]["text"]) + "]\\nA:"


def doc_to_target_01(doc):
    return doc["choices"]["text"][doc["answer"]]


def doc_to_choices_01(doc):
    return doc["choices"]["text"]
'''
CHABSA_SCRIPT = '''import glob, json, os
import datasets


class Chabsa(datasets.GeneratorBasedBuilder):
    def _info(self):
        return datasets.DatasetInfo(features=datasets.Features({
            "id": datasets.Value("int32"), "sentence": datasets.Value("string"),
            "target": datasets.Value("string"), "polarity": datasets.Value("string")}))

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=datasets.Split.TEST, gen_kwargs={"filepath": dl_manager.download_and_extract(
            "https://www.kaggle.com/api/v1/datasets/download/takahirokubo0/chabsa"), "split": "test"})]

    def _generate_examples(self, filepath, split):
        i = 0
        for data_file in sorted(glob.glob(os.path.join(filepath, "chABSA-dataset", "*.json"))):
            with open(data_file, encoding="utf-8") as f:
                for row in json.load(f)["sentences"]:
                    for opinion in row["opinions"]:
                        yield i, {"id": i, "sentence": row["sentence"], "target": opinion["target"], "polarity": opinion["polarity"]}
                        i += 1
'''
FP2_YAML = '''task: fp2
dataset_path: jlm_fin_eval/datasets/fp2/fp2.py
dataset_name: fp2
output_type: multiple_choice
test_split: test
description: "Choose the right answer.\\n\\n"
target_delimiter: " "
doc_to_text: !function utils.doc_to_text_00
doc_to_target: !function utils.doc_to_target_01
doc_to_choice: !function utils.doc_to_choices_01
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: map
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
'''
CHABSA_YAML = '''task: chabsa
dataset_path: jlm_fin_eval/datasets/chabsa/chabsa.py
dataset_name: chABSA
output_type: multiple_choice
test_split: test
description: "Sentiment of the target.\\n\\n"
doc_to_text: "Sentence: {{sentence}}\\nTarget: {{target}}\\nAnswer:"
doc_to_target: "{{polarity}}"
doc_to_choice:
  - "positive"
  - "negative"
metric_list:
  - metric: f1
    aggregation: 2class_adjusted_macro_f1_score_for_chabsa
    higher_is_better: true
metadata:
  version: 1.0
'''


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


@pytest.fixture
def clone(tmp_path):
    root = tmp_path / "japanese-lm-fin-harness"
    package = root / "jlm_fin_eval"
    data = {"data-name": "fp2", "data": [
        {"id": i, "question": q, "context": "", "choices": [{"id": j, "text": t} for j, t in enumerate(c)], "answer": a,
         "comment": ""} for i, (q, c, a) in enumerate(FP2)]}
    _write(str(package / "datasets/fp2/data.json"), json.dumps(data))
    _write(str(package / "datasets/fp2/fp2.py"), SCRIPT)
    _write(str(package / "datasets/fp2/__init__.py"), "")
    _write(str(package / "tasks/fp2/fp2.yaml"), FP2_YAML)
    _write(str(package / "tasks/fp2/fp2-1.0-0.2.1.yaml"),
           "include: fp2.yaml\ntask: fp2-1.0-0.2.1\ndescription: \"Pick one.\\n\\n\"\ndoc_to_text: !function utils.doc_to_text_02_1\n")
    _write(str(package / "tasks/fp2/utils.py"), UTILS)
    _write(str(package / "datasets/chabsa/chabsa.py"), CHABSA_SCRIPT)
    _write(str(package / "tasks/chabsa/chabsa.yaml"), CHABSA_YAML)
    _write(str(package / "tasks/chabsa/chabsa-1.0-0.2.1.yaml"), "include: chabsa.yaml\ntask: chabsa-1.0-0.2.1\n")
    archive = tmp_path / "chabsa.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("chABSA-dataset/e1.json", json.dumps({"sentences": [
            {"sentence": s, "opinions": [{"target": t, "polarity": p} for t, p in ops]} for s, ops in CHABSA]}))
    return str(root), str(archive)


def _clone_utils(root):
    spec = importlib.util.spec_from_file_location("clone_utils", os.path.join(root, "jlm_fin_eval/tasks/fp2/utils.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clone_docs(root):
    """The documents as datasets used to hand them to the clone's functions (choices as columns)."""
    with open(os.path.join(root, "jlm_fin_eval/datasets/fp2/data.json"), encoding="utf-8") as handle:
        rows = json.load(handle)["data"]
    return [{**r, "choices": {"id": [c["id"] for c in r["choices"]], "text": [c["text"] for c in r["choices"]]}} for r in rows]


@pytest.mark.parametrize("prompt,text_function", [("1.0-0.2.1", "doc_to_text_02_1"), ("default", "doc_to_text_00")])
def test_prompts_equal_the_clones_own_functions(clone, prompt, text_function):
    root, archive = clone
    harness = FinHarness(root, ["fp2", "chabsa"], prompt=prompt, chabsa_archive=archive)
    try:
        harness.prepare()
        utils = _clone_utils(root)
        docs = _clone_docs(root)
        rendered = harness.rendered("fp2")
        assert len(rendered) == len(docs) == len(FP2)
        for doc, got in zip(docs, rendered):
            assert got["text"] == getattr(utils, text_function)(doc)
            assert got["choices"] == utils.doc_to_choices_01(doc)
            assert got["target"] == utils.doc_to_target_01(doc)
        chabsa = harness.rendered("chabsa")
        expected = [(s, t, p) for s, ops in CHABSA for t, p in ops]
        assert [(r["text"], r["target"], r["choices"]) for r in chabsa] == [
            (f"Sentence: {s}\nTarget: {t}\nAnswer:", p, ["positive", "negative"]) for s, t, p in expected]
        assert not any(name.endswith((".json", ".py")) and not os.path.islink(os.path.join(d, name))
                       for d, _, names in os.walk(os.path.join(harness.workdir, "tasks")) for name in names)
    finally:
        harness.cleanup()


def _choice_scores(model, tokenizer, context, choices, delimiter):
    """Σ log p(choice tokens | context), tokenized as lm-eval's `hf` model does (no special tokens)."""
    scores = []
    for choice in choices:
        whole = tokenizer(context + delimiter + choice, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
        scores.append(sum(logprobs[t - 1, whole[t]].item() for t in range(start, len(whole))))
    return scores


def _macro_f1(golds, preds):
    scores = []
    for label in sorted(set(golds) | set(preds)):
        tp = sum(g == p == label for g, p in zip(golds, preds))
        fp = sum(p == label != g for g, p in zip(golds, preds))
        fn = sum(g == label != p for g, p in zip(golds, preds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def _by_hand(path, root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    utils = _clone_utils(root)
    correct = 0
    for doc in _clone_docs(root):
        scores = _choice_scores(model, tokenizer, "Pick one.\n\n" + utils.doc_to_text_02_1(doc), utils.doc_to_choices_01(doc), " ")
        correct += scores.index(max(scores)) == doc["answer"]
    golds, preds = [], []
    for sentence, opinions in CHABSA:
        for target, polarity in opinions:
            scores = _choice_scores(model, tokenizer, f"Sentiment of the target.\n\nSentence: {sentence}\nTarget: {target}\nAnswer:",
                                    ["positive", "negative"], " ")
            golds.append({"positive": 0, "negative": 1}.get(polarity, -100))
            preds.append(scores.index(max(scores)))
    return {"fp2": correct / len(FP2), "chabsa": _macro_f1(golds, preds) * 1.5}


@pytest.mark.slow
def test_cli_end_to_end_scores_equal_a_by_hand_loglikelihood_choice(clone, tiny_family, tmp_path):
    root, archive = clone
    finmerge = os.path.join(os.path.dirname(sys.executable), "finmerge")
    result = subprocess.run([finmerge, "eval", f"base={tiny_family.base}", f"instruct={tiny_family.instruct}",
                             "--fin-harness", root, "--fin-tasks", "fp2,chabsa", "--chabsa-archive", archive,
                             "--batch-size", "3", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert "fp2 acc" in header and "chabsa f1" in header and "fin avg (prompt 1.0-0.2.1)" in header
    saved = json.loads((tmp_path / "r.json").read_text())
    for label, path in (("base", tiny_family.base), ("instruct", tiny_family.instruct)):
        expected = _by_hand(path, root)
        fin = saved[label]["fin_harness"]
        assert fin["scores"]["fp2"] == pytest.approx(expected["fp2"])
        assert fin["scores"]["chabsa"] == pytest.approx(expected["chabsa"])
        assert fin["average"] == pytest.approx((expected["fp2"] + expected["chabsa"]) / 2)


def test_not_a_clone_and_unknown_prompt_are_named(clone, tmp_path):
    root, _ = clone
    with pytest.raises(FinHarnessError, match="is not a clone of pfnet-research/japanese-lm-fin-harness"):
        FinHarness(str(tmp_path))
    with pytest.raises(FinHarnessError, match=r"--fin-prompt 9\.9: the clone has no .*fp2-9\.9\.yaml"):
        FinHarness(root, ["fp2"], prompt="9.9")
    with pytest.raises(FinHarnessError, match="unknown task"):
        FinHarness(root, ["fp3"])
    harness = FinHarness(root, ["chabsa"])
    try:
        with pytest.raises(FinHarnessError, match=r"download https://www\.kaggle\.com/.*--chabsa-archive"):
            harness.prepare()
    finally:
        harness.cleanup()
