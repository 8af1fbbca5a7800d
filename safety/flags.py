"""Flags that let code or pickles in are taken from the command line only.

A model repository's Python code runs only with `--trust-remote-code`, and pickled `.bin` weights
(unpickling can run code) are read only with `--allow-pickle`. A recipe, a pretrain config or any
other file can be written by someone else; if it could switch these on, reading it would be enough
to run their code. So any such key, at any depth, is refused.
"""

from typing import Any, Dict

from finmerge.safety.errors import InputError

# key as it may be spelled in a file -> the command-line flag that sets it
CLI_ONLY: Dict[str, str] = {
    "trust_remote_code": "--trust-remote-code",
    "allow_pickle": "--allow-pickle",
}


class CommandLineOnlyError(InputError):
    """A file tried to set a flag that only the command line may set."""


def _normal(key: Any) -> str:
    return str(key).strip().lower().replace("-", "_")


def refuse_cli_only(data: Any, where: str, path: str = "") -> None:
    """Raise CommandLineOnlyError if `data` (a parsed YAML/JSON document) sets a command-line-only key anywhere.

    `where` names the file (and section) in the message; `path` is the key path so far.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            here = f"{path}.{key}" if path else str(key)
            if _normal(key) in CLI_ONLY:
                flag = CLI_ONLY[_normal(key)]
                raise CommandLineOnlyError(
                    f"{where}: `{here}` cannot be set in a file; pass {flag} on the command line "
                    f"if you trust the models (remove the key from the file)")
            refuse_cli_only(value, where, here)
    elif isinstance(data, list):
        for index, value in enumerate(data):
            refuse_cli_only(value, where, f"{path}[{index}]")
