"""A disk that fills up while finmerge writes: one clean error naming the folder, the previous
output intact, nothing left that looks complete, and (pretrain) a rerun that resumes once there is space.

The disk is a real small tmpfs where the test can mount one, otherwise OSError(ENOSPC) injected at
the real write calls (tests/small_disk.py; the `disk` property of each test says which ran).
"""

import errno
import json
import os

import pytest
import yaml

import safetensors.torch
from bad_input import assert_clean_failure, invoke, looks_complete
from finmerge.demo.tiny_models import recipe
from pretrain_fixtures import finance_documents, write_jsonl
from finmerge.safety.disk import is_disk_full
from small_disk import small_disk  # noqa: F401  (fixture)


def _listing(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, dirs, names in os.walk(folder) for name in dirs + names)


# --- merge -----------------------------------------------------------------------------------------

def test_merge_into_a_full_disk_names_out_and_keeps_the_previous_out(tiny_family, tmp_path, small_disk, monkeypatch):
    disk = small_disk(96 << 10)  # the merged weights alone are 150 KiB
    disk.inject(monkeypatch, safetensors.torch, "save_file", lambda tensors, filename, *a, **k: filename)
    out = os.path.join(disk.folder, "merged")
    os.makedirs(out)
    with open(os.path.join(out, "previous.txt"), "w") as handle:
        handle.write("the previous merge")
    disk.full = True
    recipe_file = tmp_path / "recipe.yml"
    recipe_file.write_text(yaml.safe_dump(recipe(tiny_family)))

    result = invoke(["merge", str(recipe_file), out, "--overwrite"])

    message = assert_clean_failure(result, mentions=["no space left", out])
    assert "is as it was" in message
    assert _listing(disk.folder) == ["merged", "merged/previous.txt"], "scratch or lock left behind"
    with open(os.path.join(out, "previous.txt")) as handle:
        assert handle.read() == "the previous merge"


# --- pretrain --------------------------------------------------------------------------------------

def _pretrain_args(base, data, out, **options):
    values = {"max-steps": 2, "save-steps": 1, "seq-len": 32, "per-device-train-batch-size": 4,
              "learning-rate": "3e-3", "eval-fraction": 0, "num-threads": 1, "logging-steps": 1, **options}
    args = ["pretrain", "--model", base, "--data", data, "--output", out]
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def _fill_at(disk, when):
    """A Trainer callback that uses up the disk at the moment `when(event, state)` says."""
    from transformers import TrainerCallback

    class FillDisk(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if when("step_end", state):
                disk.fill()

        def on_train_end(self, args, state, control, **kwargs):
            if when("train_end", state):
                disk.fill()

    return FillDisk()


def _invoke_pretrain(args, monkeypatch, callback=None):
    """`finmerge pretrain` in this process, with an extra Trainer callback (the disk filler)."""
    import finmerge.pretrain.train as train

    if callback is not None:
        real = train.run_pretraining
        monkeypatch.setattr(train, "run_pretraining", lambda config, callbacks=None: real(config, [callback]))
    return invoke(args)


def _inject_trainer_writes(disk, monkeypatch):
    import torch
    import transformers.modeling_utils

    disk.inject(monkeypatch, transformers.modeling_utils, "safe_save_file", lambda tensors, filename, *a, **k: filename)
    disk.inject(monkeypatch, torch, "save", lambda obj, f, *a, **k: f if isinstance(f, (str, os.PathLike)) else None)


def test_pretrain_checkpoint_on_a_full_disk_stops_cleanly_and_resumes(tiny_family, tmp_path, small_disk, monkeypatch):
    disk = small_disk(4 << 20)
    _inject_trainer_writes(disk, monkeypatch)
    data = write_jsonl(str(tmp_path / "corpus.jsonl"), finance_documents(40, seed=5))
    out = os.path.join(disk.folder, "domain")
    args = _pretrain_args(tiny_family.base, data, out)

    # the disk fills after step 2, before checkpoint-2 is saved (checkpoint-1 is complete)
    result = _invoke_pretrain(args, monkeypatch, _fill_at(disk, lambda event, state: event == "step_end" and state.global_step == 2))

    message = assert_clean_failure(result, mentions=["no space left", out])
    assert "resumes" in message
    checkpoints = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert checkpoints == ["checkpoint-1"], "an incomplete checkpoint was left beside the complete one"
    from finmerge.pretrain.checkpoint import checkpoint_is_complete

    assert checkpoint_is_complete(os.path.join(out, "checkpoints", "checkpoint-1"))
    assert not looks_complete(out) and not os.path.exists(os.path.join(out, "training_summary.json"))

    disk.grow()
    monkeypatch.undo()
    resumed = invoke(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed and completed: 2 steps" in resumed.stdout
    with open(os.path.join(out, "training_summary.json")) as handle:
        assert json.load(handle)["resumed_from"] == "checkpoint-1"


def test_pretrain_final_save_on_a_full_disk_leaves_no_model_that_looks_complete(tiny_family, tmp_path, small_disk,
                                                                                monkeypatch):
    disk = small_disk(4 << 20)
    _inject_trainer_writes(disk, monkeypatch)
    data = write_jsonl(str(tmp_path / "corpus.jsonl"), finance_documents(40, seed=5))
    out = os.path.join(disk.folder, "domain")
    args = _pretrain_args(tiny_family.base, data, out, **{"max-steps": 1})

    # training and its checkpoints are done; the disk fills before the domain checkpoint goes into OUT
    result = _invoke_pretrain(args, monkeypatch, _fill_at(disk, lambda event, state: event == "train_end"))

    assert_clean_failure(result, mentions=["no space left", out], outputs=[out])
    assert not [name for name in os.listdir(out) if name.endswith((".safetensors", ".tmp"))]
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint-1"]

    disk.grow()
    monkeypatch.undo()
    resumed = invoke(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert looks_complete(out) and os.path.isfile(os.path.join(out, "training_summary.json"))


def test_prepared_data_on_a_full_disk_leaves_no_packed_corpus(tiny_family, tmp_path, small_disk, monkeypatch):
    from finmerge.pretrain.packing import BlockWriter

    disk = small_disk(16 << 10)  # room for the marker and run.json, not for ~30 KiB of packed blocks
    disk.inject(monkeypatch, BlockWriter, "_flush", lambda writer: writer.tmp)
    data = write_jsonl(str(tmp_path / "corpus.jsonl"), finance_documents(40, seed=5))
    out = os.path.join(disk.folder, "domain")
    disk.full = not disk.mounted  # a real tmpfs this small is full by itself

    result = invoke(_pretrain_args(tiny_family.base, data, out))

    assert_clean_failure(result, mentions=["no space left", out], outputs=[out])
    left = _listing(disk.folder)
    assert not [name for name in left if name.endswith((".arrow", ".tmp", "report.json"))], left


def test_packing_on_a_full_disk_leaves_no_block_file(tiny_family, tmp_path, small_disk, monkeypatch):
    """Whatever state OUT is in (a rerun keeps OUT), a failed packing leaves no train/eval file, whole or partial."""
    from transformers import AutoTokenizer

    from finmerge.pretrain.config import PretrainConfig
    from finmerge.pretrain.data import build_blocks
    from finmerge.pretrain.packing import BlockWriter
    from finmerge.pretrain.sources import resolve_sources

    disk = small_disk(16 << 10)
    disk.inject(monkeypatch, BlockWriter, "_flush", lambda writer: writer.tmp)
    data = write_jsonl(str(tmp_path / "corpus.jsonl"), finance_documents(40, seed=5))
    config = PretrainConfig(model=tiny_family.base, data=[data], output_dir=str(tmp_path / "unused"), seq_len=32,
                            eval_fraction=0.2)
    data_dir = os.path.join(disk.folder, "pretrain_data")
    disk.full = True

    with pytest.raises(Exception) as raised:
        build_blocks(config, AutoTokenizer.from_pretrained(tiny_family.base), resolve_sources([data]), [], data_dir)

    assert is_disk_full(raised.value, data_dir), raised.value
    assert os.listdir(data_dir) == []


# --- reports ---------------------------------------------------------------------------------------

def _fd_path(fd, *args, **kwargs):
    return os.readlink(f"/proc/self/fd/{fd}")  # the scratch file a report is written through


def _report(workdir, recipe_file, note):
    return {"workdir": workdir, "recipe": recipe_file, "merged": "merged", "results": {}, "plots": {}, "note": note}


def test_report_on_a_full_disk_keeps_the_previous_report(small_disk, monkeypatch):
    from finmerge.reproduce.report import write_report
    from finmerge.safety.disk import DiskFullError

    disk = small_disk(64 << 10)
    disk.inject(monkeypatch, os, "fdopen", _fd_path)
    folder = os.path.join(disk.folder, "run")
    os.makedirs(folder)
    paths = write_report(_report(folder, "recipe.yml", "the previous run"))
    before = {name: open(path).read() for name, path in paths.items()}
    disk.fill(leave=4096)

    with pytest.raises(DiskFullError, match="no space left") as raised:
        write_report(_report(folder, "recipe-2.yml", "x" * (256 << 10)))  # on the tmpfs report.md fits, report.json does not

    assert folder + os.sep in str(raised.value) and "unchanged" in str(raised.value)
    assert {name: open(path).read() for name, path in paths.items()} == before, "report.md and .json out of step"
    assert sorted(os.listdir(folder)) == ["report.json", "report.md"]


def test_sweep_results_on_a_full_disk_are_all_or_nothing(small_disk, monkeypatch):
    from finmerge.safety.disk import DiskFullError
    from finmerge.sweep import run as sweep_run

    disk = small_disk(64 << 10)
    disk.inject(monkeypatch, os, "fdopen", _fd_path)
    monkeypatch.setattr(sweep_run, "heatmap", lambda sweep, path: None)  # the plot is not the result
    monkeypatch.setattr(sweep_run, "sweep_markdown", lambda sweep: "# sweep")
    folder = os.path.join(disk.folder, "sweep")
    os.makedirs(folder)
    disk.fill(leave=4096)
    sweep = {"best": {"recipe": {"merge_method": "domain_instruct"}}, "rows": ["x" * 100] * 3000}

    with pytest.raises(DiskFullError, match="no space left") as raised:
        sweep_run.write_sweep(sweep, folder)

    assert folder + os.sep in str(raised.value)
    assert os.listdir(folder) == [], "a partial set of sweep results was left"


def test_disk_full_is_recognised_in_each_writer_s_own_words(tmp_path):
    """safetensors, torch.save and Python each say "disk full" differently."""
    from finmerge.safety.disk import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), str(tmp_path))
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"), str(tmp_path))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), str(tmp_path))
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                            str(tmp_path))  # torch's words, but this disk has room: not taken for a full disk
