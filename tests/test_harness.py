"""`finmerge eval --harness-tasks`: lm-evaluation-harness on a local task, checked against a
by-hand log-likelihood choice with the model's own loss."""

import json
import os
import subprocess
import sys

import lm_eval  # noqa: F401  (`make setup` installs the harness extra: a broken install fails here instead of skipping)
import pytest
import torch


QUESTIONS = [
    ("What is the ticker of Aurora Bank?", ["ARB.", "Tane.", "Oskar."], 0),
    ("What is the river of Velm?", ["ARB.", "Tane.", "Oskar."], 1),
    ("What is the capital of Velm?", ["ARB.", "Tane.", "Oskar."], 2),
    ("What does a bond pay?", ["A coupon.", "Tane.", "ARB."], 0),
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "label": l}) for q, c, l in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "fin_mc.yaml").write_text(
        "task: fin_mc_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\n"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path / "tasks")


def _by_hand_accuracy(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    correct = 0
    for question, choices, label in QUESTIONS:
        context = question + "\n"
        scores = []
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0, :-1].float(), -1)
            scores.append(sum(logprobs[t - 1, whole[t]].item() for t in range(start, len(whole))))
        correct += scores.index(max(scores)) == label
    return correct / len(QUESTIONS)


@pytest.mark.slow
def test_eval_cli_harness_accuracy_equals_a_by_hand_loglikelihood_choice(tiny_family, local_task, tmp_path):
    """The installed `finmerge eval --harness-tasks` (lm-eval through run_harness) on two models: a column per
    task, and each model's accuracy equal to a by-hand log-likelihood choice."""
    finmerge = os.path.join(os.path.dirname(sys.executable), "finmerge")
    result = subprocess.run([finmerge, "eval", tiny_family.base, tiny_family.instruct, "--harness-tasks", "fin_mc_local",
                             "--harness-include", local_task, "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "fin_mc_local acc" in result.stdout.splitlines()[0]
    saved = json.loads((tmp_path / "r.json").read_text())
    for name, path in (("base", tiny_family.base), ("instruct", tiny_family.instruct)):
        assert saved[name]["harness"]["fin_mc_local"]["acc"] == pytest.approx(_by_hand_accuracy(path)), name

