"""`domain_instruct`: merged = base + w_d·(domain − base) + w_i·(instruct − base).

The paper's merge (arXiv 2409.19854) as a mergekit 0.1.5 group kernel. Unlike `task_arithmetic`,
the two non-base models carry a `role`, so the rest of the plugin knows which one is the instruct
model (whose tokenizer, chat template and eos the output must carry) and which is the domain one.
"""

from typing import Literal, Tuple

import torch

from mergekit.merge_methods.base import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorEntry,
    TensorGroup,
)
from mergekit.merge_methods.easy_define import merge_method

from finmerge.plugins import METHOD_NAME
from finmerge.plugins.collector import CHUNK_ELEMENTS, active_collector

Role = Literal["domain", "instruct"]
ROLES: Tuple[Role, ...] = ("domain", "instruct")

# fp32 scratch stays 4 chunks however large the tensor (a 150k × 5k embedding is 750M entries)
_CHUNK_ELEMENTS = CHUNK_ELEMENTS


class NonFiniteTensorError(ValueError):
    """An input tensor holds NaN or Inf: merging it would silently poison the output."""


def split_roles(group: TensorGroup, role) -> Tuple[TensorEntry, TensorEntry]:
    """Return (domain, instruct) entries, or explain which models have which role."""
    by_role = {r: [e for e in group.non_base if role[e.id] == r] for r in ROLES}
    if any(len(entries) != 1 for entries in by_role.values()):
        given = ", ".join(f"{e.id}: {role[e.id]}" for e in group.non_base)
        raise ValueError(
            f"{METHOD_NAME} needs exactly one model with role 'domain' and one with role "
            f"'instruct' (tensor {group.metadata.name}); got {given or 'no non-base models'}"
        )
    return by_role["domain"][0], by_role["instruct"][0]


def _raise_non_finite(group: TensorGroup, chunks) -> None:
    for entry, chunk in chunks:
        if not torch.isfinite(chunk).all():
            raise NonFiniteTensorError(
                f"model {entry.id} has NaN or Inf values in tensor {group.metadata.name}; "
                "fix or re-export that checkpoint before merging"
            )


@merge_method(
    name=METHOD_NAME,
    pretty_name="Domain + instruction task arithmetic",
    reference_url="https://arxiv.org/abs/2409.19854",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=2, max_non_base=2),
)
def domain_instruct_merge(
    group: TensorGroup,
    role: PerNonBase[Role],
    weight: PerNonBase[float] = 1.0,
) -> torch.Tensor:
    base = group.base
    domain, instruct = split_roles(group, role)
    w_d, w_i = weight[domain.id], weight[instruct.id]
    compute = torch.float64 if base.tensor.dtype == torch.float64 else torch.float32

    out = torch.empty_like(base.tensor, memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    flat = [e.tensor.reshape(-1) for e in (base, domain, instruct)]
    stats = active_collector()
    accumulator = stats.start_tensor(group.metadata.name, base.tensor.shape) if stats else None
    numel = flat_out.numel()
    # four scratch buffers reused for every chunk: no allocation (page faults) per chunk
    scratch = [torch.empty(min(numel, _CHUNK_ELEMENTS), dtype=compute, device=out.device) for _ in range(4)]
    for start in range(0, numel, _CHUNK_ELEMENTS):
        stop = min(start + _CHUNK_ELEMENTS, numel)
        b, tau_d, tau_i, merged = (s[: stop - start] for s in scratch)
        b.copy_(flat[0][start:stop])  # copies: the inputs are borrowed and must not change
        tau_d.copy_(flat[1][start:stop]).sub_(b)
        tau_i.copy_(flat[2][start:stop]).sub_(b)
        torch.add(b, tau_d, alpha=w_d, out=merged).add_(tau_i, alpha=w_i)
        # NaN/Inf anywhere makes the sum non-finite; the sum is one cheap read, isfinite(...).all() is not
        if not torch.isfinite(merged.sum()) and not torch.isfinite(merged).all():
            _raise_non_finite(group, zip((base, domain, instruct), (b, tau_d, tau_i)))
        flat_out[start:stop].copy_(merged)
        if accumulator is not None:
            accumulator.update(b, tau_d, tau_i, scratch=merged)
    if accumulator is not None:
        stats.finish_tensor(accumulator)
    return out


def register_method() -> None:
    """Register `domain_instruct` in mergekit's registry once (idempotent)."""
    from mergekit import merge_methods

    if not any(m.spec.name == METHOD_NAME for m in merge_methods.registered_methods()):
        merge_methods.register(domain_instruct_merge)


register_method()  # importing the method makes it available by name
