"""Input files that change or break while a run uses them: a shard cut short after the preflight
passed it, a shard cut short under mergekit's memory map, a model rewritten while the merge reads
it, a pretrain corpus edited between a killed run and its resume."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from bad_input import assert_clean_failure, invoke, snapshot
from finmerge.demo.tiny_models import recipe
from merge_helpers import copy_family
from pretrain_fixtures import finance_documents, write_jsonl

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def family(tiny_family, tmp_path):
    """A copy of the tiny family that the test may break."""
    return copy_family(tiny_family, tmp_path / "family")


@pytest.fixture
def previous_out(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "previous.txt").write_text("the previous merge")
    return str(out)


def _recipe_file(tmp_path, family) -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe(family)))
    return str(path)


def _assert_out_untouched(out):
    assert sorted(os.listdir(out)) == ["previous.txt"]
    assert open(os.path.join(out, "previous.txt")).read() == "the previous merge"
    parent = os.path.dirname(out)
    assert not [n for n in os.listdir(parent) if n.startswith(".merged.partial")], os.listdir(parent)


def _rewritten(path: str) -> bytes:
    """The same safetensors file (same names, shapes, dtypes: same size) with every value changed."""
    from safetensors.torch import load_file, save

    return save({k: v + 1 for k, v in load_file(path).items()}, metadata={"format": "pt"})


def _after_first_tensor(monkeypatch, action):
    """Run `action` once, right after mergekit has read its first tensor (its loaders are open)."""
    import mergekit.io.lazy_tensor_loader as loader

    real, done = loader.LazyTensorLoader.get_tensor, []

    def get_tensor(self, *args, **kwargs):
        tensor = real(self, *args, **kwargs)
        if not done:
            done.append(True)
            action()
        return tensor

    monkeypatch.setattr(loader.LazyTensorLoader, "get_tensor", get_tensor)
    return done


def test_shard_cut_short_after_the_preflight_is_named(family, tmp_path, previous_out, monkeypatch):
    """Header valid, data ends early: safetensors refuses it when mergekit opens it; the user gets the file."""
    import finmerge.plugins.run as run

    shard = os.path.join(family.domain, "model.safetensors")
    checked = run.preflight

    def preflight_then_truncate(*args, **kwargs):
        inputs = checked(*args, **kwargs)
        os.truncate(shard, os.path.getsize(shard) - 1000)  # the header still parses: the last tensor is short
        return inputs

    monkeypatch.setattr(run, "preflight", preflight_then_truncate)
    result = invoke(["merge", _recipe_file(tmp_path, family), previous_out, "--overwrite"])

    message = assert_clean_failure(result, mentions=[shard, "passed the check before the merge", "cut short"])
    assert "Nothing was written to the output folder" in message
    _assert_out_untouched(previous_out)


@pytest.mark.parametrize("how", ["replaced", "rewritten_in_place"])
def test_model_rewritten_while_the_merge_reads_it_is_refused(family, tmp_path, previous_out, monkeypatch, how):
    """A save over the model while mergekit reads it could mix two versions in one merge: refused, OUT kept."""
    shard = os.path.join(family.domain, "model.safetensors")
    new_bytes = _rewritten(shard)
    assert len(new_bytes) == os.path.getsize(shard)

    def rewrite():
        if how == "replaced":  # how safetensors/transformers save: a new file under the same name
            with open(shard + ".new", "wb") as handle:
                handle.write(new_bytes)
            os.replace(shard + ".new", shard)
        else:  # same file, same size, other bytes (cp over it, an in-place writer)
            with open(shard, "r+b") as handle:
                handle.write(new_bytes)

    done = _after_first_tensor(monkeypatch, rewrite)
    result = invoke(["merge", _recipe_file(tmp_path, family), previous_out, "--overwrite"])

    assert done, "the merge read no tensor through mergekit's loader"
    message = assert_clean_failure(result, mentions=[shard, "changed while the merge was reading it"])
    assert ("replaced by another file" if how == "replaced" else "rewritten") in message
    _assert_out_untouched(previous_out)


SIGBUS_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import mergekit.io.lazy_tensor_loader as loader
    from finmerge.demo.tiny_models import TinyFamily, recipe
    from merge_helpers import run_merge

    family = TinyFamily(*{family!r})
    shard = os.path.join(family.domain, "model.safetensors")
    real = loader.LazyTensorLoader.get_tensor
    reads = []

    def get_tensor(self, key, *args, **kwargs):
        reads.append(key)
        if len(reads) == 2:  # mergekit has the domain shard mapped by now: cut away most of its data
            os.truncate(shard, 4096)
        return real(self, key, *args, **kwargs)

    loader.LazyTensorLoader.get_tensor = get_tensor
    os.environ["FINMERGE_OVERWRITE"] = "1"
    run_merge(recipe(family), {out!r})
""")


def test_shard_cut_short_under_the_memory_map_kills_the_merge_but_not_out(family, tmp_path, previous_out):
    """What cannot be caught: mergekit memory-maps shards, and reading a page cut off the file is SIGBUS.

    Pinned so the docs stay true: the process dies (no message), OUT keeps the previous merge, and
    the next merge into OUT names the scratch folder the dead one left."""
    script = SIGBUS_SCRIPT.format(tests=TESTS, family=(family.base, family.instruct, family.domain), out=previous_out)
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert died.returncode == -signal.SIGBUS, died.stderr[-2000:]
    assert sorted(os.listdir(previous_out)) == ["previous.txt"]
    left = [n for n in os.listdir(tmp_path) if n.startswith(".merged.partial-")]
    assert len(left) == 1, os.listdir(tmp_path)

    shutil.copy(os.path.join(tmp_path, "family", "base", "model.safetensors"), os.path.join(family.domain, "model.safetensors"))
    again = invoke(["merge", _recipe_file(tmp_path, family), previous_out, "--overwrite", "--remove-stale"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert left[0] in again.stderr and not os.path.exists(tmp_path / left[0])


# --- pretrain ---------------------------------------------------------------------------------------

class Killed(Exception):
    """Stands for a kill right after a checkpoint was saved (the state a SIGKILL leaves)."""


def _pretrain(base, data, out):
    return ["pretrain", "--model", base, "--data", data, "--output", out, "--max-steps", "2", "--save-steps", "1",
            "--seq-len", "32", "--per-device-train-batch-size", "4", "--eval-fraction", "0", "--num-threads", "1"]


@pytest.mark.parametrize("change", ["edited", "added"])
def test_corpus_changed_between_a_kill_and_the_resume_is_refused_naming_the_file(tiny_family, tmp_path, monkeypatch,
                                                                                 change):
    import finmerge.pretrain.train as train
    from transformers import TrainerCallback

    corpus = tmp_path / "corpus"
    first = write_jsonl(str(corpus / "a.jsonl"), finance_documents(30, seed=1))
    write_jsonl(str(corpus / "b.jsonl"), finance_documents(30, seed=2))
    out = str(tmp_path / "domain")

    class KillAfterFirstCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise Killed("killed after checkpoint-1")

    real = train.run_pretraining
    monkeypatch.setattr(train, "run_pretraining", lambda config, callbacks=None: real(config, [KillAfterFirstCheckpoint()]))
    killed = invoke(_pretrain(tiny_family.base, str(corpus), out))
    monkeypatch.undo()
    assert killed.returncode != 0 and os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint-1"], killed.stderr

    original = open(first, encoding="utf-8").read()
    if change == "edited":
        changed = first
        with open(first, "a", encoding="utf-8") as handle:
            handle.write('{"text": "Report 999. A late correction to the corpus."}\n')
    else:
        changed = write_jsonl(str(corpus / "c.jsonl"), finance_documents(5, seed=3))
    before = snapshot(out)

    result = invoke(_pretrain(tiny_family.base, str(corpus), out))

    message = assert_clean_failure(result, mentions=[changed, out], before=before)
    assert ("changed since the run started" if change == "edited" else "was not in the run") in message

    # the corpus put back: the run resumes from its checkpoint
    if change == "edited":
        with open(first, "w", encoding="utf-8") as handle:
            handle.write(original)
    else:
        os.remove(changed)
    resumed = invoke(_pretrain(tiny_family.base, str(corpus), out))
    assert resumed.returncode == 0 and "resumed and completed: 2 steps" in resumed.stdout, resumed.stderr[-2000:]
