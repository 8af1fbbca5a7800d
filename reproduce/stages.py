"""Stages that are skipped when their inputs did not change.

A stage's key is a hash of its settings and of the files it reads (name, size, mtime). After a
stage finishes, its key is written to `<workdir>/.stages/<name>.json`; a later run with the same key
skips it, a different key redoes it (its output folder is cleared first, so no stale half of an
older run survives). An interrupted stage has no stamp, so the next run does it again.
"""

import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable, Dict, Iterable, Optional


def file_identity(paths: Iterable[str]) -> list:
    """(path, size, mtime) of every file under the given files/folders: cheap, and changes on rewrite."""
    rows = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "__pycache__", ".stages"))
                rows += [_stat(os.path.join(root, f)) for f in sorted(files)]
        elif os.path.exists(path):
            rows.append(_stat(path))
        else:
            rows.append((path, None, None))
    return rows


def _stat(path: str):
    stat = os.stat(path)
    return (path, stat.st_size, stat.st_mtime_ns)


def stage_key(settings: Any, inputs: Iterable[str] = ()) -> str:
    payload = json.dumps({"settings": settings, "inputs": file_identity(inputs)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class Stages:
    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.workdir, self.log = workdir, log
        self.folder = os.path.join(workdir, ".stages")
        os.makedirs(self.folder, exist_ok=True)
        self.timings: Dict[str, float] = {}
        self.skipped: Dict[str, bool] = {}

    def _stamp(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.json")

    def done(self, name: str, key: str) -> bool:
        try:
            with open(self._stamp(name)) as handle:
                return json.load(handle).get("key") == key
        except (OSError, ValueError):
            return False

    def run(self, name: str, key: str, action: Callable[[], Any], output: Optional[str] = None,
            resumable: bool = False) -> bool:
        """Run `action` unless stage `name` already finished with `key`. Returns True if it ran.

        `output` is cleared before a rerun with a different key; `resumable` stages (pretraining)
        keep it when the key is unchanged so they can continue from their own checkpoints.
        """
        if self.done(name, key):
            self.log(f"[{name}] up to date, skipped")
            self.skipped[name] = True
            return False
        if output and os.path.exists(output) and not (resumable and self._started_with(name, key)):
            shutil.rmtree(output)
        with open(self._stamp(name) + ".started", "w") as handle:
            json.dump({"key": key}, handle)
        self.log(f"[{name}] running")
        start = time.perf_counter()
        action()
        self.timings[name] = time.perf_counter() - start
        self.skipped[name] = False
        with open(self._stamp(name), "w") as handle:
            json.dump({"key": key, "seconds": self.timings[name]}, handle)
        os.remove(self._stamp(name) + ".started")
        return True

    def _started_with(self, name: str, key: str) -> bool:
        try:
            with open(self._stamp(name) + ".started") as handle:
                return json.load(handle).get("key") == key
        except (OSError, ValueError):
            return False
