"""Where the kernel hands its task vectors to whoever measures them during a merge.

A merge activates one collector (see `collecting`); the kernel asks `active_collector()` for it, so
statistics come from the tensors the merge already holds, with no second read of the inputs. A
collector implements `start_tensor(name, shape) -> accumulator` and `finish_tensor(accumulator)`;
per chunk the kernel calls `accumulator.update(base, tau_d, tau_i, scratch=buffer)` with 1-D chunks in
the compute dtype and a same-size buffer the accumulator may overwrite (so measuring allocates
nothing). `finish_tensor` must be thread safe, because mergekit's --multi-gpu runs kernels in worker
threads; an accumulator belongs to one kernel call, so it needs no lock.
finmerge.diagnostics.StatsCollector is the implementation.
"""

import contextlib
import threading
from typing import Any, Iterator, Optional

# Entries per chunk of the domain_instruct kernel: fp32 scratch stays 4 × 4 MiB however large the
# tensor, and chunks that fit in the CPU cache make its passes ~2× faster than 16M-entry chunks.
# `finmerge diagnose` chunks the same way, so its sums round exactly like the in-merge ones.
CHUNK_ELEMENTS = 1024 * 1024

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
