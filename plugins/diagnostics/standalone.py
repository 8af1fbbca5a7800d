"""`finmerge diagnose`: the in-merge report, computed from three checkpoints without merging.

Reads safetensors one tensor at a time (a safe_open handle per tensor, so the memory-mapped pages of
a finished tensor are released) and feeds the same accumulator with the same chunks and the same
fp32/fp64 arithmetic as the `domain_instruct` kernel: the numbers equal the in-merge report's when
the merge does not change the inputs' dtype (pass --dtype to mimic a recipe's `dtype:`).
"""

import glob
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from finmerge.plugins.collector import CHUNK_ELEMENTS
from finmerge.plugins.diagnostics.report import Report, write_report
from finmerge.plugins.diagnostics.stats import StatsCollector

ROLES = ("base", "domain", "instruct")
_HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json"]


class DiagnoseError(ValueError):
    """A checkpoint cannot be measured; the message names the model and says what to do."""


def resolve_checkpoint(model: str, role: str, cache_dir: Optional[str] = None) -> str:
    """A local folder as is; anything else as a Hugging Face hub id (safetensors and json only)."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    if os.path.exists(model) or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DiagnoseError(f"{role} model {model} is not a checkpoint folder (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=_HUB_FILES, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown repo, gated, ...: one clear message
        raise DiagnoseError(
            f"{role} model {model} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Download it first or give a local path"
        ) from error


def tensor_index(folder: str, role: str) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """name -> (file, shape, dtype) from the safetensors headers (no tensor data is read)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickled = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        hint = " (only pickled .bin weights: convert them to safetensors first)" if pickled else ""
        raise DiagnoseError(f"{role} model {folder} has no *.safetensors weights{hint}")
    index = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                index[name] = (file, tuple(piece.get_shape()), piece.get_dtype())
    return index


def plan(indexes: Dict[str, Dict[str, tuple]], collector: StatsCollector) -> List[str]:
    """Tensors present with one shape in all three; the others are recorded as skipped, with why."""
    names = []
    for name, (_, shape, _) in indexes["base"].items():
        missing = [role for role in ROLES[1:] if name not in indexes[role]]
        shapes = {role: indexes[role][name][1] for role in ROLES if name in indexes[role]}
        if missing:
            collector.skip(name, f"not in the {' and '.join(missing)} model")
        elif len(set(shapes.values())) > 1:
            collector.skip(name, "shapes differ: " + ", ".join(f"{r} {list(s)}" for r, s in shapes.items()))
        else:
            names.append(name)
    for role in ROLES[1:]:
        for name in indexes[role].keys() - indexes["base"].keys():
            collector.skip(name, f"only in the {role} model, not in the base")
    # file by file, so the shards are read in order
    return sorted(names, key=lambda n: (indexes["base"][n][0], n))


def measure(name: str, tensors: List[torch.Tensor], collector: StatsCollector,
            dtype: Optional[torch.dtype] = None) -> None:
    """The kernel's chunk loop without the merge: same chunks, same compute dtype, same accumulator."""
    base = tensors[0]
    stored = dtype or base.dtype
    compute = torch.float64 if stored == torch.float64 else torch.float32
    flat = [t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors]
    numel = flat[0].numel()
    accumulator = collector.start_tensor(name, tuple(base.shape))
    scratch = [torch.empty(min(numel, CHUNK_ELEMENTS), dtype=compute) for _ in range(4)]
    for start in range(0, numel, CHUNK_ELEMENTS):
        stop = min(start + CHUNK_ELEMENTS, numel)
        b, tau_d, tau_i, spare = (s[: stop - start] for s in scratch)
        b.copy_(flat[0][start:stop])
        tau_d.copy_(flat[1][start:stop]).sub_(b)
        tau_i.copy_(flat[2][start:stop]).sub_(b)
        accumulator.update(b, tau_d, tau_i, scratch=spare)
    sums = accumulator.result()
    if not all(map(_finite, (sums.dot, sums.sq_domain, sums.sq_instruct, sums.sq_base))):
        bad = [role for role, t in zip(ROLES, tensors) if not torch.isfinite(t).all()]
        raise DiagnoseError(f"{' and '.join(bad) or 'an input'} model has NaN or Inf values in tensor {name}")
    collector.finish_tensor(accumulator)


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def _load(indexes, name: str) -> Iterator[torch.Tensor]:
    from safetensors import safe_open

    for role in ROLES:
        # a handle per tensor: closing it unmaps the pages, so memory follows one tensor, not one shard
        with safe_open(indexes[role][name][0], framework="pt") as handle:
            yield handle.get_tensor(name)


def diagnose(models: Dict[str, str], out: str, *, dtype: Optional[torch.dtype] = None,
             cache_dir: Optional[str] = None, progress: bool = True) -> Report:
    """Measure base/domain/instruct (paths or hub ids) and write the report files into `out`."""
    from tqdm.auto import tqdm

    from finmerge.plugins.diagnostics.heatmap import preload_in_background

    missing = [role for role in ROLES if not models.get(role)]
    if missing:
        raise DiagnoseError(f"missing model(s): {', '.join(missing)}")
    preload_in_background()
    folders = {role: resolve_checkpoint(models[role], role, cache_dir) for role in ROLES}
    indexes = {role: tensor_index(folders[role], role) for role in ROLES}
    collector = StatsCollector()
    names = plan(indexes, collector)
    if not names:
        raise DiagnoseError("the three checkpoints have no tensor in common with the same shape")
    total = sum(torch.Size(indexes["base"][n][1]).numel() for n in names)
    with tqdm(total=total, unit="param", unit_scale=True, desc="diagnose", disable=not progress) as bar:
        for name in names:
            measure(name, list(_load(indexes, name)), collector, dtype)
            bar.update(torch.Size(indexes["base"][name][1]).numel())
    return write_report(out, collector, models, source="diagnose")
