"""Ctrl-C, SIGTERM and a second run at once: one line, the usual exit status, nothing left behind.

Each case stops a real process at a known point (tests/pause_hook: the process says where it is,
then waits) so the signal lands mid-merge every time, not by luck of timing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from finmerge.demo.tiny_models import recipe
from merge_helpers import run_merge, tensors

HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pause_hook")
BIN = os.path.dirname(sys.executable)


def _start(command, where, marker, **env):
    env = dict(os.environ, PYTHONPATH=HOOK, FINMERGE_TEST_PAUSE=f"{where}:{marker}", HF_HUB_OFFLINE="1", **env)
    # A shell starts background jobs (a CI runner's, `make test &`) with SIGINT ignored, and children
    # inherit that; a user's terminal does not. Give the process the default, as at a terminal.
    return subprocess.Popen(command, env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(marker, process, timeout=300):
    deadline = time.time() + timeout
    while not os.path.exists(marker):
        assert process.poll() is None, f"ended before it paused: {process.communicate()[1][-3000:]}"
        assert time.time() < deadline, "never reached the pause point"
        time.sleep(0.05)


def _stop(process, signum):
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return process.returncode, err


def _leftovers(folder):
    return sorted(name for name in os.listdir(folder) if ".partial-" in name or name.endswith(".lock"))


def _recipe_file(tiny_family, tmp_path):
    path = tmp_path / "recipe.yml"
    path.write_text(json.dumps(recipe(tiny_family)))
    return str(path)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("command, signum, status, how", [
    ("finmerge merge", signal.SIGTERM, 143, "SIGTERM"),
    pytest.param("mergekit-yaml", signal.SIGTERM, 143, "SIGTERM", marks=SLOW),
    pytest.param("finmerge merge", signal.SIGINT, 130, "Ctrl-C", marks=SLOW),
    pytest.param("mergekit-yaml", signal.SIGINT, 130, "Ctrl-C", marks=SLOW),
])
def test_stopped_merge_keeps_the_old_output_and_leaves_nothing(tiny_family, tmp_path, command, signum, status, how):
    out = tmp_path / "out"
    run_merge(recipe(tiny_family), out)  # the earlier OUT, to be replaced by the stopped merge
    before = tensors(out)
    marker = str(tmp_path / "paused")
    args = [os.path.join(BIN, "finmerge"), "merge", "--overwrite"] if command == "finmerge merge" \
        else [os.path.join(BIN, "mergekit-yaml")]
    overwrite = {} if command == "finmerge merge" else {"FINMERGE_OVERWRITE": "1"}  # how mergekit-yaml asks
    process = _start([*args, _recipe_file(tiny_family, tmp_path), str(out)], "swap", marker, **overwrite)
    _wait_for(marker, process)
    assert any(".partial-" in name for name in os.listdir(tmp_path)), "paused before the scratch folder existed"
    returncode, err = _stop(process, signum)
    assert returncode == status, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and f"stopped by {how} (exit status {status})" in lines[0], err[-3000:]
    assert "Traceback" not in err
    assert _leftovers(tmp_path) == []
    after = tensors(out)
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)
    run_merge(recipe(tiny_family), tmp_path / "next")  # nothing asks for --remove-stale afterwards


def test_stopped_diagnosis_writes_no_report(tiny_family, tmp_path):
    marker, report = str(tmp_path / "paused"), tmp_path / "report"
    process = _start([os.path.join(BIN, "finmerge"), "diagnose", "--base", tiny_family.base, "--domain",
                      tiny_family.domain, "--instruct", tiny_family.instruct, "--out", str(report), "--quiet"],
                     "measure", marker)
    _wait_for(marker, process)
    returncode, err = _stop(process, signal.SIGTERM)
    assert returncode == 143 and "Error: finmerge diagnose stopped by SIGTERM (exit status 143)" in err, err[-3000:]
    assert not (report / "diagnostics.json").exists()


@pytest.mark.slow
def test_second_reproduce_is_refused_and_a_stopped_one_marks_nothing_done(tiny_family, tmp_path):
    """reproduce's merge stage runs mergekit-yaml as a child: SIGTERM reaches it, both clean up."""
    merge = recipe(tiny_family)
    merge["finmerge"] = {"stages": ["merge"]}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(merge, sort_keys=False))
    marker = str(tmp_path / "paused")
    first = _start([os.path.join(BIN, "finmerge"), "reproduce", str(path)], "swap", marker)
    _wait_for(marker, first)

    second = subprocess.run([os.path.join(BIN, "finmerge"), "reproduce", str(path)], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"another finmerge reproduce (process {first.pid}) is running in {tmp_path}" in second.stderr

    returncode, err = _stop(first, signal.SIGTERM)
    assert returncode == 143 and "Error: finmerge reproduce stopped by SIGTERM" in err, err[-3000:]
    assert "the stopped one is not marked done" in err
    assert not (tmp_path / ".stages" / "merge.json").exists()
    assert not (tmp_path / "merged").exists() and _leftovers(tmp_path) == [] and _leftovers(tmp_path / ".stages") == []
    child = open(marker).read()
    with pytest.raises(ProcessLookupError):
        os.kill(int(child), 0)  # mergekit-yaml ended with its parent

    rerun = subprocess.run([os.path.join(BIN, "finmerge"), "reproduce", str(path)], capture_output=True, text=True,
                           env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
