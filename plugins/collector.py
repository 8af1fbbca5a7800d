"""Where the kernel hands its task vectors to whoever measures them during a merge.

A merge activates one collector (see `collecting`); the kernel asks `active_collector()` for it, so
statistics come from the tensors the merge already holds, with no second read of the inputs. A
collector implements `start_tensor(name, shape) -> accumulator` (accumulator.update(base, tau_d,
tau_i) per chunk) and `finish_tensor(accumulator)`; it must be thread safe, because mergekit's
--multi-gpu runs kernels in worker threads.
"""

import contextlib
import threading
from typing import Any, Iterator, Optional

_lock = threading.Lock()
_active: Optional[Any] = None


def active_collector() -> Optional[Any]:
    return _active


@contextlib.contextmanager
def collecting(collector: Any) -> Iterator[Any]:
    """Activate `collector` for one merge; a fresh one per merge (mergekit-multi runs several)."""
    global _active
    with _lock:
        if _active is not None:
            raise RuntimeError("a domain_instruct merge is already collecting statistics in this process")
        _active = collector
    try:
        yield collector
    finally:
        with _lock:
            _active = None
