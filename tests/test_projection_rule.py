"""benchmarks/projection_rule.py: the recipe it writes merges to base + w_d·(τ_d − c·τ_i) + w_i·τ_i on the
aligned tensors, c from the merge's own diagnostics (oracle: the projection computed with torch)."""

import importlib.util
import json
import os

import torch

from finmerge.demo.tiny_models import recipe
from merge_helpers import run_merge, tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("projection_rule", os.path.join(ROOT, "benchmarks", "projection_rule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_projected_recipe_removes_the_domain_vectors_part_along_the_instruct_vector(tiny_family, tmp_path):
    rule = _script()
    run_merge(recipe(tiny_family, w_domain=1.5), tmp_path / "plain")
    with open(tmp_path / "plain" / "diagnostics.json") as handle:
        coefficients = rule.aligned_tensors(json.load(handle), threshold=-1.0)  # every tensor, for the test
    run_merge(rule.projected(recipe(tiny_family, w_domain=1.5), coefficients), tmp_path / "projected")
    base, domain, instruct = (tensors(p) for p in (tiny_family.base, tiny_family.domain, tiny_family.instruct))
    merged = tensors(tmp_path / "projected")
    assert set(coefficients) == set(base)
    for name in base:
        tau_d, tau_i = (domain[name] - base[name]).double(), (instruct[name] - base[name]).double()
        c = (tau_d * tau_i).sum() / (tau_i * tau_i).sum()
        expected = base[name].double() + 1.5 * (tau_d - c * tau_i) + tau_i
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-5)
        assert torch.dot((merged[name].double() - base[name].double() - tau_i).flatten(), tau_i.flatten()).abs() < 1e-3
