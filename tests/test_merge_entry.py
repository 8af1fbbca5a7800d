"""One merge entry: finmerge's commands pass their flags as MergeFlags; FINMERGE_* variables are read
only by the adapter that plain mergekit-yaml goes through."""

import os
import re

import pytest

from finmerge.demo.tiny_models import recipe
from finmerge.plugins.run import MergeFlags, merge
from merge_helpers import tensors

PACKAGE_DIRS = ("plugins", "diagnostics", "pretrain", "cli", "demo", "evaluation", "sweep", "reproduce", "safety")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(merge_dict):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(merge_dict)


def _options():
    from mergekit.options import MergeOptions

    return MergeOptions(quiet=True)


def test_flags_from_the_environment():
    assert MergeFlags.from_environment({}) == MergeFlags()
    flags = MergeFlags.from_environment({"FINMERGE_OVERWRITE": "1", "FINMERGE_ALLOW_PICKLE": "true",
                                         "FINMERGE_REMOVE_STALE": "yes", "FINMERGE_NO_DIAGNOSTICS": "1"})
    assert flags == MergeFlags(overwrite=True, allow_pickle=True, remove_stale=True, diagnostics=False)
    assert MergeFlags.from_environment({"FINMERGE_OVERWRITE": "0"}).overwrite is False


def test_merge_entry_ignores_the_environment(tiny_family, tmp_path, monkeypatch):
    """A command's own flags decide, whatever the shell has set."""
    monkeypatch.setenv("FINMERGE_NO_DIAGNOSTICS", "1")
    merge(_config(recipe(tiny_family)), str(tmp_path / "with"), _options(), MergeFlags())
    assert (tmp_path / "with" / "diagnostics.json").is_file()
    monkeypatch.delenv("FINMERGE_NO_DIAGNOSTICS")
    merge(_config(recipe(tiny_family)), str(tmp_path / "without"), _options(), MergeFlags(diagnostics=False))
    assert not (tmp_path / "without" / "diagnostics.json").exists()
    a, b = tensors(tmp_path / "with"), tensors(tmp_path / "without")
    assert all((a[k] == b[k]).all() for k in a)


def test_other_methods_go_to_mergekit_untouched(tiny_family, tmp_path):
    ta = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": tiny_family.base,
          "models": [{"model": tiny_family.domain, "parameters": {"weight": 1.0}},
                     {"model": tiny_family.instruct, "parameters": {"weight": 1.0}}]}
    merge(_config(ta), str(tmp_path / "ta"), _options(), MergeFlags(overwrite=True))
    assert not (tmp_path / "ta" / "diagnostics.json").exists()  # no finmerge output fix-up
    merge(_config(recipe(tiny_family)), str(tmp_path / "ours"), _options())
    got, ours = tensors(tmp_path / "ta"), tensors(tmp_path / "ours")
    for name in got:
        assert (got[name] - ours[name]).abs().max() <= 1e-6


def _sources():
    for folder in PACKAGE_DIRS:
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(base, name)
                    yield os.path.relpath(path, ROOT), open(path, encoding="utf-8").read()


def test_finmerge_variables_are_read_in_one_place():
    """Only MergeFlags.from_environment reads them (reproduce/stages.py keys a stage on the one that
    changes what its mergekit-yaml child writes)."""
    readers = {path for path, text in _sources()
               if re.search(r"environ(\.get)?\s*[\[(]\s*[\"']FINMERGE_(OVERWRITE|ALLOW_PICKLE|REMOVE_STALE|NO_DIAGNOSTICS)", text)}
    assert readers <= {"plugins/run.py", "reproduce/stages.py"}, readers


def test_no_command_changes_the_environment():
    """Flags travel as arguments (a child process gets its own environment). Only a default the user
    did not set may be filled in (OMP_WAIT_POLICY, before torch is imported): `setdefault`, not matched."""
    writers = [path for path, text in _sources() if re.search(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(pop|update)\(", text)]
    assert writers == [], writers


def test_the_sweep_merges_through_the_entry_with_its_flags(tiny_family, tmp_path, monkeypatch):
    import finmerge.plugins.run as run
    from finmerge.evaluation.settings import EvalSettings
    from finmerge.sweep.run import _merge

    calls = []
    monkeypatch.setattr(run, "merge", lambda config, out, options, flags: calls.append((options, flags)))
    _merge(recipe(tiny_family), str(tmp_path / "point"), EvalSettings(trust_remote_code=True, allow_pickle=True))
    (options, flags), = calls
    assert options.trust_remote_code and flags == MergeFlags(allow_pickle=True)
