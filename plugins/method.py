"""`domain_instruct`: merged = base + w_d·(domain − base) + w_i·(instruct − base).

The paper's merge (arXiv 2409.19854) as a mergekit 0.1.5 group kernel. Unlike `task_arithmetic`,
the two non-base models carry a `role`, so the rest of the plugin knows which one is the instruct
model (whose tokenizer, chat template and eos the output must carry) and which is the domain one.
"""

from typing import List, Literal, Optional, Tuple

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
from finmerge.plugins.collector import CHUNK_ELEMENTS
from finmerge.plugins.merge_context import MergeContext, current_merge

Role = Literal["domain", "instruct"]
ROLES: Tuple[Role, ...] = ("domain", "instruct")

# fp32 scratch stays 4 chunks however large the tensor (a 150k × 5k embedding is 750M entries)
_CHUNK_ELEMENTS = CHUNK_ELEMENTS


class NonFiniteTensorError(ValueError):
    """An input tensor holds NaN or Inf: merging it would silently poison the output."""


class OverflowTensorError(ValueError):
    """Finite inputs whose merge does not fit the output dtype: it would be written as Inf."""


class InstructRowsError(ValueError):
    """The `instruct_rows` parameter is not a list of token ids that fit the vocabulary."""


def _largest_finite(dtype: torch.dtype, saved: Optional[torch.dtype]) -> float:
    """The largest value both the merge's dtype and the dtype mergekit saves in can hold."""
    limits = [torch.finfo(d).max for d in (dtype, saved) if d is not None and d.is_floating_point]
    return min(limits) if limits else float("inf")


def parse_rows(instruct_rows: str) -> List[int]:
    """"3, 4,5" -> [3, 4, 5]; "" -> []."""
    rows = []
    for item in str(instruct_rows or "").replace(" ", "").split(","):
        if not item:
            continue
        if not item.isdigit():
            raise InstructRowsError(
                f"{METHOD_NAME}: parameter instruct_rows must be comma-separated token ids such as \"3,4,5\", or "
                f"\"auto\" (resolved by finmerge's merge, mergekit-yaml included, before the kernel runs); got {instruct_rows!r}")
        rows.append(int(item))
    return sorted(set(rows))


def vocabulary_axis(group: TensorGroup) -> Optional[int]:
    """The axis indexed by token id (embedding, lm_head), from mergekit's metadata or the tensor name."""
    if group.metadata.vocabulary_axis is not None:
        return group.metadata.vocabulary_axis
    name = group.metadata.name or ""
    if "wpe" in name.split(".") or "position" in name:
        return None  # position embeddings: rows are positions, not tokens
    from finmerge.diagnostics.names import module_of

    return 0 if module_of(name) in ("embed", "lm_head") and group.base.tensor.dim() == 2 else None


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


def _raise_non_finite(group: TensorGroup, chunks, merged: torch.Tensor, limit: float) -> None:
    for entry, chunk in chunks:
        if not torch.isfinite(chunk).all():
            raise NonFiniteTensorError(
                f"model {entry.id} has NaN or Inf values in tensor {group.metadata.name}; "
                "fix or re-export that checkpoint before merging"
            )
    largest = merged.abs().max().item()
    raise OverflowTensorError(
        f"tensor {group.metadata.name}: the merged values reach {largest:.6g}, beyond the largest finite "
        f"value {limit:.6g} of the output dtype, so they would be written as Inf; lower the weights, or "
        "merge/save in a wider dtype (dtype/out_dtype: bfloat16 or float32 instead of float16)"
    )


def _instruct_only_rows(out: torch.Tensor, group: TensorGroup, entries, w_i: float, rows: List[int],
                        compute: torch.dtype) -> None:
    """Rows of the token embedding/lm_head for `rows` get base + w_i·τ_i: no domain vector there."""
    axis = vocabulary_axis(group)
    if axis is None or not rows:
        return
    size = out.shape[axis]
    if rows[-1] >= size:
        raise InstructRowsError(
            f"{METHOD_NAME}: instruct_rows has token id {rows[-1]}, but tensor {group.metadata.name} has only "
            f"{size} rows (vocabulary size); use ids of the instruct model's tokenizer")
    index = torch.tensor(rows, dtype=torch.long, device=out.device)
    base, instruct = (e.tensor.index_select(axis, index).to(compute) for e in entries)
    merged = base.add_(instruct.sub_(base), alpha=w_i)
    out.index_copy_(axis, index, merged.to(out.dtype))


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
    instruct_rows: str = "",
) -> torch.Tensor:
    """`instruct_rows`: comma-separated token ids whose rows in the token embedding and lm_head take
    only the instruction vector (e.g. chat-control tokens, whose end-of-turn habit τ_d may dilute)."""
    return merge_group(group, role, weight, instruct_rows, current_merge())


def merge_group(group: TensorGroup, role: PerNonBase[Role], weight: PerNonBase[float], instruct_rows: str,
                context: MergeContext) -> torch.Tensor:
    """The kernel itself, with what the running merge set (`context`) as an argument: mergekit
    passes only the group and the recipe's parameters to `domain_instruct_merge`."""
    base = group.base
    domain, instruct = split_roles(group, role)
    w_d, w_i = weight[domain.id], weight[instruct.id]
    rows = parse_rows(instruct_rows)
    compute = torch.float64 if base.tensor.dtype == torch.float64 else torch.float32
    limit = _largest_finite(base.tensor.dtype, context.saved_dtype)

    out = torch.empty_like(base.tensor, memory_format=torch.contiguous_format)
    flat_out = out.view(-1)
    flat = [e.tensor.reshape(-1) for e in (base, domain, instruct)]
    stats = context.collector
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
        # NaN/Inf in an input, or finite values beyond what the output dtype holds (fp16: 65504)
        low, high = torch.aminmax(merged)  # one pass, no temporary; NaN propagates
        if not (-limit <= low.item() and high.item() <= limit):
            _raise_non_finite(group, zip((base, domain, instruct), (b, tau_d, tau_i)), merged, limit)
        flat_out[start:stop].copy_(merged)
        if accumulator is not None:
            accumulator.update(b, tau_d, tau_i, scratch=merged)
    if accumulator is not None:
        stats.finish_tensor(accumulator)
    _instruct_only_rows(out, group, (base, instruct), w_i, rows, compute)
    return out


def register_method() -> None:
    """Register `domain_instruct` in mergekit's registry once (idempotent)."""
    from mergekit import merge_methods

    if not any(m.spec.name == METHOD_NAME for m in merge_methods.registered_methods()):
        merge_methods.register(domain_instruct_merge)


register_method()  # importing the method makes it available by name
