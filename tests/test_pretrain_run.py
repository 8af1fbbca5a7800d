"""`finmerge pretrain` end to end: checkpoint, summary, perplexity, resume, refusals, DDP, merge."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from finmerge.pretrain.config import PretrainConfig, PretrainError
from finmerge.pretrain.packing import load_blocks
from pretrain_fixtures import accelerate_launch, finance_documents, finmerge, load_weights, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--seq-len", "64", "--learning-rate", "3e-3", "--eval-fraction", "0.1", "--num-threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """300 generated finance documents, plus one latin-1 file that must be skipped and counted."""
    folder = tmp_path_factory.mktemp("corpus")
    write_jsonl(str(folder / "part1.jsonl"), finance_documents(200, seed=0))
    write_jsonl(str(folder / "nested" / "part2.jsonl"), finance_documents(100, seed=1))
    with open(folder / "latin1.txt", "wb") as handle:
        handle.write("Caf\u00e9 revenue rose by ten percent this year.".encode("latin-1"))
    return str(folder)


@pytest.fixture(scope="module")
def trained(tiny_family, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "domain")
    args = ["pretrain", "--model", tiny_family.base, "--data", corpus, "--output", out, "--max-steps", "30",
            "--save-steps", "10", "--logging-steps", "5", *TRAIN_ARGS]
    result = finmerge(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "training_summary.json"), encoding="utf-8") as handle:
        return {"out": out, "args": args, "result": result, "summary": json.load(handle)}


def _perplexity(model_path, blocks):
    """Independent oracle: exp of the mean next-token cross-entropy over the blocks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    ids = blocks[:]["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))
    return math.exp(loss.item())


def test_run_writes_a_domain_checkpoint_that_transformers_loads(trained, tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = trained["out"], trained["summary"]
    assert "held-out perplexity" in trained["result"].stdout
    assert summary["steps"] == 30 and summary["tokens_seen"] == 30 * 4 * 64 and summary["world_size"] == 1
    # config.json is the base's (architectures included): Trainer's use_cache flip is undone
    with open(os.path.join(out, "config.json")) as a, open(os.path.join(tiny_family.base, "config.json")) as b:
        saved, base = json.load(a), json.load(b)
    assert saved == base and saved["architectures"] == ["LlamaForCausalLM"]
    with open(os.path.join(out, "tokenizer.json")) as a, open(os.path.join(tiny_family.base, "tokenizer.json")) as b:
        assert json.load(a) == json.load(b)
    assert not [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth"))]  # nothing pickled at top level
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"
    base_weights, weights = load_weights(tiny_family.base), load_weights(out)
    assert base_weights.keys() == weights.keys()
    assert all(weights[k].dtype == torch.float32 for k in weights)
    assert any(not torch.equal(base_weights[k], weights[k]) for k in weights)
    assert model.config.eos_token_id == base["eos_token_id"]


def test_heldout_perplexity_drops_and_matches_an_independent_computation(trained, tiny_family):
    out, summary = trained["out"], trained["summary"]
    blocks = load_blocks(os.path.join(out, "pretrain_data", "eval.arrow"))
    assert len(blocks) == summary["heldout_blocks"] > 0
    before, after = summary["heldout_before"]["perplexity"], summary["heldout_after"]["perplexity"]
    assert before == pytest.approx(_perplexity(tiny_family.base, blocks), rel=1e-4)
    assert after == pytest.approx(_perplexity(out, blocks), rel=1e-4)
    assert after < 0.5 * before
    # held-out text is not trained on: no held-out block occurs among the training blocks
    train = {tuple(b) for b in load_blocks(os.path.join(out, "pretrain_data", "train.arrow"))[:]["input_ids"].tolist()}
    assert not train & {tuple(b) for b in blocks[:]["input_ids"].tolist()}


def test_summary_reports_data_loss_curve_and_plot(trained):
    out, summary = trained["out"], trained["summary"]
    domain = summary["data"]["domain"]
    assert domain["documents_seen"] == 301 and domain["dropped"]["non_utf8"] == 1
    assert domain["documents_kept"] + sum(domain["dropped"].values()) == 301
    assert "latin1.txt (byte 3)" in domain["examples"]["non_utf8"][0]
    tokens = summary["data"]["tokens"]
    assert tokens["in_train_blocks"] == summary["data"]["blocks"]["train"] * 64
    assert tokens["domain_train"] == tokens["in_train_blocks"] + tokens["dropped_tail"]
    assert [p["step"] for p in summary["loss_curve"]] == [1, 5, 10, 15, 20, 25, 30]
    assert summary["loss_curve"][-1]["loss"] < summary["loss_curve"][0]["loss"] - 0.5
    with open(os.path.join(out, "loss_curve.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(os.path.join(out, "loss_curve.png")).shape[:2] == (400, 700)


def test_rerunning_a_finished_run_changes_nothing(trained):
    weights = os.path.join(trained["out"], "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    result = finmerge(*trained["args"])
    assert result.returncode == 0 and "already complete" in result.stdout, result.stderr[-2000:]
    assert os.stat(weights).st_mtime_ns == stamp


def test_output_holding_another_run_is_refused_untouched(trained, tiny_family, corpus, tmp_path):
    out = trained["out"]
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)}
    changed = [a if a != "3e-3" else "1e-3" for a in trained["args"]]
    result = finmerge(*changed)
    assert result.returncode == 1
    assert "holds a different run (learning_rate: 0.003 -> 0.001)" in result.stderr
    assert "Refusing to overwrite it" in result.stderr
    other = write_jsonl(str(tmp_path / "other.jsonl"), finance_documents(50, seed=9))
    result = finmerge(*[a if a != corpus else other for a in trained["args"]])
    assert result.returncode == 1 and "data contents differ" in result.stderr
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out)} == before


def test_non_empty_output_without_a_run_is_refused(tiny_family, corpus, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = finmerge("pretrain", "--model", tiny_family.base, "--data", corpus, "--output", str(out), "--max-steps", "2")
    assert result.returncode == 1 and "is not empty and holds no finmerge pretrain run" in result.stderr
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "precious"


def test_output_of_an_older_finmerge_is_refused_not_cleared(tiny_family, tmp_path):
    """A run.json without the ownership marker (an older finmerge's OUT) holds another run: refused, kept."""
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(40, seed=5))
    out = tmp_path / "old"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": "0" * 64, "settings": {"learning_rate": 1.0}}))
    (out / "model.safetensors").write_bytes(b"weights of the old run")
    with pytest.raises(PretrainError, match=r"holds a different run .*learning_rate"):
        _run_in_process(tiny_family.base, data, out)
    assert sorted(os.listdir(out)) == ["model.safetensors", "run.json"]
    assert (out / "model.safetensors").read_bytes() == b"weights of the old run"


def test_a_different_base_of_the_same_shape_does_not_resume(tiny_family, tmp_path):
    """The base is identified by the contents of its files: same names, sizes and shapes, other values -> refused."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_family.base, base)
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(40, seed=5))
    first = _run_in_process(str(base), data, tmp_path / "out", max_steps=1)
    assert first["status"] == "completed"
    weights = load_weights(str(base))
    size = os.path.getsize(base / "model.safetensors")
    save_file({k: v + 1.0 if v.is_floating_point() else v for k, v in weights.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    assert os.path.getsize(base / "model.safetensors") == size  # same shapes, same file size: only the values differ
    with pytest.raises(PretrainError, match=r"holds a different run .*base model contents differ"):
        _run_in_process(str(base), data, tmp_path / "out", max_steps=1)
    # the same base under another path is the same run
    shutil.copytree(tiny_family.base, tmp_path / "moved")
    assert _run_in_process(str(tmp_path / "moved"), data, tmp_path / "out", max_steps=1)["status"] == "already complete"


def test_saved_dtype_follows_a_bf16_hub_base(tmp_path):
    """`save_dtype: auto` for a hub model: the checkpoint's own dtype (bf16 here), not fp32."""
    from finmerge.demo.tiny_models import build_tiny_family

    family = build_tiny_family(str(tmp_path / "bf16"), instruct_steps=1, dtype=torch.bfloat16)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--finmerge-test--tiny-bf16"
    shutil.copytree(family.base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(40, seed=5))
    out = tmp_path / "out"
    result = finmerge("pretrain", "--model", "finmerge-test/tiny-bf16", "--data", data, "--output", str(out),
                      "--max-steps", "1", "--seq-len", "32", "--eval-fraction", "0", "--num-threads", "1",
                      env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert {w.dtype for w in load_weights(str(out)).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    run = json.loads((out / "run.json").read_text())
    assert [f["file"] for f in run["model"]] == ["model.safetensors", "config.json"]


# --- bad input, in process (fast) ---------------------------------------------------------------------

def _invoke(*args):
    from click.testing import CliRunner

    from finmerge.cli.pretrain import pretrain

    return CliRunner().invoke(pretrain, list(args))


def test_seq_len_beyond_the_model_maximum(tiny_family, corpus, tmp_path):
    result = _invoke("--model", tiny_family.base, "--data", corpus, "--output", str(tmp_path / "o"), "--seq-len", "256")
    assert result.exit_code == 1
    assert "--seq-len 256 is beyond the model's maximum" in result.output
    assert "max_position_embeddings=128" in result.output
    assert not (tmp_path / "o").exists()


def test_no_data_files(tiny_family, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("not a corpus")
    result = _invoke("--model", tiny_family.base, "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "o"))
    assert result.exit_code == 1 and "empty: no data files (.txt, .jsonl, .parquet)" in result.output


def test_corpus_empty_after_cleaning_names_the_filters(tiny_family, tmp_path):
    docs = ["tiny"] * 3 + ["a document long enough to keep"] * 4
    write_jsonl(str(tmp_path / "c.jsonl"), docs)
    with open(tmp_path / "bad.txt", "wb") as handle:
        handle.write(b"\xff\xfe not utf-8")
    result = _invoke("--model", tiny_family.base, "--data", str(tmp_path / "c.jsonl"), "--data", str(tmp_path / "bad.txt"),
                     "--output", str(tmp_path / "o"), "--seq-len", "64", "--min-chars", "10", "--eval-fraction", "0")
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "not enough training text" in message and "1 documents kept" in message
    assert "too_short: 3 (shorter than min_chars=10 after normalization; e.g." in message
    assert "exact_duplicate: 3" in message and "non_utf8: 1" in message and "bad.txt (byte 0)" in message
    assert not (tmp_path / "o").exists()  # a failed fresh run leaves nothing that would block the rerun
    result = _invoke("--model", tiny_family.base, "--data", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "o"),
                     "--min-chars", "100", "--seq-len", "64")
    assert result.exit_code == 1 and "no training text left" in result.output and "too_short: 7" in result.output


def test_model_with_custom_code_needs_the_flag(tiny_family, corpus, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(tiny_family.base, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="finmerge-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(config))
    result = _invoke("--model", str(model), "--data", corpus, "--output", str(tmp_path / "o"), "--seq-len", "64")
    assert result.exit_code == 1 and "ships its own code; rerun with --trust-remote-code" in result.output


# --- training options ----------------------------------------------------------------------------------

def _run_in_process(family_base, data, out, **overrides):
    from finmerge.pretrain.train import run_pretraining

    values = dict(model=family_base, data=[data], output_dir=str(out), seq_len=32, max_steps=3, per_device_train_batch_size=4,
                  learning_rate=3e-3, eval_fraction=0.0, num_threads=1, save_steps=100)
    values.update(overrides)
    return run_pretraining(PretrainConfig(**values))


def test_gradient_checkpointing_and_accumulation_reach_the_same_weights(tiny_family, tmp_path):
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(60, seed=4))
    _run_in_process(tiny_family.base, data, tmp_path / "plain")
    _run_in_process(tiny_family.base, data, tmp_path / "ckpt", activation_checkpointing=True)
    _run_in_process(tiny_family.base, data, tmp_path / "accum", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    plain, ckpt, accum = (load_weights(str(tmp_path / n)) for n in ("plain", "ckpt", "accum"))
    for key in plain:
        assert torch.allclose(plain[key], ckpt[key], atol=1e-6), key
        assert torch.allclose(plain[key], accum[key], atol=1e-5), key


def test_saved_dtype_follows_a_bf16_base(tmp_path):
    from finmerge.demo.tiny_models import build_tiny_family

    family = build_tiny_family(str(tmp_path / "bf16"), instruct_steps=1, dtype=torch.bfloat16)
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(40, seed=5))
    summary = _run_in_process(family.base, data, tmp_path / "out", max_steps=2)
    assert summary["precision"] == "fp32"  # no bf16 hardware here: fp32 compute ...
    weights = load_weights(str(tmp_path / "out"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # ... saved in the base's dtype
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_replay_mixes_general_text_at_the_ratio(tiny_family, tmp_path):
    data = write_jsonl(str(tmp_path / "domain.jsonl"), finance_documents(80, seed=6))
    general = tmp_path / "general"
    general.mkdir()
    rng = __import__("random").Random(0)
    words = ["weather", "river", "mild", "calm", "garden", "music", "train", "winter", "bread", "lamp", "story", "hill"]
    for i in range(200):  # distinct texts, so none is removed as a near-duplicate
        (general / f"{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(12)) + ".")
    summary = _run_in_process(tiny_family.base, data, tmp_path / "out", replay_data=[str(general)], replay_ratio=0.2,
                              max_steps=1)
    tokens = summary["data"]["tokens"]
    assert tokens["replay_share"] == pytest.approx(0.2, abs=0.01)
    replay = summary["data"]["replay"]
    assert replay["documents_kept"] + sum(replay["dropped"].values()) == 200
    assert summary["data"]["documents"]["replay_used"] < replay["documents_kept"]
    assert not summary["data"]["replay_exhausted"]
    # a replay corpus too small for the ratio is used up and flagged
    summary = _run_in_process(tiny_family.base, data, tmp_path / "out2", replay_data=[str(general / "000.txt")],
                              replay_ratio=0.2, max_steps=1)
    assert summary["data"]["replay_exhausted"] and summary["data"]["documents"]["replay_used"] == 1


# --- resume, scale-out, merge (slow) -------------------------------------------------------------------

def _pretrain_command(base, data, out, steps):
    return [os.path.join(os.path.dirname(sys.executable), "finmerge"), "pretrain", "--model", base, "--data", data,
            "--output", out, "--max-steps", str(steps), "--save-steps", "4", "--logging-steps", "1", *TRAIN_ARGS]


@pytest.fixture(scope="module")
def uninterrupted(tiny_family, corpus, tmp_path_factory):
    """The 40-step run, never stopped, by the installed command: what every interrupted-and-resumed run must equal."""
    whole = str(tmp_path_factory.mktemp("uninterrupted") / "whole")
    done = subprocess.run(_pretrain_command(tiny_family.base, corpus, whole, 40), env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return whole


def _paused_run(command, step, tmp_path, env, **popen):
    """The run started and held at the start of optimizer `step` by tests/pause_hook (every earlier checkpoint
    complete); returns (process, marker) once it is there. MARKER.go lets it go on."""
    marker = str(tmp_path / "paused")
    hook = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pause_hook")
    process = subprocess.Popen(command, env=dict(env, PYTHONPATH=hook, FINMERGE_TEST_PAUSE=f"step{step}:{marker}"), **popen)
    deadline = time.time() + 600
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None and os.path.exists(marker), f"the run did not reach step {step}"
    return process, marker


@pytest.mark.slow
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tiny_family, corpus, uninterrupted, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    whole, broken = uninterrupted, str(tmp_path / "broken")

    # killed at a known point: the start of step 14, checkpoint-12 complete (tests/pause_hook holds the run
    # there). Polling for a checkpoint file instead killed the run mid-save now and then, on a loaded machine.
    process, _ = _paused_run(_pretrain_command(tiny_family.base, corpus, broken, 40), 14, tmp_path, env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(broken, "training_summary.json"))

    resumed = subprocess.run(_pretrain_command(tiny_family.base, corpus, broken, 40), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed and completed: 40 steps" in resumed.stdout
    with open(os.path.join(broken, "training_summary.json")) as a, open(os.path.join(whole, "training_summary.json")) as b:
        resumed_summary, whole_summary = json.load(a), json.load(b)
    assert resumed_summary["resumed_from"].endswith("checkpoint-12")
    first, second = load_weights(whole), load_weights(broken)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key  # exact on CPU
    assert resumed_summary["loss_curve"] == whole_summary["loss_curve"]
    assert resumed_summary["tokens_seen"] == whole_summary["tokens_seen"] == 40 * 4 * 64
    assert resumed_summary["heldout_after"] == whole_summary["heldout_after"]
    assert len(os.listdir(os.path.join(broken, "checkpoints"))) <= 3


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_refuses_a_second_run_and_resumes_equal(tiny_family, corpus, uninterrupted, tmp_path):
    """A scheduler's stop: the run saves a checkpoint at the end of the step, exits 143; rerun = uninterrupted."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    whole, stopped = uninterrupted, str(tmp_path / "stopped")

    process, marker = _paused_run(_pretrain_command(tiny_family.base, corpus, stopped, 40), 5, tmp_path, env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = finmerge("pretrain", "--model", tiny_family.base, "--data", corpus, "--output", stopped,
                      "--max-steps", "40", *TRAIN_ARGS)
    assert second.returncode == 1 and f"another pretraining run (process {process.pid}) is writing" in second.stderr

    process.send_signal(signal.SIGTERM)
    open(marker + ".go", "w").close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 143, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(message) == 1 and "finmerge pretrain stopped by SIGTERM (exit status 143); training saved" in message[0]
    saved = int(message[0].split("(step ")[1].split(" ")[0])
    assert saved == 5 and os.path.isdir(os.path.join(stopped, "checkpoints", f"checkpoint-{saved}"))
    assert not os.path.exists(os.path.join(stopped, "training_summary.json"))
    assert not os.path.exists(os.path.join(str(tmp_path), ".stopped.lock"))

    resumed = subprocess.run(_pretrain_command(tiny_family.base, corpus, stopped, 40), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    with open(os.path.join(stopped, "training_summary.json")) as a, open(os.path.join(whole, "training_summary.json")) as b:
        resumed_summary, whole_summary = json.load(a), json.load(b)
    assert resumed_summary["resumed_from"] == f"checkpoint-{saved}"
    first_weights, second_weights = load_weights(whole), load_weights(stopped)
    assert first_weights.keys() == second_weights.keys()
    for key in first_weights:
        assert torch.equal(first_weights[key], second_weights[key]), key  # exact on CPU
    assert resumed_summary["loss_curve"] == whole_summary["loss_curve"]


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes(tiny_family, corpus, tmp_path):
    out = str(tmp_path / "ddp")
    command = [*accelerate_launch(os.path.join(ROOT, "recipes", "accelerate", "ddp-cpu.yaml")), "-m", "finmerge.cli.main",
               "pretrain", "--model", tiny_family.base, "--data", corpus, "--output", out, "--max-steps", "8", "--save-steps", "4", *TRAIN_ARGS]
    result = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "training_summary.json")) as handle:
        summary = json.load(handle)
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == 8 * 4 * 2 * 64  # both processes' blocks are counted
    assert summary["heldout_after"]["perplexity"] < summary["heldout_before"]["perplexity"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert os.path.isdir(os.path.join(out, "checkpoints", "checkpoint-8"))


@pytest.mark.slow
def test_domain_checkpoint_merges_with_the_domain_instruct_recipe(trained, tiny_family, tmp_path):
    import finmerge.plugins
    from finmerge.demo.tiny_models import TinyFamily, write_recipe

    finmerge.plugins.register()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    family = TinyFamily(base=tiny_family.base, instruct=tiny_family.instruct, domain=trained["out"])
    recipe = write_recipe(str(tmp_path / "recipe.yml"), family)
    with open(recipe) as handle:
        config = MergeConfiguration.model_validate(yaml.safe_load(handle))
    merged = str(tmp_path / "merged")
    run_merge(config, merged, options=MergeOptions(quiet=True))
    base, domain, instruct, result = (load_weights(p) for p in (family.base, family.domain, family.instruct, merged))
    for key in base:  # task arithmetic at weights 1/1: base + (domain - base) + (instruct - base)
        expected = domain[key] + instruct[key] - base[key]
        assert torch.allclose(result[key], expected, atol=1e-5), key
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(merged).config.architectures == ["LlamaForCausalLM"]


def test_pickled_only_base_needs_allow_pickle(tiny_family, tmp_path):
    from merge_helpers import pickled_copy

    model = pickled_copy(tiny_family.base, tmp_path / "pickled")
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(40, seed=5))
    with pytest.raises(PretrainError, match=r"no \*\.safetensors weights; .*--allow-pickle"):
        _run_in_process(str(model), data, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    summary = _run_in_process(str(model), data, tmp_path / "allowed", allow_pickle=True)
    assert summary["steps"] == 3
