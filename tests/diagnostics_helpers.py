"""Independent float64 reference for the diagnostics tests: plain torch on whole flattened tensors."""

import math
from typing import Dict, Iterable, Optional

import torch


def reference_sums(base: torch.Tensor, domain: torch.Tensor, instruct: torch.Tensor) -> Dict[str, float]:
    b = base.double().reshape(-1)
    tau_d, tau_i = domain.double().reshape(-1) - b, instruct.double().reshape(-1) - b
    return {
        "n": b.numel(),
        "dot": float(tau_d @ tau_i),
        "sq_domain": float(tau_d @ tau_d),
        "sq_instruct": float(tau_i @ tau_i),
        "sq_base": float(b @ b),
        "agree": int(((tau_d != 0) & (tau_i != 0) & (torch.sign(tau_d) == torch.sign(tau_i))).sum()),
        "both_nonzero": int(((tau_d != 0) & (tau_i != 0)).sum()),
    }


def reference_cos(tau_d: torch.Tensor, tau_i: torch.Tensor) -> Optional[float]:
    a, b = tau_d.double().reshape(-1), tau_i.double().reshape(-1)
    if not a.any() or not b.any():
        return None
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=0.0))


def concatenated(models: Dict[str, Dict[str, torch.Tensor]], names: Iterable[str]):
    """(τ_d, τ_i, θ_base) of several tensors flattened and concatenated, float64 (the FusionBench way)."""
    names = list(names)
    base = torch.cat([models["base"][n].double().reshape(-1) for n in names])
    tau_d = torch.cat([models["domain"][n].double().reshape(-1) for n in names]) - base
    tau_i = torch.cat([models["instruct"][n].double().reshape(-1) for n in names]) - base
    return tau_d, tau_i, base


def assert_stats_match(entry: Dict, tau_d: torch.Tensor, tau_i: torch.Tensor, base: torch.Tensor, tol: float = 1e-5):
    """A report entry (JSON dict) against a direct computation on the flattened vectors."""
    expected_cos = reference_cos(tau_d, tau_i)
    if expected_cos is None:
        assert entry["cos"] is None
    else:
        assert entry["cos"] is not None and abs(entry["cos"] - expected_cos) <= tol, (entry["cos"], expected_cos)
    for key, vector in (("norm_domain", tau_d), ("norm_instruct", tau_i), ("norm_base", base)):
        expected = float(vector.double().norm())
        assert math.isclose(entry[key], expected, rel_tol=tol, abs_tol=1e-12), (key, entry[key], expected)
    base_norm = float(base.double().norm())
    for key, vector in (("rel_domain", tau_d), ("rel_instruct", tau_i)):
        if base_norm == 0:
            assert entry[key] is None
        else:
            assert math.isclose(entry[key], float(vector.double().norm()) / base_norm, rel_tol=tol, abs_tol=1e-12)
    both = (tau_d != 0) & (tau_i != 0)
    same_sign = both & (torch.sign(tau_d) == torch.sign(tau_i))
    if both.any():  # sign agreement among the entries where both are non-zero
        assert abs(entry["sign_agree"] - float(same_sign.sum()) / float(both.sum())) <= 1e-12
    else:
        assert entry["sign_agree"] is None
    assert abs(entry["nonzero_share"] - float(both.double().mean())) <= 1e-12
    assert math.isclose(entry["random_cos_std"], 1 / math.sqrt(tau_d.numel()), rel_tol=1e-12)
    assert entry["n"] == tau_d.numel()
