"""File contents by sha256, each version of a file read once.

Stage keys (finmerge reproduce) and the pretrain run's identity (base model and corpus) both name files
by their content. A digest is remembered by the file's (size, mtime_ns, ctime_ns, inode): ctime changes
whenever a file is written or replaced, even when its mtime is set back, so a swapped-in file is hashed
again. The memory is shared by everything in one process (so a `reproduce` reads a 14B base's 28 GB
once, not once for the stage key and again for the pretrain fingerprint), and a `HashCache` with a
folder also keeps it across runs in that folder's `hashes.json`.

A file in a Hugging Face cache's `blobs/` folder is named by its content's sha256: that name is the
digest, without reading the file.
"""

import hashlib
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

_SHA256 = re.compile(r"[0-9a-f]{64}")
# real path -> (stat key, sha256): every digest this process computed
_SEEN: Dict[str, Tuple[List[int], str]] = {}


def stat_key(path: str) -> List[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def file_sha256(path: str, stat: Optional[List[int]] = None) -> str:
    """The sha256 of the file at `path` (links followed); read only if this version was not hashed before."""
    real = os.path.realpath(path)
    name = os.path.basename(real)
    if os.path.basename(os.path.dirname(real)) == "blobs" and _SHA256.fullmatch(name):
        return name
    stat = stat or stat_key(real)
    seen = _SEEN.get(real)
    if seen and seen[0] == stat:
        return seen[1]
    with open(real, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    _SEEN[real] = (stat, digest)
    return digest


class HashCache:
    """Digests remembered across runs in `<folder>/hashes.json` (by path and stat key); `None`: this process only."""

    def __init__(self, folder: Optional[str] = None):
        self.path = os.path.join(folder, "hashes.json") if folder else None
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.changed = False
        if self.path:
            try:
                with open(self.path, encoding="utf-8") as handle:
                    loaded = json.load(handle)
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # a missing or damaged cache only costs re-hashing

    def digest(self, path: str) -> str:
        stat = stat_key(path)
        entry = self.entries.get(path)
        if isinstance(entry, dict) and entry.get("stat") == stat:
            return entry["sha256"]
        digest = file_sha256(path, stat)  # os.stat follows links: the stat of the file read
        self.entries[path] = {"stat": stat, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        from finmerge.safety.outputs import atomic_write_json

        if self.path and self.changed:
            self.entries = {path: entry for path, entry in self.entries.items() if os.path.exists(path)}
            atomic_write_json(self.path, self.entries, indent=None)
            self.changed = False
