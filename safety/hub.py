"""Local path or Hugging Face hub id, decided the way huggingface_hub decides it."""

import os


def is_hub_id(value: str) -> bool:
    """True if `value` is not an existing local path and is a valid hub repo id (`gpt2`, `org/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(value, str) or os.path.exists(os.path.expanduser(value)):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True
