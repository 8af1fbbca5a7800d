"""`finmerge reproduce --trust-remote-code` on a nekomata-shaped (Qwen-v1, remote code) triplet with the paper's
own settings: recipes/pretrain-nekomata-14b.yml for the pretrain stage (only steps, sequence length and batch
scaled down) and recipes/fin.yml's merge body (bf16, weights 1/1, its Alpaca-ja chat template); every stage
(pretrain, merge, eval with greedy generation, sweep) runs with the flag, and without it nothing runs the
models' code."""

import json
import os

import pytest
import torch
import yaml

from tests.bad_input import assert_clean_failure, command, run, snapshot
from tests.pretrain_fixtures import finance_documents
from tests.qwen_fixture import build_qwen_v1_triplet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CONFIG = os.path.join(ROOT, "recipes", "pretrain-nekomata-14b.yml")
FIN_RECIPE = os.path.join(ROOT, "recipes", "fin.yml")
# What a CPU test may shrink; everything else of the paper's pretrain config is used as written.
SCALED_DOWN = {"max_steps": 2, "seq_len": 32, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1}
QUESTIONS = [("What is the ticker of Aurora Bank?", "ARB."), ("What is the river of Velm?", "Tane."),
             ("Who audits Borealis Trust?", "Kestrel LLP.")]


def _weights(folder):
    """Every tensor of a checkpoint folder: through its index when sharded, else its one safetensors file."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


@pytest.fixture(scope="module")
def qwen_triplet(tmp_path_factory):
    return build_qwen_v1_triplet(str(tmp_path_factory.mktemp("qwen")), dtype=torch.bfloat16)  # nekomata is bf16


def paper_pretrain_settings():
    """recipes/pretrain-nekomata-14b.yml as a reproduce `pretrain:` section: the recipe supplies the model and
    output, the workdir the corpus at the config's own ./corpus/finance; sizes scaled down."""
    with open(PRETRAIN_CONFIG, encoding="utf-8") as handle:
        settings = yaml.safe_load(handle)
    for key in ("model", "output_dir"):
        settings.pop(key)
    assert "attn_implementation" not in settings  # transformers picks what the model supports
    assert settings["activation_checkpointing"] is True and settings["txt_document"] == "file"
    return {**settings, **SCALED_DOWN}


def _corpus(work):
    """One filing per .txt file (txt_document: file), each past the config's min_chars: 200."""
    folder = work / "corpus" / "finance"
    folder.mkdir(parents=True)
    for index, text in enumerate(finance_documents(40, seed=3, min_sentences=8, max_sentences=10)):
        assert len(text) >= 200
        (folder / f"filing-{index:02d}.txt").write_text(text, encoding="utf-8")
    (work / "heldout.txt").write_text("\n\n".join(finance_documents(5, seed=4)), encoding="utf-8")


def _recipe(triplet, work):
    _corpus(work)
    for name, rows in (("test.jsonl", QUESTIONS[:2]), ("val.jsonl", QUESTIONS[2:])):
        (work / name).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    with open(FIN_RECIPE, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)  # fin.yml's merge body: method, weights, dtype, chat template
    assert data["dtype"] == "bfloat16" and data["chat_template"].startswith("{%- set instruction_only")
    data["base_model"] = triplet["base"]
    for entry in data["models"]:
        entry["model"] = "./domain" if entry["parameters"]["role"] == "domain" else triplet["instruct"]
    data["finmerge"] = {
        "stages": ["pretrain", "merge", "eval", "sweep"],
        "pretrain": paper_pretrain_settings(),
        # greedy answers through the recipe's chat template (a random tiny model's answers are noise: the
        # test checks that generation runs, not what it says)
        "eval": {"text": "./heldout.txt", "qa": {"fin": "./test.jsonl"}, "generate": True, "max_new_tokens": 4,
                 "max_len": 64},
        "sweep": {"w_domain": [1.0], "w_instruct": [1.0], "variants": ["paper"], "metric": "-fin.answer_nll",
                  "qa": {"fin": "./val.jsonl"}},
    }
    path = work / "recipe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.slow
def test_every_stage_runs_on_a_remote_code_recipe_with_the_flag(qwen_triplet, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = _recipe(qwen_triplet, work)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    inputs = snapshot(qwen_triplet["base"], qwen_triplet["instruct"], work / "corpus")

    # Without the flag: refused before the base model's code is imported, nothing written.
    refused = run([command("finmerge"), "reproduce", path, "--threads", "1"], env=env)
    assert_clean_failure(refused, mentions=["--trust-remote-code"], before=inputs, outputs=[work / "domain", work / "merged"])
    assert not (tmp_path / "modules").exists() or not any((tmp_path / "modules").rglob("*.py"))

    result = run([command("finmerge"), "reproduce", path, "--trust-remote-code", "--threads", "1"], env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("pretrain", "merge", "eval", "sweep"):
        assert f"[{stage}] running" in result.stderr
    report = json.loads((work / "report.json").read_text())
    assert report["flags"] == {"trust_remote_code": True, "allow_pickle": False}
    assert "`--trust-remote-code`" in (work / "report.md").read_text()
    assert set(report["results"]) >= {"base", "domain", "instruct", "merged"}
    assert report["sweep"]["best"]["w_domain"] == 1.0 and report["pretrain"]["steps"] == 2
    summary = json.loads((work / "domain" / "training_summary.json").read_text())
    assert summary["config"]["activation_checkpointing"] is True and summary["precision"] == "fp32"  # CPU
    domain_config = json.loads((work / "domain" / "config.json").read_text())
    base_config = json.loads(open(os.path.join(qwen_triplet["base"], "config.json"), encoding="utf-8").read())
    assert domain_config["dtype"] == "bfloat16"  # save_dtype: auto = the base's
    assert [domain_config[k] for k in ("bf16", "fp16", "fp32", "use_flash_attn")] == \
        [base_config[k] for k in ("bf16", "fp16", "fp32", "use_flash_attn")]  # not what loading on a CPU picked
    generation = report["results"]["merged"]
    assert "accuracy" in json.dumps(generation)  # greedy generation ran on the remote-code models

    # The merged model is base + τ_d + τ_i of the trained domain model, and loads with its own code.
    base, domain, instruct, merged = (_weights(str(p)) for p in (qwen_triplet["base"], work / "domain",
                                                                 qwen_triplet["instruct"], work / "merged"))
    assert set(merged) == set(base) and domain.keys() == base.keys()
    for name, tensor in base.items():
        assert merged[name].dtype == torch.bfloat16
        expected = (domain[name].float() - tensor.float()) + (instruct[name].float() - tensor.float()) + tensor.float()
        assert torch.allclose(merged[name].float(), expected, rtol=2 ** -7, atol=1e-6), name  # one bf16 rounding
    assert inputs == snapshot(*inputs.roots)

    # A rerun with the flag skips everything; without it, it is refused again (nothing runs unasked).
    again = run([command("finmerge"), "reproduce", path, "--trust-remote-code", "--threads", "1"], env=env)
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 4, again.stderr
