"""Streaming statistics of two task vectors: per tensor, chunk by chunk, summed in float64.

Everything reported (cosine, norms, relative sizes, sign agreement) derives from seven sums, so any
group of tensors (a layer, a module type, the whole model) is aggregated by adding sums, never by
averaging per-tensor cosines.
"""

import math
import threading
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from finmerge.diagnostics.names import classify


@dataclass
class Sums:
    """Sufficient statistics of (θ_base, τ_d, τ_i) over some set of entries."""

    n: int = 0  # entries
    dot: float = 0.0  # Σ τ_d·τ_i
    sq_domain: float = 0.0  # Σ τ_d²
    sq_instruct: float = 0.0  # Σ τ_i²
    sq_base: float = 0.0  # Σ θ_base²
    agree: int = 0  # entries where τ_d and τ_i are both non-zero with the same sign
    both_nonzero: int = 0  # entries where τ_d and τ_i are both non-zero
    tensors: int = 0

    def __iadd__(self, other: "Sums") -> "Sums":
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    @classmethod
    def total(cls, items: Iterable["Sums"]) -> "Sums":
        result = cls()
        for item in items:
            result += item
        return result

    @property
    def cos(self) -> Optional[float]:
        """None when either vector is zero: the angle to a zero vector is undefined (not 0, not NaN)."""
        if self.sq_domain <= 0.0 or self.sq_instruct <= 0.0:
            return None
        # float64 rounding can put a parallel pair a hair outside [-1, 1]
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.sq_domain * self.sq_instruct)))

    @property
    def norm_domain(self) -> float:
        return math.sqrt(self.sq_domain)

    @property
    def norm_instruct(self) -> float:
        return math.sqrt(self.sq_instruct)

    @property
    def norm_base(self) -> float:
        return math.sqrt(self.sq_base)

    def relative(self, sq: float) -> Optional[float]:
        return math.sqrt(sq / self.sq_base) if self.sq_base > 0.0 else None

    @property
    def sign_agree(self) -> Optional[float]:
        """Same-sign share among the entries where both vectors are non-zero (0.5 for independent signs).

        Not among all entries: on bf16 weights most entries of a small fine-tune's τ round to zero, and
        a share of all entries would read as strong disagreement. None when no entry has both non-zero.
        """
        return self.agree / self.both_nonzero if self.both_nonzero else None

    @property
    def nonzero_share(self) -> Optional[float]:
        """Share of entries where both τ_d and τ_i are non-zero: what sign_agree is measured on."""
        return self.both_nonzero / self.n if self.n else None

    @property
    def random_cos_std(self) -> Optional[float]:
        """Spread (standard deviation) of the cosine between two random directions in n dimensions."""
        return 1.0 / math.sqrt(self.n) if self.n else None

    def as_dict(self) -> Dict[str, object]:
        return {
            "cos": self.cos, "random_cos_std": self.random_cos_std,
            "norm_domain": self.norm_domain, "norm_instruct": self.norm_instruct, "norm_base": self.norm_base,
            "rel_domain": self.relative(self.sq_domain), "rel_instruct": self.relative(self.sq_instruct),
            "sign_agree": self.sign_agree, "nonzero_share": self.nonzero_share,
            "n": self.n, "tensors": self.tensors,
            "sums": {"dot": self.dot, "sq_domain": self.sq_domain, "sq_instruct": self.sq_instruct,
                     "sq_base": self.sq_base, "agree": self.agree, "both_nonzero": self.both_nonzero},
        }


_MAX_CHUNK = 2**24


class TensorAccumulator:
    """Sums for one tensor, fed chunk by chunk by whoever computes the task vectors.

    Each chunk's sums are taken in the compute dtype (torch's cascaded summation keeps fp32 error
    near 1e-7) and added into float64 on the tensors' device: no host sync per chunk.
    """

    def __init__(self, name: str, shape: Tuple[int, ...]):
        self.name, self.shape = name, tuple(shape)
        self._sums: Optional[torch.Tensor] = None  # float64 [dot, sq_d, sq_i, sq_base, agree, both_nonzero]
        self._n = 0

    def update(self, base: torch.Tensor, tau_d: torch.Tensor, tau_i: torch.Tensor,
               scratch: Optional[torch.Tensor] = None) -> None:
        """Add one chunk (1-D, same length, at most 2**24 entries, fp32 or fp64).

        `scratch`, if given, is a same-size buffer it may overwrite.
        """
        if tau_d.numel() > _MAX_CHUNK:
            raise ValueError(f"chunks of at most {_MAX_CHUNK} entries (exact fp32 counts); got {tau_d.numel()}")
        if scratch is None or scratch.shape != tau_d.shape or scratch.dtype != tau_d.dtype:
            scratch = torch.empty_like(tau_d)
        product = torch.mul(tau_d, tau_i, out=scratch)
        dot = product.sum()  # cascaded sum: more accurate than a BLAS dot
        # sign(τ_d·τ_i) is +1 where both are non-zero with the same sign, -1 where the signs differ, 0 where
        # either is zero (barring a product under ~1e-45 that underflows to 0); so Σ sign = agree − disagree
        # and Σ sign² = agree + disagree = both non-zero. Sums of ±1s are exact up to 2**24 entries, and
        # this is 3× faster than counting with comparisons (ne/gt build and convert bool tensors).
        signs = product.sign_()
        net, both_nonzero = signs.sum(), torch.dot(signs, signs)
        agree = (net + both_nonzero) / 2
        squares = [torch.dot(t, t) for t in (tau_d, tau_i, base)]
        sums = torch.stack([dot, *squares, agree, both_nonzero])
        # float64 on the tensors' device (no sync per chunk); Apple MPS has no float64, so the CPU there
        sums = sums.to("cpu" if sums.device.type == "mps" else sums.device, torch.float64)
        if self._sums is None:
            self._sums = sums
        else:
            self._sums += sums
        self._n += tau_d.numel()

    def result(self) -> Sums:
        if self._sums is None:
            return Sums(tensors=1)
        dot, sq_d, sq_i, sq_b, agree, both_nonzero = self._sums.tolist()
        return Sums(n=self._n, dot=dot, sq_domain=sq_d, sq_instruct=sq_i, sq_base=sq_b,
                    agree=int(agree), both_nonzero=int(both_nonzero), tensors=1)


@dataclass
class TensorStats:
    name: str
    shape: Tuple[int, ...]
    layer: Optional[int]
    module: str
    sums: Sums


class StatsCollector:
    """Per-tensor sums of one merge, safe to feed from several kernel threads at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._tensors: Dict[str, TensorStats] = {}
        self._skipped: Dict[str, str] = {}

    def start_tensor(self, name: str, shape: Tuple[int, ...]) -> TensorAccumulator:
        return TensorAccumulator(name, shape)

    def finish_tensor(self, accumulator: TensorAccumulator) -> None:
        sums = accumulator.result()
        if not all(math.isfinite(v) for v in (sums.dot, sums.sq_domain, sums.sq_instruct, sums.sq_base)):
            raise ValueError(f"statistics of tensor {accumulator.name} are not finite (NaN/Inf in an input or overflow)")
        layer, module = classify(accumulator.name)
        with self._lock:  # a re-run of the same tensor replaces it: counted once
            self._tensors[accumulator.name] = TensorStats(accumulator.name, accumulator.shape, layer, module, sums)

    def skip(self, name: str, reason: str) -> None:
        with self._lock:
            self._skipped[name] = reason

    def tensors(self) -> List[TensorStats]:
        with self._lock:
            return sorted(self._tensors.values(), key=lambda t: _natural_key(t.name))

    def skipped(self) -> Dict[str, str]:
        with self._lock:
            return dict(sorted(self._skipped.items(), key=lambda kv: _natural_key(kv[0])))


def _natural_key(name: str):
    """model.layers.2 before model.layers.10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
