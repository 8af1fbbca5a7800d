"""An error early in a merge or a diagnosis ends the process cleanly: no thread of ours is still at work.

A merge imports matplotlib in a helper thread while tensors are measured. CPython stops a thread
still running at interpreter shutdown where it stands; inside a C++ extension's initialisation
(kiwisolver) that ends in `std::terminate`, so an early error used to exit with SIGABRT now and
then instead of status 1. The tests below make that import slow and observable, so that a thread
cut off at exit is seen every time instead of once in thirty runs.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from finmerge.diagnostics import heatmap
from merge_helpers import nan_recipe, run_merge

SLOW_IMPORT = 1.5  # seconds: far longer than the failing merge takes to reach its error


def _slow_import(marker):
    def slow():
        import time

        time.sleep(SLOW_IMPORT)
        with open(marker, "w") as handle:
            handle.write("done")

    return slow


def test_failed_merge_waits_for_its_preload_thread(tiny_family, tmp_path, monkeypatch):
    marker = tmp_path / "preload-finished"
    monkeypatch.setattr(heatmap, "_import_matplotlib", _slow_import(marker))
    merge = nan_recipe(tiny_family, tmp_path)
    with pytest.raises(Exception, match="NaN or Inf"):
        run_merge(merge, tmp_path / "out")
    assert marker.exists(), "the merge returned while its matplotlib thread was still running"


def test_failed_diagnosis_waits_for_its_preload_thread(tiny_family, tmp_path, monkeypatch):
    from finmerge.diagnostics.standalone import DiagnoseError, diagnose

    marker = tmp_path / "preload-finished"
    monkeypatch.setattr(heatmap, "_import_matplotlib", _slow_import(marker))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    models = {"base": tiny_family.base, "domain": str(empty), "instruct": tiny_family.instruct}
    with pytest.raises(DiagnoseError):
        diagnose(models, str(tmp_path / "report"), progress=False)
    assert marker.exists(), "diagnose returned while its matplotlib thread was still running"


@pytest.mark.slow
def test_mergekit_yaml_exits_1_after_its_thread_finished(tiny_family, tmp_path):
    """The whole process, as `mergekit-yaml` runs it: exit status 1, and the thread's work was not cut off."""
    merge = nan_recipe(tiny_family, tmp_path)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(merge))
    marker = tmp_path / "preload-finished"
    script = textwrap.dedent(f"""
        import sys, time
        from finmerge.diagnostics import heatmap

        def slow():
            time.sleep({SLOW_IMPORT})
            open({str(marker)!r}, "w").write("done")

        heatmap._import_matplotlib = slow
        from mergekit.scripts.run_yaml import main
        sys.argv = ["mergekit-yaml", {str(recipe_path)!r}, {str(tmp_path / "out")!r}]
        main()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NaN or Inf values" in result.stderr and "terminate called" not in result.stderr
    assert marker.exists(), "the process ended while the preload thread was still running"
    assert not os.path.exists(tmp_path / "out")
