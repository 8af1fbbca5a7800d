"""Ctrl-C and SIGTERM (a job scheduler's stop) end every command the same way.

Python turns Ctrl-C into KeyboardInterrupt, so every `finally` and `except BaseException` cleanup
runs (scratch folders removed, locks released, the old output left in place). SIGTERM kills the
process outright by default, skipping all of that. `sigterm_raises()` makes SIGTERM raise `Stopped`
instead, where the program stands, so the same cleanup runs; then the command prints one line and
exits with the shell's usual status for the signal (130 for Ctrl-C, 143 for SIGTERM).
"""

import contextlib
import signal
import subprocess
import threading
from typing import Iterator, List, Optional, Sequence


class Stopped(BaseException):
    """The process was asked to stop by a signal. A BaseException, as KeyboardInterrupt is, so that
    `except Exception` handlers don't swallow it."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail = signum, detail

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def stop_of(error: BaseException) -> Optional[Stopped]:
    """A KeyboardInterrupt as the Ctrl-C stop it is; a Stopped as itself; None for anything else."""
    if isinstance(error, Stopped):
        return error
    if isinstance(error, KeyboardInterrupt):
        return Stopped(signal.SIGINT)
    return None


def stop_message(stop: Stopped, what: str) -> str:
    """One line: what was stopped, how, and what the user has now."""
    how = "Ctrl-C" if stop.signum == signal.SIGINT else stop.name
    return (f"{what} stopped by {how} (exit status {stop.exit_status}); "
            + (stop.detail or "nothing unfinished was put in place; run the same command again to start over"))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Stopped` in the main thread (elsewhere: nothing changes).

    Only the first SIGTERM raises: a second one, sent while cleanup runs, is ignored so that the
    cleanup finishes (a scheduler's SIGKILL after its grace period still ends everything).
    """
    if not _main_thread():
        yield
        return
    fired: List[int] = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_sets_flag(flag: threading.Event) -> Iterator[None]:
    """While the block runs, SIGTERM only sets `flag` (for a loop that stops itself at a safe point)."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_child(command: Sequence[str], env=None, grace: float = 120.0) -> int:
    """Run a child process; if this one is stopped, see that the child stops too and wait for its cleanup.

    subprocess.run would SIGKILL the child on any exception, which leaves its scratch folders and
    locks behind. Ctrl-C at a terminal reaches the child as well, so it is given time to finish on
    its own; a SIGTERM is passed on (a child of ours ignores a second one while it cleans up). A
    child still running after `grace` seconds is killed.
    """
    child = subprocess.Popen(list(command), env=env)
    try:
        return child.wait()
    except BaseException as error:
        stop = stop_of(error)
        if stop is None or stop.signum != signal.SIGINT:
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=grace if stop is None or stop.signum != signal.SIGINT else 10)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        raise
