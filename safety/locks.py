"""One writer per output: a second run into the same folder stops at once and names the first.

A merge locks its OUT, a reproduction its workdir, a pretraining run its output folder, each with a
lock file beside or inside it holding the owner's process id. `flock` goes with the process: a killed
run holds nothing, and the next run takes the lock without asking anyone to clean up.
"""

import contextlib
import errno
import fcntl
import os
from typing import Callable, Iterator

from finmerge.safety.outputs import OutputError


def lock_beside(folder: str) -> str:
    """`.NAME.lock` next to folder NAME (the folder itself may not exist yet, or be swapped)."""
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def exclusive(path: str, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold lock file `path` for the block. Already taken: OutputError(busy(pid of the holder)).

    The lock file is removed on release, so after taking the lock we check it is still the file at
    that path (a lock on a file another run has just unlinked would guard nothing) and try again if not.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        handle = open(path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(busy(holder)) from None
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still holding the lock: see above
        handle.close()
