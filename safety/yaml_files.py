"""Reading a user's YAML file: safe_load only, and every way it can be unreadable said in one line."""

from typing import Any, Optional, Sequence, Tuple, Type, Union

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


def position(path: str, keys: Sequence[Union[str, int]]) -> Optional[Tuple[int, int]]:
    """(line, column), 1-based, where the entry at `keys` (mapping keys and list indexes) is written in the YAML
    file `path`: the key of a mapping entry, the item of a list; as deep as the file has `keys`. None if the
    file cannot be read again."""
    import yaml

    try:
        with open(path, "rb") as handle:
            node = yaml.compose(handle.read().decode("utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    mark = node.start_mark if node is not None else None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            entry = next(((name, value) for name, value in node.value if name.value == str(key)), None)
            node, here = (entry[1], entry[0]) if entry else (None, None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = here = node.value[key]
        else:
            node = None
        if node is None:
            break
        mark = here.start_mark
    return (mark.line + 1, mark.column + 1) if mark is not None else None
