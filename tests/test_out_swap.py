"""OUT is replaced safely: never an input, old OUT back on any failure, one merge at a time per OUT,
scratch folders of killed merges reported (and removed only when asked, only if theirs)."""

import fcntl
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from finmerge.demo.tiny_models import recipe
from finmerge.safety.errors import InputError
from merge_helpers import copy_family, expected_merge, run_merge, tensors


@pytest.fixture
def family_copy(tiny_family, tmp_path):
    """The tiny family copied, so a test that (wrongly) replaces an input cannot harm the session's."""
    return copy_family(tiny_family, tmp_path / "family")


def _digest(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("where", ["instruct", "domain", "base", "inside_domain", "parent_of_instruct", "tokenizer"])
def test_overwrite_never_replaces_an_input(family_copy, tmp_path, monkeypatch, where):
    merge = recipe(family_copy)
    if where == "tokenizer":  # a tokenizer source is an input too
        source = str(tmp_path / "tokenizer-source")
        shutil.copytree(family_copy.instruct, source)
        merge["tokenizer"] = {"source": source}
        out = source
    elif where == "inside_domain":
        out = os.path.join(family_copy.domain, "merged")
    elif where == "parent_of_instruct":
        out = os.path.dirname(family_copy.instruct)
    else:
        out = getattr(family_copy, where)
    roots = [family_copy.base, family_copy.domain, family_copy.instruct] + ([out] if where == "tokenizer" else [])
    before = {root: _digest(root) for root in roots}
    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    with pytest.raises(InputError, match=r"an input is never written or replaced"):
        run_merge(merge, out)
    assert {root: _digest(root) for root in roots} == before
    assert not os.path.exists(os.path.join(family_copy.domain, "merged"))


def test_failed_second_rename_restores_the_old_out(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the previous merge")
    real_rename, calls = os.rename, []

    def rename(source, target):
        calls.append((str(source), str(target)))
        moved_aside = any(t.endswith(".old") and s == str(out) for s, t in calls)
        if str(target) == str(out) and moved_aside and not str(source).endswith(".old"):
            raise OSError("disk full (simulated)")  # OUT moved aside, the new merge not yet in place
        return real_rename(source, target)

    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        run_merge(recipe(tiny_family), out)
    monkeypatch.undo()
    assert any(s == str(out) and t.endswith(".old") for s, t in calls), calls
    assert sorted(os.listdir(out)) == ["previous.txt"] and (out / "previous.txt").read_text() == "the previous merge"
    assert sorted(os.listdir(tmp_path)) == ["out"], "scratch or moved-aside folders left behind"


def test_successful_overwrite_leaves_only_out(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    run_merge(recipe(tiny_family), out)
    merged, expected = tensors(out), expected_merge(tiny_family)
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_second_merge_into_the_same_out_is_refused_naming_the_other_process(tiny_family, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
         "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
         "print('locked', flush=True); time.sleep(60)", str(tmp_path / ".out.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=rf"another merge \(process {holder.pid}\) is writing .*out"):
            run_merge(recipe(tiny_family), out)
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    run_merge(recipe(tiny_family), out)  # the lock went with its process
    assert (out / "model.safetensors").exists()


def test_the_lock_is_held_during_the_merge_and_released_after(tiny_family, tmp_path, monkeypatch):
    import finmerge.plugins.run as run_module

    seen = []
    original = run_module.finish_instruct_output

    def probe(*args, **kwargs):
        with open(tmp_path / ".out.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append("held")
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "finish_instruct_output", probe)
    run_merge(recipe(tiny_family), tmp_path / "out")
    assert seen == ["held"]
    assert sorted(os.listdir(tmp_path)) == ["out"], "lock file left behind"


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_scratch_is_reported_and_removed_only_when_asked(tiny_family, tmp_path, monkeypatch, capsys):
    dead = _dead_pid()
    stale = [tmp_path / f".out.partial-{dead}", tmp_path / f".out.partial-{dead}.old"]
    alive = tmp_path / ".out.partial-1"  # pid 1 is always running: never touched
    foreign = [tmp_path / f".other.partial-{dead}", tmp_path / ".out.partial-x", tmp_path / f"out.partial-{dead}"]
    for folder in stale + [alive] + foreign:
        folder.mkdir()
        (folder / "model.safetensors").write_text("half written")
    (tmp_path / "out").mkdir()  # killed after the swap, before removing `.old`: OUT is there
    run_merge(recipe(tiny_family), tmp_path / "out")
    message = capsys.readouterr().err
    for folder in stale:
        assert folder.name in message and folder.exists()
    assert "--remove-stale" in message and "FINMERGE_REMOVE_STALE=1" in message
    named = lambda folder: re.search(re.escape(str(folder)) + r"(?=[, ])", message)  # noqa: E731
    assert all(named(folder) for folder in stale)
    assert not named(alive) and not any(named(folder) for folder in foreign)

    monkeypatch.setenv("FINMERGE_REMOVE_STALE", "1")
    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    run_merge(recipe(tiny_family), tmp_path / "out")
    assert not any(folder.exists() for folder in stale)
    assert alive.exists() and all(folder.exists() for folder in foreign)


def test_moved_aside_out_is_never_removed_when_out_is_missing(tiny_family, tmp_path, monkeypatch, capsys):
    """A kill between the two renames leaves the previous OUT only in `.OUT.partial-PID.old`."""
    dead = _dead_pid()
    previous = tmp_path / f".out.partial-{dead}.old"
    previous.mkdir()
    (previous / "model.safetensors").write_text("the only copy of the previous merge")
    monkeypatch.setenv("FINMERGE_REMOVE_STALE", "1")
    run_merge(recipe(tiny_family), tmp_path / "elsewhere")  # another OUT: nothing to report
    assert previous.name not in capsys.readouterr().err
    with pytest.raises(InputError, match=rf"{previous.name} holds the previous"):
        run_merge(recipe(tiny_family), tmp_path / "out")
    assert (previous / "model.safetensors").exists()
