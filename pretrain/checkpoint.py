"""Trainer checkpoints (which one to resume from) and the final domain checkpoint in OUT."""

import glob
import json
import os
import shutil
from typing import Optional

from finmerge.safety.outputs import atomic_write_json

from .config import PretrainError


def checkpoint_is_complete(path: str) -> bool:
    """trainer_state.json is written last by Trainer._save_checkpoint; a parseable one means complete."""
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    has_weights = (glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "pytorch_model*.bin"))
                   or glob.glob(os.path.join(path, "pytorch_model_fsdp*")))
    return bool(has_weights) and bool(glob.glob(os.path.join(path, "scheduler.pt")) or
                                      glob.glob(os.path.join(path, "global_step*")))


def last_checkpoint(folder: str, remove_incomplete: bool) -> Optional[str]:
    """Newest complete checkpoint; incomplete ones (a run killed while saving) are removed if asked.

    The checkpoints folder is inside an OUT that finmerge created (run.json checked), so its contents are ours."""
    from transformers.trainer_utils import sort_checkpoints

    if not os.path.isdir(folder):
        return None
    latest = None
    for path in reversed(sort_checkpoints(folder)):  # Trainer's own order: by step, newest last
        if checkpoint_is_complete(path):
            latest = latest or path
        elif latest is None and remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return latest


def _read_json(path: str):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def convert_weights(folder: str, dtype_name: str) -> None:
    """Cast the floating tensors of the safetensors files in `folder` to dtype_name, shard by shard."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if all(t.dtype == dtype or not t.is_floating_point() for t in tensors.values()):
            continue
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}
        try:
            save_file(tensors, path + ".tmp", metadata=metadata)
        except BaseException:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            raise
        os.replace(path + ".tmp", path)
    config_path = os.path.join(folder, "config.json")
    saved = _read_json(config_path)
    saved["dtype"] = dtype_name
    saved.pop("torch_dtype", None)
    atomic_write_json(config_path, saved)


RESTORED_FROM_BASE = ("use_cache", "bf16", "fp16", "fp32", "use_flash_attn")


def finish_checkpoint(output: str, base_folder: str, save_dtype: Optional[str]) -> None:
    """Make OUT's config.json match the base where loading or training rewrote it, drop pickles, save in `save_dtype`.

    The Trainer flips use_cache; Qwen-v1's own code records the precision and flash-attn use it picked
    on this machine (bf16/fp16/fp32, use_flash_attn), which the domain model must not carry elsewhere."""
    for name in ("training_args.bin",):
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)
    config_path = os.path.join(output, "config.json")
    saved = _read_json(config_path)
    base_config = os.path.join(base_folder, "config.json")
    if os.path.isfile(base_config):
        base = _read_json(base_config)
        for key in RESTORED_FROM_BASE:
            if key in base:
                saved[key] = base[key]
            else:
                saved.pop(key, None)
    if not saved.get("architectures"):
        raise PretrainError(f"{config_path} has no `architectures`; mergekit could not merge it.")
    atomic_write_json(config_path, saved, sort_keys=False)
    if save_dtype:
        convert_weights(output, save_dtype)
