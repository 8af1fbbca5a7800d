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
