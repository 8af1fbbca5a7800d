"""A full disk while writing an output: one error naming the folder, instead of the writer's own words.

Writers fail on a full disk in their own ways: Python's `OSError(ENOSPC)`, safetensors'
`SafetensorError("... No space left on device (os error 28)")`, torch.save's
`RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos")` with the errno lost.
`writing(folder, target, outcome)` turns each into a `DiskFullError` that names what was being
written, the space left on its file system, and what became of the output (`outcome`).
"""

import contextlib
import errno
import os
import shutil
from typing import Iterator, Optional

from finmerge.safety.outputs import OutputError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch.save's zip writer loses the errno; its failures mention only the stream position
_TORCH_WRITER_TEXTS = ("inline_container.cc", "pytorchstreamwriter", "iostream error")
LOW_SPACE = 1 << 20  # a torch writer failure with less free space than this is taken as a full disk


class DiskFullError(OutputError):
    """No space left while writing an output (the message names the folder and what is left of the output)."""

    errno = errno.ENOSPC


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _free_bytes(folder: str) -> Optional[int]:
    path = os.path.abspath(folder)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_disk_full(error: BaseException, folder: str) -> bool:
    """Whether `error` (or what caused it) is a write that failed for lack of space under `folder`."""
    for link in _chain(error):
        if isinstance(link, DiskFullError):
            return False  # already said
        if isinstance(link, OSError) and link.errno in _FULL_ERRNOS:
            return True
        text = str(link).lower()
        if any(t in text for t in _FULL_TEXTS):
            return True
        if isinstance(link, RuntimeError) and any(t in text for t in _TORCH_WRITER_TEXTS):
            free = _free_bytes(folder)
            if free is not None and free < LOW_SPACE:
                return True
    return False


def _size(count: Optional[int]) -> str:
    if count is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def disk_full_message(folder: str, target: str, outcome: str) -> str:
    """`target` names what was being written (e.g. "output folder /x/out"); `folder` is where (for the free space)."""
    return (f"no space left on the disk while writing {target} ({_size(_free_bytes(folder))} free there now); "
            f"{outcome}. Free some space on that disk (or choose a folder on another disk) and run again.")


@contextlib.contextmanager
def writing(folder: str, target: str, outcome: str) -> Iterator[None]:
    """Run a block that writes under `folder`; a full disk there becomes one DiskFullError naming `target`."""
    try:
        yield
    except BaseException as error:
        if isinstance(error, Exception) and is_disk_full(error, folder):
            raise DiskFullError(disk_full_message(folder, target, outcome)) from error
        raise
