"""Inputs that change or break while a merge reads them, and a disk that fills while it writes.

The preflight reads every shard's header and records each weight file's identity (device, inode,
size, modification time: what make and rsync trust; a chmod does not count as a change). After mergekit has read them all, `check_unchanged` compares:
a file rewritten in place or replaced by another one means the merge may hold tensors of two
versions, so it is refused before it reaches OUT. `merge_faults` turns a failure during the merge
into one message: a full disk names OUT; a read error whose cause is a shard that no longer passes
the preflight's header check (truncated, rewritten) names that file.

What no check can turn into a message: a shard cut short *after* mergekit memory-mapped it. Reading
the missing pages kills the process with SIGBUS (exit status 135 from a shell); OUT is untouched and
the scratch folder stays for the next merge to report.
"""

import contextlib
import glob
import os
from typing import Dict, Iterator, List, Tuple

from mergekit.config import MergeConfiguration

from finmerge.safety.disk import DiskFullError, disk_full_message, is_disk_full
from finmerge.safety.errors import InputError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.index.json")
FileState = Tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def _weight_files(folder: str) -> List[str]:
    return sorted(path for pattern in WEIGHT_PATTERNS for path in glob.glob(os.path.join(folder, pattern)))


def file_states(folders: Dict[str, str]) -> Dict[str, FileState]:
    """Identity of every weight file in the input folders (links followed: the data is what counts)."""
    states = {}
    for folder in folders.values():
        for path in _weight_files(folder):
            info = os.stat(path)
            states[path] = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    return states


def _describe(path: str, before: FileState) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return f"{path} is gone"
    if (info.st_dev, info.st_ino) != before[:2]:
        return f"{path} was replaced by another file"
    if info.st_size != before[2]:
        return f"{path} was {before[2]} bytes when checked and is {info.st_size} bytes now"
    return f"{path} was rewritten (same size, modified since the check)"


def changed_files(states: Dict[str, FileState]) -> List[str]:
    """One description per weight file that is not the file the preflight checked."""
    changed = []
    for path, before in states.items():
        try:
            info = os.stat(path)
            now = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        except OSError:
            now = None
        if now != before:
            changed.append(_describe(path, before))
    return changed


class InputChangedError(InputError):
    """An input file changed while the merge read it; nothing reached OUT."""


MIXED = ("an input changed while the merge was reading it, so the result could mix two versions of that model. "
         "Nothing was written to the output folder. Merge again once nothing is writing to the model folders.")
BROKEN = ("it changed while the merge was running (cut short or being rewritten). Nothing was written to the "
          "output folder. Save or download that checkpoint again, then merge again.")


def _input_changed(descriptions: List[str], consequence: str = MIXED) -> InputChangedError:
    return InputChangedError(f"{'; '.join(descriptions)}: {consequence}")


def check_unchanged(states: Dict[str, FileState]) -> None:
    """Refuse a merge whose inputs are no longer the files the preflight checked."""
    changed = changed_files(states)
    if changed:
        raise _input_changed(changed)


def broken_shards(config: MergeConfiguration) -> List[str]:
    """Shards of the recipe's local models that no longer pass the preflight's header check."""
    from safetensors import SafetensorError, safe_open

    from finmerge.plugins.preflight import input_paths

    broken = []
    for folder in input_paths(config):
        for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))) if os.path.isdir(folder) else []:
            try:
                with safe_open(path, framework="pt"):
                    pass  # the header, checked against the file's size: no tensor data is read
            except (SafetensorError, OSError, ValueError) as error:
                broken.append(f"{path} is no longer a readable safetensors file ({' '.join(str(error).split())}) "
                              f"though it passed the check before the merge")
    return broken


@contextlib.contextmanager
def merge_faults(out_path: str, config: MergeConfiguration) -> Iterator[None]:
    """A failed merge as one message naming what broke: OUT's disk, or the input file that changed."""
    try:
        yield
    except Exception as error:
        if isinstance(error, (DiskFullError, InputChangedError)):
            raise
        if is_disk_full(error, os.path.dirname(os.path.abspath(out_path))):
            raise DiskFullError(disk_full_message(
                os.path.dirname(os.path.abspath(out_path)), f"the merge into {os.path.abspath(out_path)}",
                "the output folder is as it was before the merge and the scratch folder beside it was removed")) from error
        broken = broken_shards(config)
        if broken:
            raise _input_changed(broken, BROKEN) from error
        raise
