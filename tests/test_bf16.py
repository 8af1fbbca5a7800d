"""bf16 semantics: on bf16 checkpoints mergekit's task_arithmetic computes in bf16 (τ = m − base, the sum
of the τ, base + sum: a rounding at each step); domain_instruct computes in fp32 and rounds once. Both
are compared with a float64 reference of base + τ_d + τ_i taken from the same bf16 inputs.

`python tests/test_bf16.py` prints the numbers docs/merge.md quotes ("Precision: one rounding").
"""

import os
import sys
import tempfile
from typing import Dict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from merge_helpers import run_merge, tensors  # noqa: E402
from qwen_fixture import build_qwen_v1_triplet, load_tensors  # noqa: E402

# fine-tune-sized task vectors (0.002 on weights of ~0.1) and larger ones (0.02)
PERTURBATIONS = (0.002, 0.02)


def _recipe(paths: Dict[str, str], method: str) -> dict:
    if method == "domain_instruct":
        models = [{"model": paths["domain"], "parameters": {"role": "domain", "weight": 1.0}},
                  {"model": paths["instruct"], "parameters": {"role": "instruct", "weight": 1.0}}]
    else:
        models = [{"model": paths[r], "parameters": {"weight": 1.0}} for r in ("domain", "instruct")]
    return {"merge_method": method, "base_model": paths["base"], "models": models, "dtype": "bfloat16"}


def measure(folder: str, perturbation: float) -> Dict[str, Dict[str, float]]:
    """max / mean |merged − reference| over all weights, for both methods, on a bf16 triplet."""
    paths = build_qwen_v1_triplet(os.path.join(folder, "models"), dtype=torch.bfloat16, perturbation=perturbation)
    base, domain, instruct = (load_tensors(paths[r]) for r in ("base", "domain", "instruct"))
    reference = {n: b.double() + (domain[n].double() - b.double()) + (instruct[n].double() - b.double())
                 for n, b in base.items()}
    results = {}
    for method in ("domain_instruct", "task_arithmetic"):
        out = os.path.join(folder, method)
        run_merge(_recipe(paths, method), out, trust_remote_code=True)
        merged = tensors(out)
        assert all(merged[n].dtype == torch.bfloat16 for n in reference)
        errors = torch.cat([(merged[n].double() - r).abs().flatten() for n, r in reference.items()])
        # entries that are not the bf16 value nearest to the exact sum
        misrounded = sum(int((merged[n] != r.to(torch.bfloat16)).sum()) for n, r in reference.items())
        results[method] = {"max": errors.max().item(), "mean": errors.mean().item(),
                           "misrounded": misrounded / errors.numel()}
    return results


@pytest.mark.parametrize("perturbation", PERTURBATIONS)
def test_fp32_math_is_closer_to_the_exact_sum_than_bf16_task_arithmetic(tmp_path, perturbation):
    results = measure(str(tmp_path), perturbation)
    ours, theirs = results["domain_instruct"], results["task_arithmetic"]
    assert ours["mean"] < theirs["mean"], results
    assert ours["max"] <= theirs["max"], results
    # one rounding of the exact sum: never more than half a bf16 ulp (2^-8 relative), so below 2^-8 · 4
    # for weights under 4 in magnitude (the fixture's are)
    assert ours["max"] <= 2.0 ** -8 * 4, results
    assert ours["misrounded"] < 1e-3 < theirs["misrounded"], results


if __name__ == "__main__":
    torch.set_num_threads(1)
    for value in PERTURBATIONS:
        with tempfile.TemporaryDirectory() as scratch:
            for method, numbers in measure(scratch, value).items():
                print(f"perturbation {value}: {method:16s} max {numbers['max']:.3e}  mean {numbers['mean']:.3e}  "
                      f"not nearest bf16 {numbers['misrounded']:.4f}")
