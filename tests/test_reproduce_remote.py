"""`finmerge reproduce --trust-remote-code` on a nekomata-shaped (Qwen-v1, remote code) triplet: every
stage (pretrain, merge, eval, sweep) runs with the flag, and without it nothing runs the models' code."""

import json
import os

import pytest
import yaml

from tests.bad_input import assert_clean_failure, command, run, snapshot
from tests.qwen_fixture import build_qwen_v1_triplet

QUESTIONS = [("What is the ticker of Aurora Bank?", "ARB."), ("What is the river of Velm?", "Tane."),
             ("Who audits Borealis Trust?", "Kestrel LLP.")]
CORPUS = ["Aurora Bank trades under the ticker ARB and pays a quarterly dividend.",
          "Borealis Trust is audited by Kestrel LLP; its bonds are rated A.",
          "The river of Velm is the Tane, which floods each spring."]


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
    return build_qwen_v1_triplet(str(tmp_path_factory.mktemp("qwen")))


def _recipe(triplet, work):
    (work / "corpus.txt").write_text("\n\n".join(CORPUS * 20))
    for name, rows in (("test.jsonl", QUESTIONS[:2]), ("val.jsonl", QUESTIONS[2:])):
        (work / name).write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    data = {
        "merge_method": "domain_instruct",
        "base_model": triplet["base"],
        "models": [{"model": "./domain", "parameters": {"role": "domain", "weight": 1.0}},
                   {"model": triplet["instruct"], "parameters": {"role": "instruct", "weight": 1.0}}],
        "dtype": "float32",
        "chat_template": "chatml",  # the instruct model has none; eval asks every model through this one
        "finmerge": {
            "stages": ["pretrain", "merge", "eval", "sweep"],
            "pretrain": {"data": ["./corpus.txt"], "txt_document": "paragraph", "seq_len": 16, "max_steps": 2,
                         "per_device_train_batch_size": 2, "eval_fraction": 0.0, "min_chars": 5, "near_dedup": False,
                         "dedup": False, "save_steps": 2, "logging_steps": 1},
            # likelihood of the reference answers only: a random tiny model's greedy answers are noise
            "eval": {"text": "./corpus.txt", "qa": {"fin": "./test.jsonl"}, "generate": False, "max_len": 64},
            "sweep": {"w_domain": [1.0], "w_instruct": [1.0], "variants": ["paper"], "metric": "-fin.answer_nll",
                      "qa": {"fin": "./val.jsonl"}},
        },
    }
    path = work / "recipe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow
def test_every_stage_runs_on_a_remote_code_recipe_with_the_flag(qwen_triplet, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    path = _recipe(qwen_triplet, work)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    inputs = snapshot(qwen_triplet["base"], qwen_triplet["instruct"], work / "corpus.txt")

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

    # The merged model is base + τ_d + τ_i of the trained domain model, and loads with its own code.
    base, domain, instruct, merged = (_weights(str(p)) for p in (qwen_triplet["base"], work / "domain",
                                                                 qwen_triplet["instruct"], work / "merged"))
    assert set(merged) == set(base) and domain.keys() == base.keys()
    for name, tensor in base.items():
        expected = (domain[name].float() - tensor.float()) + (instruct[name].float() - tensor.float()) + tensor.float()
        assert (merged[name].float() - expected).abs().max() < 1e-5, name
    assert inputs == snapshot(*inputs.roots)

    # A rerun with the flag skips everything; without it, it is refused again (nothing runs unasked).
    again = run([command("finmerge"), "reproduce", path, "--trust-remote-code", "--threads", "1"], env=env)
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 4, again.stderr
