"""Loading a causal LM whose folder brings its own modeling code (trust_remote_code), e.g. Qwen-v1/nekomata.

Such code was often written for transformers 4 and lacks what transformers 5 assumes of its own
models. Every keyword finmerge hands transformers for a model it did not write goes through here:

- attn_implementation: requested only when the user asks; a value the model class does not declare
  (remote code brings its own attention and declares none) is refused naming the values that work;
- dtype: checked after loading, because such code may convert itself (Qwen-v1 turns itself to bf16
  or fp16 on a GPU when its config.json sets none of bf16/fp16/fp32);
- generate: the auto class adds `GenerationMixin` to remote code that defines `generate` or
  `prepare_inputs_for_generation` only on the first load in a process (it then registers the bare
  class, which later loads return); here every load gets the class the first load gets;
- `get_head_mask`, removed in transformers 5 and called by every forward of GPT-2-derived code
  (Qwen-v1 among them), is given back with transformers 4's behaviour for `head_mask=None`;
- use_cache in generate: code with its own `prepare_inputs_for_generation` expects tuple caches and
  fails on the Cache object transformers 5 hands it; `generation_cache_kwargs` turns the cache off.
"""

from typing import Any, Dict, List, Optional, Type

from finmerge.safety.errors import InputError

AUTO_CLASS = "AutoModelForCausalLM"
FLASH = ("flash_attention_2", "flash_attention_3")


def remote_class_ref(model_config, trust_remote_code: bool) -> Optional[str]:
    """The `auto_map` entry naming the model's own causal-LM class, when its code is to be run."""
    auto_map = getattr(model_config, "auto_map", None) or {}
    return auto_map.get(AUTO_CLASS) if trust_remote_code else None


def causal_lm_class(path: str, model_config, trust_remote_code: bool):
    """The class AutoModelForCausalLM builds for `path`, the same on every load in a process; None when
    transformers has no causal-LM class for the config (from_pretrained then says so itself)."""
    from transformers import AutoModelForCausalLM

    class_ref = remote_class_ref(model_config, trust_remote_code)
    if class_ref is None:
        from transformers.models.auto.auto_factory import _get_model_class

        try:
            return _get_model_class(model_config, AutoModelForCausalLM._model_mapping)
        except (KeyError, ValueError):
            return None
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.auto_factory import add_generation_mixin_to_remote_model

    model_class = get_class_from_dynamic_module(class_ref, path)
    model_class.register_for_auto_class(AUTO_CLASS)  # so save_pretrained copies the code files, as after an auto load
    return add_generation_mixin_to_remote_model(model_class)


def attention_values(model_class) -> List[str]:
    """attn_implementation values `model_class` declares support for (eager always: it changes nothing for
    code that brings its own attention)."""
    values = ["eager"]
    if getattr(model_class, "_supports_sdpa", False):
        values.append("sdpa")
    if getattr(model_class, "_supports_flash_attn", False) or getattr(model_class, "_supports_flash_attn_2", False):
        values.extend(FLASH)
    if getattr(model_class, "_supports_flex_attn", False):
        values.append("flex_attention")
    return values


def check_attention(requested: Optional[str], model_class, model_name: str,
                    error: Type[InputError] = InputError, option: str = "--attn_implementation") -> None:
    """Refuse an attention backend the model class does not declare, before anything is loaded."""
    if not requested or model_class is None:
        return
    known = ("eager", "sdpa", "flex_attention") + FLASH
    values = attention_values(model_class)
    if requested in known and requested not in values:
        own = (" Its own modeling code (trust_remote_code) does its attention itself, whatever transformers records."
               if _is_remote(model_class) else "")
        raise error(f"{option} {requested}: {model_name} ({model_class.__name__}) does not support it; values that "
                    f"work for it: {', '.join(values)}, or leave the option unset to let transformers pick "
                    f"({'sdpa' if 'sdpa' in values else 'eager'} for this model).{own}")


def load_causal_lm(path: str, model_config, trust_remote_code: bool, model_name: Optional[str] = None,
                   error: Type[InputError] = InputError, **kwargs):
    """from_pretrained with `kwargs` (dtype, attn_implementation, device_map, use_safetensors, ...), made usable
    under transformers 5 when the model's own code was written for transformers 4."""
    from transformers import AutoModelForCausalLM

    model_class = causal_lm_class(path, model_config, trust_remote_code)
    check_attention(kwargs.get("attn_implementation"), model_class, model_name or path, error)
    # transformers' own classes load through the auto class (adapters, composite configs); remote code through
    # the class its first load would get
    loader = model_class if model_class is not None and _is_remote(model_class) else AutoModelForCausalLM
    model = loader.from_pretrained(path, config=model_config, trust_remote_code=trust_remote_code, **kwargs)
    if _is_remote(type(model)):
        restore_head_mask(model)
    return model


def _is_remote(model_class) -> bool:
    return model_class.__module__.startswith("transformers_modules")


def _head_masks(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers 4's PreTrainedModel.get_head_mask for the one case finmerge meets: no head mask."""
    if head_mask is not None:
        raise NotImplementedError(f"{type(self).__name__}: head_mask is not supported under transformers 5")
    return [None] * num_hidden_layers


def restore_head_mask(model) -> None:
    """Give the remote-code modules that call `self.get_head_mask` (gone in transformers 5) that method back,
    on the instances finmerge loaded (the class stays as its code defines it)."""
    import types

    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not hasattr(module, "get_head_mask"):
            module.get_head_mask = types.MethodType(_head_masks, module)


def legacy_generation(model) -> bool:
    """Remote code that prepares its own generation inputs (tuple caches, transformers 4's protocol)."""
    from transformers import GenerationMixin

    own = getattr(type(model), "prepare_inputs_for_generation", None)
    return _is_remote(type(model)) and own is not None and own is not GenerationMixin.prepare_inputs_for_generation


def generation_cache_kwargs(model) -> Dict[str, Any]:
    """`generate` keywords about the KV cache: none for models transformers 5 knows how to cache for; for
    remote code with its own `prepare_inputs_for_generation`, no cache (each step reruns the whole sequence:
    slower, but the only way its forward gets what it expects)."""
    return {"use_cache": False} if legacy_generation(model) else {}


def check_dtype(model, requested, model_name: str, error: Type[InputError] = InputError) -> None:
    """Refuse a model whose own code changed the dtype finmerge asked from_pretrained for."""
    import torch

    if not isinstance(requested, torch.dtype):
        return  # "auto": the checkpoint's own dtype, whatever it is
    found = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if found and requested not in found:  # some modules may stay fp32 on purpose; none in the requested dtype is a change
        got = ", ".join(sorted(str(d).replace("torch.", "") for d in found))
        flags = [f for f in ("bf16", "fp16", "fp32") if getattr(model.config, f, None) is not None]
        hint = (f" Its config has {'/'.join(flags)} switches (Qwen-v1 converts itself on a GPU when none is set): "
                f"set `\"{_flag_for(requested)}\": true` in its config.json." if flags else "")
        raise error(f"{model_name}: loaded as {got}, though {str(requested).replace('torch.', '')} was requested; "
                    f"its own modeling code changed the dtype while loading.{hint}")


def _flag_for(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
