"""mergekit's own methods on the same three models: recipes plain `mergekit-yaml` runs as they are."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from finmerge.demo.tiny_models import recipe
from finmerge.sweep.baselines import BASELINES, BaselineError, baseline_recipe
from merge_helpers import run_merge, tensors


def test_task_arithmetic_baseline_is_the_paper_merge(tiny_family, tmp_path):
    """Oracle: task_arithmetic at 1/1 is our domain_instruct merge at 1/1."""
    run_merge(baseline_recipe(recipe(tiny_family), "task_arithmetic"), tmp_path / "ta")
    run_merge(recipe(tiny_family), tmp_path / "ours")
    ta, ours = tensors(tmp_path / "ta"), tensors(tmp_path / "ours")
    assert ta.keys() == ours.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], ours[name], rtol=0, atol=1e-6)


def test_baselines_name_no_finmerge_parameter(tiny_family):
    for method in BASELINES:
        merged = baseline_recipe(recipe(tiny_family), method)
        text = json.dumps(merged)
        assert merged["merge_method"] == method and "role" not in text and "instruct_rows" not in text


def test_a_recipe_without_roles_is_refused(tiny_family):
    broken = recipe(tiny_family)
    del broken["models"][1]["parameters"]["role"]
    with pytest.raises(BaselineError, match="role: domain and role: instruct"):
        baseline_recipe(broken, "ties")
    with pytest.raises(BaselineError, match="unknown baseline 'slerp'"):
        baseline_recipe(recipe(tiny_family), "slerp")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(BASELINES))
def test_every_baseline_runs_through_plain_mergekit_yaml(tiny_family, tmp_path, method):
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(baseline_recipe(recipe(tiny_family), method)))
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    result = subprocess.run([mergekit_yaml, str(path), str(tmp_path / "out"), "--random-seed", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    merged, base = tensors(tmp_path / "out"), tensors(tiny_family.base)
    assert merged.keys() == base.keys()
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # it merged something
