"""Where and in which precision `finmerge eval` holds a model, and how it lets go of it.

One model is in memory at a time: `free` runs before the next one loads.
"""

import gc
from typing import Any, Dict

from finmerge.safety.dtypes import COMMON, dtype_name

DEVICES = ("cpu", "cuda", "mps", "auto")
DTYPES = ("auto", *COMMON)


def load_kwargs(device: str, dtype: str) -> Dict[str, Any]:
    """from_pretrained keywords: "auto" dtype keeps the checkpoint's own; "auto" device lets accelerate spread the model."""
    import torch

    name = dtype_name(dtype, DTYPES)
    kwargs: Dict[str, Any] = {"dtype": "auto" if name == "auto" else getattr(torch, name)}
    if device == "auto":
        kwargs["device_map"] = "auto"
    return kwargs


def place(model, device: str):
    """Move a loaded model to `device` (already placed when accelerate's device_map was used)."""
    return model if device in ("auto", "cpu") else model.to(device)


def input_device(model):
    """Inputs go where the embedding is: with device_map="auto" that is the first parameter's device."""
    return next(model.parameters()).device


def check_device(device: str) -> None:
    import torch

    from finmerge.safety.errors import InputError

    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: the Apple MPS backend is not available here; use --device cpu or auto")


def free() -> None:
    """Return a model's memory after the caller dropped its references (`del model`), before the next loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
