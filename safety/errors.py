"""The error type for bad input: its message is for the user (names the file, key or tensor, says what to do)."""


class InputError(ValueError):
    """Bad input. `finmerge` commands print the message alone (exit code 1), without a traceback."""
