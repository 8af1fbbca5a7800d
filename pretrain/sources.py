"""Where the corpus comes from: files, folders, `datasets` folders and dataset names, and their identity."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, List

from finmerge.safety.hashes import file_sha256
from finmerge.safety.hub import is_hub_id

from .config import PretrainError

FILE_TYPES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Source:
    kind: str  # "file" | "disk" (datasets save_to_disk folder) | "dataset" (datasets.load_dataset)
    path: str
    spec: str  # what the user wrote


def resolve_sources(specs: List[str], option: str = "data") -> List[Source]:
    """Expand files/folders/dataset names into sources; errors name the spec and what was expected."""
    sources: List[Source] = []
    for spec in specs:
        if spec.startswith("dataset:"):
            name = spec[len("dataset:"):]
            if os.path.isdir(name) and _is_saved_dataset(name):
                sources.append(Source("disk", name, spec))
            else:
                sources.append(Source("dataset", name, spec))
            continue
        path = os.path.expanduser(spec)
        if os.path.isfile(path):
            if not path.lower().endswith(FILE_TYPES):
                raise PretrainError(f"--{option} {spec}: unsupported file type (use {', '.join(FILE_TYPES)}, "
                                    f"or dataset:PATH for other formats datasets can load).")
            sources.append(Source("file", path, spec))
        elif os.path.isdir(path):
            if _is_saved_dataset(path):
                sources.append(Source("disk", path, spec))
                continue
            found = sorted(
                os.path.join(root, name)
                for root, dirs, names in os.walk(path)
                for name in names
                if name.lower().endswith(FILE_TYPES) and not name.startswith(".")
            )
            if not found:
                raise PretrainError(f"--{option} {spec}: no data files ({', '.join(FILE_TYPES)}) in this folder "
                                    f"or its subfolders.")
            sources.extend(Source("file", f, spec) for f in found)
        elif "/" in spec and is_hub_id(spec):  # a bare word is more likely a mistyped file than a dataset
            sources.append(Source("dataset", spec, spec))
        else:
            raise PretrainError(f"--{option} {spec}: no such file or folder.")
    return sources


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def source_identity(sources: List[Source], config) -> List[Dict]:
    """Content identity of the sources for the run fingerprint (file hashes; dataset names as given)."""
    identity = []
    for source in sources:
        if source.kind == "file":
            identity.append({"file": os.path.basename(source.path), "sha256": _file_hash(source.path)})
        elif source.kind == "disk":
            digest = hashlib.sha256()
            for root, _, names in sorted(os.walk(source.path)):
                for name in sorted(names):
                    digest.update(name.encode())
                    digest.update(_file_hash(os.path.join(root, name)).encode())
            identity.append({"saved_dataset": os.path.basename(os.path.normpath(source.path)), "sha256": digest.hexdigest()})
        else:
            identity.append({"dataset": source.path, "config": config.dataset_config, "split": config.dataset_split})
    return identity


def _file_hash(path: str) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        return f"unreadable:{error.errno}"
