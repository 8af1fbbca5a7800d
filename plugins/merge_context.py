"""What one merge tells the `domain_instruct` kernel beyond the tensors: a `MergeContext`.

mergekit calls the kernel with a tensor group and the recipe's parameters only, so the merge
(finmerge.plugins.run) activates one `MergeContext` around mergekit's `run_merge` with `merging`,
and the registered kernel takes `current_merge()` once per tensor and passes it on as an argument.

The context is process-wide, not a `contextvars.ContextVar`: mergekit's --multi-gpu executor runs
kernels in a `ThreadPoolExecutor`, whose worker threads start with an empty context and would not
see a variable set by the thread that started the merge. Process-wide, it serves one merge at a
time: a second merge that starts while one is running is refused (`MergeOverlapError`) rather than
letting its kernels check against the other's dtype or feed the other's statistics. The context is
immutable, so a kernel's one read gets the dtype and the collector of the same merge.

Without an active merge (a test or a script calling the kernel directly) the kernel gets the empty
context: the input dtype's range only, and no statistics.
"""

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch


@dataclass(frozen=True)
class MergeContext:
    # The dtype mergekit will save in (`out_dtype:`). The kernel returns the input dtype and mergekit
    # casts later, so values beyond this dtype's range would become Inf unseen; the kernel refuses them.
    saved_dtype: Optional[torch.dtype] = None
    # Where the kernel hands its task vectors to be measured (finmerge.plugins.collector describes
    # the protocol); None measures nothing.
    collector: Optional[Any] = None


class MergeOverlapError(RuntimeError):
    """A second `domain_instruct` merge started in a process while one was running."""


_EMPTY = MergeContext()
_lock = threading.Lock()
_current: Optional[MergeContext] = None


def current_merge() -> MergeContext:
    """The running merge's context, from any thread; the empty context when no merge is running."""
    with _lock:
        return _current or _EMPTY


@contextlib.contextmanager
def merging(context: MergeContext) -> Iterator[MergeContext]:
    """Make `context` the one every kernel call sees until the block ends, however it ends."""
    global _current
    with _lock:
        if _current is not None:
            raise MergeOverlapError(
                "another domain_instruct merge is already running in this process; its output dtype and "
                "statistics are set for the whole process, so run the merges one after another")
        _current = context
    try:
        yield context
    finally:
        with _lock:
            _current = None
