"""Output folders: created, replaced and deleted only by whoever created them.

Every folder a finmerge command or stage creates gets a marker file (`.finmerge-output`). A command
deletes or clears a folder only if the marker is there; a folder that exists without it belongs to
the user and is refused with a message saying what to do. An output may never be the working folder,
one of its ancestors, or an input (nor inside one, nor contain one).
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from finmerge.safety.errors import InputError

MARKER = ".finmerge-output"


class OutputError(InputError):
    """An output location that finmerge must not write to or delete."""


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or below it (both already real paths)."""
    return Path(path).is_relative_to(folder)


def check_output_location(output: str, inputs: Iterable[Optional[str]] = (), *, workdir: Optional[str] = None,
                          what: str = "output") -> None:
    """Refuse an output that is the workdir/cwd or an ancestor, or that overlaps an existing local input."""
    out = _real(output)
    protected = {_real(os.getcwd()), os.path.expanduser("~")}
    if workdir:
        protected.add(_real(workdir))
    for folder in protected:
        if _inside(folder, out):
            raise OutputError(f"{what} {output} is the working folder {folder} or contains it; "
                              "name a new folder for the output instead")
    for source in inputs:
        if not source or not os.path.exists(os.path.expanduser(source)):
            continue  # hub ids and not-yet-existing outputs of earlier stages cannot overlap
        real = _real(source)
        if _inside(out, real) or _inside(real, out):
            relation = "is" if out == real else ("is inside" if _inside(out, real) else "contains")
            raise OutputError(f"{what} {output} {relation} the input {source}; an input is never written "
                              "or replaced: choose another output folder")


def is_owned(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def claim(path: str, what: str = "output", info: Optional[dict] = None) -> None:
    """Create `path` (or adopt it if empty) and mark it as finmerge's; refuse a user's non-empty folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{what} {path} exists and is not a folder; choose another path")
    if os.path.isdir(path) and not is_owned(path) and os.listdir(path):
        raise OutputError(f"{what} {path} already exists, is not empty and was not created by finmerge; "
                          "choose another folder, or move it away yourself (finmerge deletes only what it created)")
    os.makedirs(path, exist_ok=True)
    if not is_owned(path):
        atomic_write_json(os.path.join(path, MARKER), {"created_by": "finmerge", "what": what,
                                                      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})})


def remove_owned(path: str, what: str = "output") -> None:
    """Delete a folder finmerge created; refuse one it did not."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path) or not is_owned(path):
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
            return
        raise OutputError(f"{what} {path} was not created by finmerge (no {MARKER} marker), so it is not deleted; "
                          "choose another folder, or move it away yourself")
    shutil.rmtree(path)


def atomic_write_text(path: str, text: str) -> None:
    """Write `path` so a reader sees the old file or the whole new one, never half of it.

    A full disk is one error naming the file, and the previous file (if any) is left as it was."""
    atomic_write_files({path: text})


def atomic_write_files(files: Dict[str, str]) -> None:
    """Write several text files (e.g. a report's .md and .json) all or none: each is written to a scratch
    file beside it first, and only when all are written are they renamed into place. A failure (a full
    disk: one error naming the file) leaves every previous file as it was and no scratch file."""
    from finmerge.safety.disk import writing

    scratches: Dict[str, str] = {}
    try:
        for path, text in files.items():
            folder = os.path.dirname(os.path.abspath(path))
            kept = "the previous files are unchanged" if any(os.path.exists(p) for p in files) else "nothing was written"
            with writing(folder, os.path.abspath(path), kept):
                handle, scratch = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
                scratches[path] = scratch
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    stream.write(text)
        for path, scratch in scratches.items():
            os.replace(scratch, path)
    except BaseException:
        for scratch in scratches.values():
            if os.path.exists(scratch):
                os.remove(scratch)
        raise


def json_text(data: Any, **dump_options: Any) -> str:
    options = {"indent": 2, "sort_keys": True, "default": str, **dump_options}
    return json.dumps(data, **options) + "\n"


def atomic_write_json(path: str, data: Any, **dump_options: Any) -> None:
    atomic_write_text(path, json_text(data, **dump_options))
