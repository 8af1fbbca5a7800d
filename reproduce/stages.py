"""Stages that are skipped when nothing they depend on changed.

A stage's key is a hash of its settings, of the content of every file it reads, of the command-line
flags, of the finmerge and mergekit versions and of FINMERGE_NO_DIAGNOSTICS. After a stage finishes,
its key is written to `<workdir>/.stages/<name>.json`; a later run skips it only if the key is the
same AND its outputs are still there (and still finmerge's). Otherwise the stage is redone, and so
is every stage after it in the same run. Before a redo, the stage's outputs are deleted, but only
folders carrying finmerge's marker (finmerge.safety.outputs): a folder of the user's is never
touched. An interrupted stage has no stamp, so the next run does it again.

Files are identified by their content (sha256). Model weights are large, so digests are cached in
`<workdir>/.stages/hashes.json` by (path, size, mtime_ns, ctime_ns, inode) and shared in the process
with the pretrain stage's own fingerprint (finmerge.safety.hashes): a file is read once per version.
"""

import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from finmerge.safety.hashes import HashCache
from finmerge.safety.outputs import MARKER, atomic_write_json, claim, is_owned, remove_owned

SKIPPED_FOLDERS = ("checkpoints", "__pycache__", ".stages")


def file_identity(paths: Iterable[str], cache: Optional[HashCache] = None) -> list:
    """(path, sha256) of every file under the given files/folders; (path, None) for a missing one.

    finmerge's ownership marker is left out: it records when a folder was made, not what it holds.
    """
    cache = cache or HashCache()
    rows = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
                rows += [(os.path.join(root, f), cache.digest(os.path.join(root, f)))
                         for f in sorted(files) if f != MARKER]
        elif os.path.exists(path):
            rows.append((path, cache.digest(path)))
        else:
            rows.append((path, None))
    return rows


def environment() -> Dict[str, Any]:
    """What else decides a stage's result: the code that runs it and the switches that change its output."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"finmerge": installed("finmerge"), "mergekit": installed("mergekit"),
            "FINMERGE_NO_DIAGNOSTICS": os.environ.get("FINMERGE_NO_DIAGNOSTICS", "")}


def stage_key(settings: Any, inputs: Iterable[str] = (), cache: Optional[HashCache] = None) -> str:
    payload = json.dumps({"settings": settings, "environment": environment(), "inputs": file_identity(inputs, cache)},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _present(output: str) -> bool:
    """A stage's output is there: a file, or a folder that still carries finmerge's marker."""
    return os.path.isfile(output) or (os.path.isdir(output) and is_owned(output))


def _clear(output: str) -> None:
    if os.path.isdir(output) and not os.path.islink(output):
        remove_owned(output)  # refuses a folder without finmerge's marker
    elif os.path.isfile(output):
        os.remove(output)  # a stage's own result file (eval.json), always inside .stages' workdir


class Stages:
    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.workdir, self.log = workdir, log
        self.folder = os.path.join(workdir, ".stages")
        os.makedirs(self.folder, exist_ok=True)
        self.hashes = HashCache(self.folder)
        self.timings: Dict[str, float] = {}
        self.skipped: Dict[str, bool] = {}
        self.ran: List[str] = []  # stages run by this object: the later ones read their new output

    def key(self, settings: Any, inputs: Iterable[str] = ()) -> str:
        try:
            return stage_key(settings, inputs, self.hashes)
        finally:
            self.hashes.save()

    def _stamp(self, name: str) -> str:
        return os.path.join(self.folder, f"{name}.json")

    def _read(self, path: str) -> Optional[str]:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    def done(self, name: str, key: str, outputs: Sequence[str] = ()) -> bool:
        earlier_ran = any(stage != name for stage in self.ran)
        return (not earlier_ran and self._read(self._stamp(name)) == key
                and all(_present(output) for output in outputs))

    def run(self, name: str, key: str, action: Callable[[], Any], outputs: Sequence[str] = (),
            resumable: bool = False, *, output: Optional[str] = None, moved_in: Sequence[str] = (),
            files: Sequence[str] = ()) -> bool:
        """Run `action` unless stage `name` already finished with `key` and its outputs exist. True if it ran.

        `outputs`: folders the action writes into; they are claimed (created with finmerge's marker)
        before it runs. `moved_in`: folders the action creates itself by moving a finished folder into
        place (mergekit-yaml, the sweep's best merge); they are absent when it starts and marked when it
        ends. `files`: result files. All of them are deleted before a redo (folders only if they carry
        the marker); `resumable` stages (pretraining) keep `outputs` when an interrupted run had the same
        key, to continue from their own checkpoints. `output` is one more entry of `outputs`.
        """
        outputs = [*outputs, *([output] if output else [])]
        everything = [*outputs, *moved_in, *files]
        if self.done(name, key, everything):
            self.log(f"[{name}] up to date, skipped")
            self.skipped[name] = True
            return False
        started = self._stamp(name) + ".started"
        keep = resumable and self._read(started) == key
        for path in everything:
            if not (keep and path in outputs):
                _clear(path)
        if os.path.exists(self._stamp(name)):
            os.remove(self._stamp(name))
        atomic_write_json(started, {"key": key})
        for folder in outputs:
            claim(folder, f"{name} stage output")
        self.log(f"[{name}] running")
        self.ran.append(name)
        start = time.perf_counter()
        action()
        for folder in moved_in:
            if os.path.isdir(folder) and not is_owned(folder):
                # absent before the action (cleared above), so what is there now is what it made
                atomic_write_json(os.path.join(folder, MARKER), {"created_by": "finmerge", "what": f"{name} stage output",
                                                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.timings[name] = time.perf_counter() - start
        self.skipped[name] = False
        atomic_write_json(self._stamp(name), {"key": key, "seconds": self.timings[name]})
        os.remove(started)
        return True
