"""Helpers for the bad-input suites: run a real command, check it failed cleanly and harmed nothing.

A clean failure: exit code != 0, no Python traceback, a message of one paragraph naming what was
wrong, every input byte-for-byte unchanged, and no output left that looks complete.
"""

import hashlib
import os
import subprocess
import sys
from typing import Iterable, Optional, Sequence

BIN = os.path.dirname(sys.executable)


def command(name: str) -> str:
    """The installed console script (`finmerge`, `mergekit-yaml`) of this environment."""
    return os.path.join(BIN, name)


class Snapshot(dict):
    """{file: sha256} of every file under `roots`; compare with `snapshot(*s.roots)` later."""

    roots: tuple = ()


def snapshot(*paths: str) -> Snapshot:
    """sha256 of every file under the given paths (a missing path maps to None)."""
    digests = Snapshot()
    digests.roots = tuple(str(p) for p in paths)
    for path in paths:
        path = str(path)
        if not os.path.lexists(path):
            digests[path] = None
            continue
        files = [path] if not os.path.isdir(path) else [
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names]
        for file in sorted(files):
            if os.path.islink(file):
                digests[file] = "link:" + os.readlink(file)
            else:
                with open(file, "rb") as handle:
                    digests[file] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def run(args: Sequence[str], cwd=None, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "FINMERGE_DEBUG": "", **(env or {})}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def invoke(args: Sequence[str], cwd=None, env=None) -> subprocess.CompletedProcess:
    """`finmerge ARGS` in this process (no interpreter start-up), as a CompletedProcess.

    An exception escaping the command counts as a traceback, exactly as a user would have seen one.
    """
    import traceback

    from click.testing import CliRunner

    from finmerge.cli.main import cli

    here = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, [str(a) for a in args], env={"FINMERGE_DEBUG": "", **(env or {})})
    finally:
        os.chdir(here)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, stderr)


def assert_clean_failure(result: subprocess.CompletedProcess, *, mentions: Iterable[str] = (),
                         before: Optional[Snapshot] = None,
                         outputs: Iterable[str] = ()) -> str:
    """Check a failed run; returns its message. `before` is a snapshot() of the inputs taken before the run."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"expected a failure, got exit 0:\n{output}"
    assert "Traceback" not in output, f"a traceback reached the user:\n{output}"
    message = result.stderr.strip() or result.stdout.strip()
    assert message, "failed without saying why"
    error_lines = [line for line in message.splitlines() if "rror" in line or line.startswith(("Usage", "Try"))]
    assert error_lines, f"no error message:\n{message}"
    for text in mentions:
        assert str(text) in output, f"the message does not mention {text!r}:\n{output}"
    if before is not None:
        after = snapshot(*before.roots)
        assert after == before, f"an input was modified: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}"
    for out in outputs:
        out = str(out)
        assert not looks_complete(out), f"{out} looks like a complete output after a failed run"
    return message


def looks_complete(path: str) -> bool:
    """A folder with a model config and weights, or a report, is what a successful run leaves."""
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    has_weights = any(n.endswith((".safetensors", ".bin")) for n in names)
    return ("config.json" in names and has_weights) or "report.md" in names or "report.json" in names
