"""Reading a user's YAML file: safe_load only, and every way it can be unreadable said in one line."""

from typing import Any, Type

from finmerge.safety.errors import InputError


def load_yaml(path: str, what: str = "file", error: Type[InputError] = InputError) -> Any:
    """The parsed document (None for an empty file); `error` names the file, and the line for bad YAML."""
    import yaml

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as failure:
        raise error(f"cannot read {what} {path}: {failure.strerror or failure}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"{what} {path} is not valid YAML: it is not UTF-8 text (invalid byte at offset "
                    f"{failure.start}); save it as UTF-8") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as failure:
        mark = getattr(failure, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(failure, "problem", None) or str(failure).splitlines()[0]
        raise error(f"{what} {path} is not valid YAML{where} ({' '.join(str(problem).split())}); fix the file") from None
