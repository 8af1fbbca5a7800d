"""Checks for sharded training, made before any data is read or weights are loaded."""

import os
from typing import List

from .config import PretrainConfig, PretrainError


def fsdp_wrap_classes(config: PretrainConfig) -> List[str]:
    """Layer classes FSDP is told to wrap: from `accelerate launch` (FSDP_TRANSFORMER_CLS_TO_WRAP) or --fsdp_config."""
    names: List[str] = []
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        names += [n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()]
    fsdp_config = config.fsdp_config if isinstance(config.fsdp_config, dict) else {}
    listed = fsdp_config.get("transformer_layer_cls_to_wrap") or []
    names += [listed] if isinstance(listed, str) else list(listed)
    return names


def check_fsdp_wrap_class(config: PretrainConfig, model_config) -> None:
    """A wrap class the model does not have (e.g. QWenBlock on a Llama model) is named with the ones it has.

    The model is built on the meta device (no memory, no weights read) to list its module classes."""
    wanted = fsdp_wrap_classes(config)
    if not wanted:
        return
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.trust_remote_code)
    present = {type(module).__name__ for module in model.modules()}
    missing = [name for name in wanted if name not in present]
    if missing:
        layers = list(getattr(model, "_no_split_modules", None) or [])
        raise PretrainError(
            f"FSDP wrap class {', '.join(missing)} is not a layer of {config.model} ({type(model).__name__}); its "
            f"decoder-layer classes are: {', '.join(layers) or 'unknown (the model declares no _no_split_modules)'}. "
            f"Set fsdp_transformer_layer_cls_to_wrap in the accelerate config (or transformer_layer_cls_to_wrap in "
            f"--fsdp_config) to one of them.")


def fsdp_requested(config: PretrainConfig) -> bool:
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")
            or bool(config.fsdp))


def check_fsdp_runs_sharded(config: PretrainConfig) -> None:
    """accelerate (1.15) enables FSDP only for GPU-like process groups: on CPU processes an FSDP config trains
    plain DDP (every process holds the whole model) without a word. Say so instead of pretending to shard."""
    if not fsdp_requested(config):
        return
    from accelerate.utils import DistributedType

    config.world_size  # sets up the process group, as the Trainer will
    kind = config.distributed_state.distributed_type
    if kind in (DistributedType.MULTI_CPU, DistributedType.NO):
        raise PretrainError(
            f"FSDP is requested (accelerate config or --fsdp) but these processes run as {kind.value} "
            f"({config.world_size} process(es), no GPU): accelerate shards only across accelerators and would train "
            f"unsharded DDP instead. Run FSDP on GPUs, or use recipes/accelerate/ddp-cpu.yaml on CPUs.")
