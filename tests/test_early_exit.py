"""An error early in a merge or a diagnosis ends the process cleanly: status 1, no abort.

Merges used to import matplotlib in a helper thread (for the heatmap) while tensors were measured.
CPython stops a thread still running at interpreter shutdown where it stands; inside a C++
extension's initialisation (kiwisolver) that ended in `std::terminate`, so an early error exited
with SIGABRT now and then instead of status 1. The heatmap is now written as SVG text: a merge and
a diagnosis start no thread of their own and load no plotting library, which these tests check.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from merge_helpers import nan_recipe

# Threads alive besides the main one, except tqdm's monitor: a daemon tqdm starts with its first bar,
# which only sleeps in Event.wait, so stopping it at exit is harmless.
REPORT = "import json, sys, threading; print(json.dumps({{'matplotlib': 'matplotlib' in sys.modules, " \
         "'threads': sorted(t.name for t in threading.enumerate() if t is not threading.main_thread() " \
         "and t.name != 'tqdm_monitor'), 'status': {status}}}))"


def _run(script: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "terminate called" not in result.stderr
    return {"stderr": result.stderr, **json.loads(result.stdout.strip().splitlines()[-1])}


@pytest.mark.slow
def test_mergekit_yaml_early_error_exits_1_with_no_thread_or_plotting_library(tiny_family, tmp_path):
    """The whole process, as `mergekit-yaml` runs it, up to its SystemExit."""
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(nan_recipe(tiny_family, tmp_path)))
    status_line = REPORT.format(status="status")
    seen = _run(f"""
        import sys
        from mergekit.scripts.run_yaml import main
        sys.argv = ["mergekit-yaml", {str(recipe_path)!r}, {str(tmp_path / "out")!r}]
        try:
            main()
            status = 0
        except SystemExit as stop:
            status = stop.code
        {status_line}
    """)
    assert seen["status"] == 1 and "NaN or Inf values" in seen["stderr"]
    assert seen["threads"] == [] and seen["matplotlib"] is False
    assert not os.path.exists(tmp_path / "out")


def test_diagnosis_loads_no_plotting_library_and_leaves_no_thread(tiny_family, tmp_path):
    """A successful `finmerge diagnose` draws its heatmap without matplotlib."""
    models = {"base": tiny_family.base, "domain": tiny_family.domain, "instruct": tiny_family.instruct}
    status_line = REPORT.format(status="0")
    seen = _run(f"""
        from finmerge.diagnostics.standalone import diagnose
        diagnose({models!r}, {str(tmp_path / "report")!r}, progress=False)
        {status_line}
    """)
    assert seen["threads"] == [] and seen["matplotlib"] is False
    assert (tmp_path / "report" / "diagnostics.svg").read_text().startswith("<svg ")
