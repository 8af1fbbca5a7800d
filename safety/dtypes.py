"""dtype names as users spell them: torch's (`bfloat16`), mergekit's and recipes' (`bfloat16`, `float16`) and
the short ones (`bf16`, `fp16`, `fp32`) all mean the same dtype, for every command and file that reads one."""

from typing import Iterable, Optional

from finmerge.safety.errors import InputError

# spelling -> torch's name
SPELLINGS = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}
COMMON = ("float32", "bfloat16", "float16")


def spellings(allowed: Iterable[str]) -> str:
    """`allowed` (torch names, or `auto`) with every accepted spelling, for a message or --help."""
    return ", ".join(" / ".join([name] + sorted(k for k, v in SPELLINGS.items() if v == name and k != name
                                                and k in ("fp32", "bf16", "fp16", "fp64")))
                     for name in allowed)


def dtype_name(value: Optional[str], allowed: Iterable[str] = COMMON, what: str = "dtype") -> Optional[str]:
    """torch's name for `value` (`bf16` -> `bfloat16`); `auto` passes through if allowed; None stays None."""
    allowed = tuple(allowed)
    if value is None:
        return None
    text = str(value).strip().lower().replace("torch.", "")
    name = "auto" if text == "auto" else SPELLINGS.get(text)
    if name not in allowed:
        raise InputError(f"{what} {value!r} is not one of {spellings(allowed)}")
    return name
