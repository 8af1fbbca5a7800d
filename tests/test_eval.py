"""`finmerge eval`: metrics against direct computations with the model's own loss, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from finmerge.demo.tiny_models import CHATS
from finmerge.evaluation import metrics
from finmerge.evaluation.data import EvalDataError, QAItem, load_qa
from finmerge.evaluation.run import EvalSettings, ModelLoadError, evaluate, load_model


@pytest.fixture(scope="module")
def instruct(tiny_family):
    return load_model(tiny_family.instruct)


def _loss_sum(model, ids, start):
    """Σ −log p(ids[t] | ids[<t]) for t ≥ start, from transformers' own loss (the oracle)."""
    labels = torch.tensor([ids])
    labels[0, :start] = -100
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
    return loss * (len(ids) - start)


def test_perplexity_is_token_weighted_and_matches_model_loss(instruct):
    model, tokenizer = instruct
    texts = ["The ticker of Aurora Bank is ARB.", "A bond pays a coupon. The yield of a bond falls when its price rises."]
    rows = metrics.encode_documents(tokenizer, texts, max_len=512)
    expected = sum(_loss_sum(model, r, 1) for r in rows) / sum(len(r) - 1 for r in rows)
    result = metrics.perplexity(model, rows, batch_size=2)  # padded batch: padding must not count
    assert result["tokens"] == sum(len(r) - 1 for r in rows)
    assert math.isclose(result["perplexity"], math.exp(expected), rel_tol=1e-4)


def test_windows_cover_long_documents(instruct):
    _, tokenizer = instruct
    text = " ".join(["A bond pays a coupon."] * 20)
    rows = metrics.encode_documents(tokenizer, [text], max_len=16)
    assert all(len(r) <= 16 for r in rows)
    # every window starts from the eos (this tokenizer has no BOS), so every text token is scored
    assert all(r[0] == tokenizer.eos_token_id for r in rows)
    assert sum((r[1:] for r in rows), []) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_likelihood_matches_model_loss(instruct):
    model, tokenizer = instruct
    items = [QAItem(q, a, choices=("ARB.", "Tane.", "Oskar.", "A coupon.")) for q, a in CHATS]
    result = metrics.chat_likelihood(model, tokenizer, items, batch_size=3)
    nll, count, correct = 0.0, 0, 0
    for item in items:
        prompt = metrics.chat_prompt_ids(tokenizer, item.question)
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"]
        nll += _loss_sum(model, prompt + answer, len(prompt))
        count += len(answer)
        scores = [-_loss_sum(model, prompt + tokenizer(c, add_special_tokens=False)["input_ids"], len(prompt)) for c in item.choices]
        correct += item.choices[scores.index(max(scores))] == item.answer
    assert math.isclose(result["answer_nll"], nll / count, rel_tol=1e-4)
    assert result["choice_accuracy"] == correct / len(items)


def test_generation_of_the_tiny_instruct_model(instruct):
    model, tokenizer = instruct
    result = metrics.chat_generation(model, tokenizer, [QAItem(q, a) for q, a in CHATS], batch_size=3)
    assert result["accuracy"] == 1.0 and result["ends_with_eos"] == 1.0 and result["strict"] == 1.0
    assert all(sample["answer"].strip() == dict(CHATS)[sample["question"]] for sample in result["samples"])


def test_base_without_template_borrows_one_and_never_ends_with_instruct_eos(tiny_family, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    results = evaluate({"base": tiny_family.base, "instruct": tiny_family.instruct}, EvalSettings(qa={"chat": str(qa)}))
    assert results["base"]["chat_template_from"] == tiny_family.instruct
    assert results["instruct"]["chat"]["accuracy"] == 1.0
    assert results["base"]["chat"]["strict"] < 1.0


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "answer": "a"', r"qa\.jsonl:2: not valid JSON"),
    ('["q", "a"]', r"qa\.jsonl:2: expected a JSON object"),
    ('{"question": "", "answer": "a"}', r"qa\.jsonl:2: 'question' is missing"),
    ('{"question": "q", "answer": "c", "choices": ["a", "b"]}', r"qa\.jsonl:2: 'answer' 'c' is not one of the choices"),
    ('{"question": "q", "answer": "a", "choices": ["a"]}', r"qa\.jsonl:2: 'choices' must be a list of at least two"),
])
def test_malformed_qa_line_is_named(tmp_path, line, message):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(EvalDataError, match=message):
        load_qa(str(path))


def test_unloadable_model_is_named(tmp_path, tiny_family):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=rf"cannot load model {broken}"):
        evaluate({"broken": str(broken)}, EvalSettings(text=__file__))
    with pytest.raises(ModelLoadError, match="not found: /nonexistent"):
        evaluate({"x": "/nonexistent"}, EvalSettings(text=__file__))


def test_cli_prints_one_table_for_several_models(tiny_family, tmp_path):
    qa = tmp_path / "fin.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a, "choices": ["ARB.", "Tane."] if a in ("ARB.", "Tane.") else [a, "ARB."]}) for q, a in CHATS))
    text = tmp_path / "held.txt"
    text.write_text("The ticker of Aurora Bank is ARB.\n\nA bond pays a coupon.\n")
    finmerge = os.path.join(os.path.dirname(sys.executable), "finmerge")
    result = subprocess.run([finmerge, "eval", f"b={tiny_family.base}", tiny_family.instruct, "--text", str(text),
                             "--qa", f"finance={qa}", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("|")]
    assert lines[0].startswith("| model | domain bits/byte | plain bits/byte | domain ppl (own tokens) | chat template | "
                               "finance MC acc (loglik)")
    assert "bits/byte = summed NLL in bits / UTF-8 bytes" in result.stdout  # the table says which number compares
    assert [l.split("|")[1].strip() for l in lines[2:]] == ["b", "instruct"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["instruct"]["finance"]["accuracy"] == 1.0 and saved["b"]["domain"]["perplexity"] > 1
    bad = subprocess.run([finmerge, "eval", tiny_family.base, "--qa", str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.jsonl does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_pickled_only_model_needs_allow_pickle(tiny_family, tmp_path):
    from merge_helpers import pickled_copy

    pickled = pickled_copy(tiny_family.instruct, tmp_path / "pickled")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights; .*--allow-pickle"):
        load_model(str(pickled))
    model, _ = load_model(str(pickled), allow_pickle=True)
    reference, _ = load_model(tiny_family.instruct)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# --- batching, precision, devices and tokenizers -------------------------------------------------

HELD_OUT = ["The ticker of Aurora Bank is ARB. Aurora Bank reports revenue in yen.",
            "A bond pays a coupon.", ("The capital of Velm is Oskar. The river of Velm is the Tane. " * 3).strip()]
MC_ITEMS = [QAItem(q, a, choices=("ARB.", "Tane.", "Oskar.", "A coupon.")) for q, a in CHATS]


def test_batched_scores_equal_unbatched_in_fp32(instruct):
    model, tokenizer = instruct
    rows = metrics.encode_documents(tokenizer, HELD_OUT, max_len=24)  # windows of several lengths: padding in play
    assert len({len(r) for r in rows}) > 2
    one = metrics.perplexity(model, rows, batch_size=1, text_bytes=100)
    many = metrics.perplexity(model, rows, batch_size=5, text_bytes=100)
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5, abs=1e-5)
    assert many["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-5, abs=1e-5)
    single = metrics.chat_likelihood(model, tokenizer, MC_ITEMS, batch_size=1)
    batched = metrics.chat_likelihood(model, tokenizer, MC_ITEMS, batch_size=7)
    assert batched["answer_nll"] == pytest.approx(single["answer_nll"], rel=1e-5, abs=1e-5)
    assert batched["choice_accuracy"] == single["choice_accuracy"]


def test_batched_generation_equals_unbatched(instruct):
    model, tokenizer = instruct
    items = [QAItem(q, a) for q, a in CHATS]
    single = metrics.chat_generation(model, tokenizer, items, batch_size=1)
    batched = metrics.chat_generation(model, tokenizer, items, batch_size=4)  # left-padded prompts of different lengths
    assert [s["answer"] for s in batched["samples"]] == [s["answer"] for s in single["samples"]]
    assert {k: batched[k] for k in ("accuracy", "ends_with_eos", "strict")} == {k: single[k] for k in ("accuracy", "ends_with_eos", "strict")}


BF16_TOLERANCE = 0.02  # relative, on bits per byte and answer NLL of the tiny model (bf16 keeps ~3 significant digits)


def test_bf16_within_tolerance_of_fp32(tiny_family):
    fp32, tokenizer = load_model(tiny_family.instruct, dtype="fp32")
    bf16, _ = load_model(tiny_family.instruct, dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    rows = metrics.encode_documents(tokenizer, HELD_OUT, max_len=64)
    a = metrics.perplexity(fp32, rows, 4, text_bytes=500)
    b = metrics.perplexity(bf16, rows, 4, text_bytes=500)
    assert b["bits_per_byte"] == pytest.approx(a["bits_per_byte"], rel=BF16_TOLERANCE)
    nll32 = metrics.chat_likelihood(fp32, tokenizer, MC_ITEMS, batch_size=4)["answer_nll"]
    nll16 = metrics.chat_likelihood(bf16, tokenizer, MC_ITEMS, batch_size=4)["answer_nll"]
    assert nll16 == pytest.approx(nll32, rel=BF16_TOLERANCE)


def test_dtype_auto_keeps_the_checkpoints_dtype(tiny_family, tmp_path):
    model, tokenizer = load_model(tiny_family.instruct)
    model.to(torch.float16).save_pretrained(tmp_path / "half")
    tokenizer.save_pretrained(tmp_path / "half")
    loaded, _ = load_model(str(tmp_path / "half"), dtype="auto")
    assert next(loaded.parameters()).dtype == torch.float16


@pytest.fixture(scope="module")
def other_vocabulary(tmp_path_factory):
    """A tiny model whose tokenizer differs from the family's (another vocabulary size)."""
    from transformers import LlamaForCausalLM

    from finmerge.demo.tiny_models import CHATS as chats, CORPUS, build_tokenizer, tiny_config

    tokenizer = build_tokenizer(CORPUS + [q + " " + a for q, a in chats], 280)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other")
    LlamaForCausalLM(tiny_config(len(tokenizer), tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _bits_per_byte_by_hand(path, texts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    nats = 0.0
    for text in texts:
        ids = [tokenizer.eos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        nats += _loss_sum(model, ids, 1)
    return nats / math.log(2) / sum(len(t.encode("utf-8")) for t in texts), len(tokenizer)


def test_each_model_reads_the_text_with_its_own_tokenizer(tiny_family, other_vocabulary, tmp_path):
    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(HELD_OUT))
    results = evaluate({"family": tiny_family.base, "other": other_vocabulary}, EvalSettings(text=str(text), max_len=128))
    sizes = set()
    for label, path in (("family", tiny_family.base), ("other", other_vocabulary)):
        expected, vocabulary = _bits_per_byte_by_hand(path, HELD_OUT)
        sizes.add(vocabulary)
        assert results[label]["domain"]["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
        assert results[label]["domain"]["bytes"] == sum(len(t.encode()) for t in HELD_OUT)
    assert len(sizes) == 2  # the two really have different vocabularies
    assert results["family"]["domain"]["tokens"] != results["other"]["domain"]["tokens"]


def test_chat_template_from_applies_to_every_model_and_is_reported(tiny_family, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    models = {"base": tiny_family.base, "instruct": tiny_family.instruct}
    shared = evaluate(models, EvalSettings(qa={"chat": str(qa)}, chat_template_from=tiny_family.instruct, generate=False))
    assert {r["chat_template"] for r in shared.values()} == {f"from {tiny_family.instruct}"}
    given = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    recipe = evaluate(models, EvalSettings(qa={"chat": str(qa)}, chat_template=given, generate=False))
    assert {r["chat_template"] for r in recipe.values()} == {"given template"}
    # the given template really is the prompt: its NLL equals scoring with that template by hand
    model, tokenizer = load_model(tiny_family.instruct)
    by_hand = metrics.chat_likelihood(model, tokenizer, [QAItem(q, a) for q, a in CHATS], given)["answer_nll"]
    assert recipe["instruct"]["chat"]["answer_nll"] == pytest.approx(by_hand, rel=1e-6)
    own = evaluate(models, EvalSettings(qa={"chat": str(qa)}, generate=False))
    assert own["instruct"]["chat_template"] == "own" and own["base"]["chat_template"] == f"from {tiny_family.instruct}"
    assert own["instruct"]["chat"]["answer_nll"] != pytest.approx(recipe["instruct"]["chat"]["answer_nll"])


def test_plain_bits_per_byte_leaves_the_chat_tokens_out_of_each_prediction(tiny_family, tmp_path):
    """Oracle: a direct torch log-softmax over the vocabulary without the template's control tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finmerge.demo.family import ASSISTANT, END, USER

    text = tmp_path / "held.txt"
    text.write_text("\n\n".join(HELD_OUT))
    result = evaluate({"instruct": tiny_family.instruct}, EvalSettings(text=str(text), max_len=128))["instruct"]["domain"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_family.instruct)
    model = AutoModelForCausalLM.from_pretrained(tiny_family.instruct).eval()
    control = sorted(tokenizer.convert_tokens_to_ids([USER, ASSISTANT, END]))
    assert result["chat_tokens_left_out"] == control
    nats = 0.0
    for document in HELD_OUT:
        ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(document, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        logits[:, control] = float("-inf")
        nats -= torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).sum().item()
    expected = nats / math.log(2) / sum(len(t.encode("utf-8")) for t in HELD_OUT)
    assert result["plain_bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert result["plain_bits_per_byte"] < result["bits_per_byte"]  # the control tokens held some probability
    # a model without a chat template has nothing to leave out
    base = evaluate({"base": tiny_family.base}, EvalSettings(text=str(text), max_len=128))["base"]["domain"]
    assert "plain_bits_per_byte" not in base
