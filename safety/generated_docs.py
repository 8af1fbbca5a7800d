"""Reference tables in docs/ generated from the code that defines the settings, so they cannot drift:
the table sits between two marker comments, a module's `python -m` rewrites it, a test compares."""

from typing import Callable


def render(document: str, begin: str, end: str, table: str) -> str:
    """`document` with the text between the markers replaced by `table`."""
    head, found, rest = document.partition(begin)
    if not found or end not in rest:
        raise ValueError(f"the document has no {begin} ... {end} markers")
    return head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def rewrite(path: str, render_document: Callable[[str], str]) -> None:
    with open(path, encoding="utf-8") as handle:
        document = handle.read()
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_document(document))
