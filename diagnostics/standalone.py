"""`finmerge diagnose`: the in-merge report, computed from three checkpoints without merging.

Reads the safetensors files chunk by chunk with plain positioned reads (see tensorfile: no memory
map, memory bounded by one chunk per model) and feeds the same accumulator with the same chunks and
the same fp32/fp64 arithmetic as the `domain_instruct` kernel, so the numbers equal the in-merge
report's when the merge does not change the inputs' dtype (pass --dtype to mimic a recipe's `dtype:`).
"""

import glob
import json
import os
from typing import Dict, List, Optional

import torch

from finmerge.plugins.collector import CHUNK_ELEMENTS
from finmerge.diagnostics.report import Report, write_report
from finmerge.diagnostics.stats import StatsCollector
from finmerge.diagnostics.tensorfile import RangeReader, TensorFileError, TensorLocation, read_header
from finmerge.safety.errors import InputError
from finmerge.safety.outputs import check_output_location

ROLES = ("base", "domain", "instruct")
_HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json"]
_MAX_ITEMSIZE = 8


class DiagnoseError(InputError):
    """A checkpoint cannot be measured; the message names the model and says what to do."""


def resolve_checkpoint(model: str, role: str, cache_dir: Optional[str] = None) -> str:
    """A local folder as is; anything else as a Hugging Face hub id (safetensors and json only)."""
    if os.path.isdir(model):
        return os.path.abspath(model)
    from finmerge.safety.hub import is_hub_id

    if not is_hub_id(model):
        raise DiagnoseError(f"{role} model {model} is not a checkpoint folder (and not a hub id like org/name)")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model, allow_patterns=_HUB_FILES, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown repo, gated, ...: one clear message
        raise DiagnoseError(
            f"{role} model {model} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Download it first or give a local path"
        ) from error


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _indexed_files(folder: str, role: str) -> Dict[str, List[str]]:
    """shard file -> tensor names, from model.safetensors.index.json's weight_map."""
    path = os.path.join(folder, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise DiagnoseError(f"{role} model: {path} is not a readable safetensors index ({type(error).__name__}: "
                            f"{error}); fix or remove it") from error
    files: Dict[str, List[str]] = {}
    for name, file in weight_map.items():
        if os.path.basename(file) != file:
            raise DiagnoseError(f"{role} model: {path} maps tensor {name} to {file!r}, which is not a file in the "
                                "model folder; fix the index")
        files.setdefault(file, []).append(name)
    return files


def tensor_index(folder: str, role: str) -> Dict[str, TensorLocation]:
    """name -> location from the safetensors headers (no tensor data is read).

    The files are chosen as mergekit and transformers choose them: the shards that
    model.safetensors.index.json names (only the tensors it maps to each), else model.safetensors,
    else every *.safetensors file. So a folder that also holds e.g. consolidated.safetensors (the
    same weights under other names) is not counted twice.
    """
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        wanted: Optional[Dict[str, List[str]]] = _indexed_files(folder, role)
        files = [os.path.join(folder, f) for f in sorted(wanted)]
        for file in files:
            if not os.path.isfile(file):
                raise DiagnoseError(f"{role} model: {INDEX_FILE} names {os.path.basename(file)}, which is not in "
                                    f"{folder}; download the missing shard")
    elif os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        wanted, files = None, [os.path.join(folder, SINGLE_FILE)]
    else:
        wanted, files = None, sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickled = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt"))
        hint = " (only pickled .bin weights: convert them to safetensors first)" if pickled else ""
        raise DiagnoseError(f"{role} model {folder} has no *.safetensors weights{hint}")
    index = {}
    for file in files:
        try:
            header = read_header(file)
        except TensorFileError as error:
            raise DiagnoseError(f"{role} model: {error}") from error
        if wanted is not None:
            names = wanted[os.path.basename(file)]
            absent = [n for n in names if n not in header]
            if absent:
                raise DiagnoseError(f"{role} model: {INDEX_FILE} maps tensor {absent[0]} to "
                                    f"{os.path.basename(file)}, which does not hold it; fix the index")
            header = {n: header[n] for n in names}
        index.update(header)
    return index


def plan(indexes: Dict[str, Dict[str, TensorLocation]], collector: StatsCollector) -> List[str]:
    """Tensors present with one shape in all three; the others are recorded as skipped, with why."""
    names = []
    for name, location in indexes["base"].items():
        missing = [role for role in ROLES[1:] if name not in indexes[role]]
        shapes = {role: indexes[role][name].shape for role in ROLES if name in indexes[role]}
        if missing:
            collector.skip(name, f"not in the {' and '.join(missing)} model")
        elif len(set(shapes.values())) > 1:
            collector.skip(name, "shapes differ: " + ", ".join(f"{r} {list(s)}" for r, s in shapes.items()))
        elif not all(indexes[r][name].dtype.is_floating_point for r in ROLES):
            collector.skip(name, "not a floating-point tensor")
        else:
            names.append(name)
    for role in ROLES[1:]:
        for name in indexes[role].keys() - indexes["base"].keys():
            collector.skip(name, f"only in the {role} model, not in the base")
    # in file order, so each shard is read front to back
    return sorted(names, key=lambda n: (indexes["base"][n].file, indexes["base"][n].offset))


class _Measurer:
    """The kernel's chunk loop without the merge: same chunks, same compute dtype, same accumulator."""

    def __init__(self, collector: StatsCollector, dtype: Optional[torch.dtype]):
        self.collector, self.dtype = collector, dtype
        self.readers = [RangeReader(CHUNK_ELEMENTS * _MAX_ITEMSIZE) for _ in ROLES]
        self._scratch: Dict[torch.dtype, List[torch.Tensor]] = {}

    def _chunks(self, locations: List[TensorLocation]):
        numel = locations[0].numel
        for start in range(0, numel, CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, numel)
            raw = [reader.read(loc, start, stop) for reader, loc in zip(self.readers, locations)]
            yield [r if self.dtype is None else r.to(self.dtype) for r in raw]

    def measure(self, name: str, locations: List[TensorLocation]) -> None:
        stored = self.dtype or locations[0].dtype
        compute = torch.float64 if stored == torch.float64 else torch.float32
        if compute not in self._scratch:  # four chunk buffers per compute dtype, reused for every tensor
            self._scratch[compute] = [torch.empty(CHUNK_ELEMENTS, dtype=compute) for _ in range(4)]
        accumulator = self.collector.start_tensor(name, locations[0].shape)
        for base, domain, instruct in self._chunks(locations):
            b, tau_d, tau_i, spare = (s[: base.numel()] for s in self._scratch[compute])
            b.copy_(base)
            tau_d.copy_(domain).sub_(b)
            tau_i.copy_(instruct).sub_(b)
            accumulator.update(b, tau_d, tau_i, scratch=spare)
        sums = accumulator.result()
        if not all(map(_finite, (sums.dot, sums.sq_domain, sums.sq_instruct, sums.sq_base))):
            raise DiagnoseError(f"{self._non_finite_roles(locations)} has NaN or Inf values in tensor {name}; "
                                "fix or re-export that checkpoint")
        self.collector.finish_tensor(accumulator)

    def _non_finite_roles(self, locations: List[TensorLocation]) -> str:
        bad = set()
        for chunk in self._chunks(locations):
            bad |= {role for role, values in zip(ROLES, chunk) if not torch.isfinite(values).all()}
        return " and ".join(f"the {r} model" for r in ROLES if r in bad) or "an input (overflow)"

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


def diagnose(models: Dict[str, str], out: str, *, dtype: Optional[torch.dtype] = None,
             cache_dir: Optional[str] = None, progress: bool = True) -> Report:
    """Measure base/domain/instruct (paths or hub ids) and write the report files into `out`."""
    missing = [role for role in ROLES if not models.get(role)]
    if missing:
        raise DiagnoseError(f"missing model(s): {', '.join(missing)}")
    check_output_location(out, [models[role] for role in ROLES], what="diagnostics folder")  # never into an input
    collector = _measure(models, dtype, cache_dir, progress)
    return write_report(out, collector, models, source="diagnose")


def _measure(models: Dict[str, str], dtype: Optional[torch.dtype], cache_dir: Optional[str],
             progress: bool) -> StatsCollector:
    from tqdm.auto import tqdm

    folders = {role: resolve_checkpoint(models[role], role, cache_dir) for role in ROLES}
    indexes = {role: tensor_index(folders[role], role) for role in ROLES}
    collector = StatsCollector()
    names = plan(indexes, collector)
    if not names:
        raise DiagnoseError("the three checkpoints have no tensor in common with the same shape")
    total = sum(indexes["base"][n].numel for n in names)
    measurer = _Measurer(collector, dtype)
    try:
        with tqdm(total=total, unit="param", unit_scale=True, desc="diagnose", disable=not progress) as bar:
            for name in names:
                locations = [indexes[role][name] for role in ROLES]
                measurer.measure(name, locations)
                bar.update(locations[0].numel)
    finally:
        measurer.close()
    return collector
