"""Reading and cleaning the corpus: local .txt/.jsonl/.parquet files and folders, `datasets` sources.

Everything is a generator: a corpus is read once, document by document, so its size is bounded by
disk, not memory (the deduplication indexes keep 8 bytes per document and 512 bytes per document
for near-duplicates). Bad documents are skipped and counted per reason, never fatal; the caller
turns "nothing left" into an error that names the reasons.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from .config import PretrainConfig, PretrainError

FILE_TYPES = (".txt", ".jsonl", ".parquet")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
EXAMPLES = 3

# Why a document was dropped, as written in reports and errors.
REASONS = {
    "unreadable": "file could not be read",
    "non_utf8": "bytes that are not UTF-8",
    "bad_json": "line is not a JSON object",
    "missing_field": "no string in the text field",
    "too_short": "shorter than min_chars after normalization",
    "exact_duplicate": "exact duplicate of an earlier document",
    "near_duplicate": "near-duplicate of an earlier document",
}


@dataclass(frozen=True)
class Source:
    kind: str  # "file" | "disk" (datasets save_to_disk folder) | "dataset" (datasets.load_dataset)
    path: str
    spec: str  # what the user wrote


class SourceReport:
    """Counts for one corpus (domain or replay): documents seen, kept, dropped per reason, with examples."""

    def __init__(self):
        self.kept = 0
        self.chars = 0
        self.dropped: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)
        self.files = 0

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append(where)

    @property
    def seen(self) -> int:
        return self.kept + sum(self.dropped.values())

    def as_dict(self) -> Dict:
        return {
            "files": self.files, "documents_seen": self.seen, "documents_kept": self.kept, "chars_kept": self.chars,
            "dropped": dict(sorted(self.dropped.items())), "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def describe_drops(self, config: PretrainConfig) -> str:
        if not self.dropped:
            return "nothing was dropped"
        parts = []
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            detail = REASONS.get(reason, reason)
            if reason == "too_short":
                detail = f"shorter than min_chars={config.min_chars} after normalization"
            if reason == "near_duplicate":
                detail = f"near-duplicate (Jaccard >= {config.near_dedup_threshold}) of an earlier document"
            parts.append(f"{reason}: {count} ({detail}; e.g. {', '.join(self.examples[reason])})")
        return "; ".join(parts)


# --- sources ------------------------------------------------------------------------------------

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
        elif HUB_ID.match(spec) and "/" in spec:
            sources.append(Source("dataset", spec, spec))
        else:
            raise PretrainError(f"--{option} {spec}: no such file or folder.")
    return sources


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def source_identity(sources: List[Source], config: PretrainConfig) -> List[Dict]:
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
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as error:
        return f"unreadable:{error.errno}"
    return digest.hexdigest()


# --- readers ------------------------------------------------------------------------------------

def read_source(source: Source, config: PretrainConfig, report: SourceReport) -> Iterator[Tuple[str, str]]:
    """Yield (text, where) for each document of a source; bad ones are counted in `report` and skipped."""
    report.files += 1
    if source.kind == "file":
        lower = source.path.lower()
        if lower.endswith(".txt"):
            yield from _read_txt(source.path, config.txt_document, report)
        elif lower.endswith(".jsonl"):
            yield from _read_jsonl(source.path, config.text_field, report)
        else:
            yield from _read_parquet(source.path, config.text_field, report)
    else:
        yield from _read_dataset(source, config, report)


def _decode(raw: bytes, where: str, report: SourceReport) -> Optional[str]:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        report.drop("non_utf8", f"{where} (byte {error.start})")
        return None


def _read_txt(path: str, unit: str, report: SourceReport) -> Iterator[Tuple[str, str]]:
    try:
        handle = open(path, "rb")
    except OSError as error:
        report.drop("unreadable", f"{path} ({error.strerror})")
        return
    with handle:
        try:
            if unit == "file":
                text = _decode(handle.read(), path, report)
                if text is not None:
                    yield text.lstrip("\ufeff"), path
                return
            lines: List[bytes] = []
            first = 1
            for number, line in enumerate(handle, 1):
                if unit == "line":
                    if line.strip():
                        text = _decode(line, f"{path}:{number}", report)
                        if text is not None:
                            yield text.lstrip("\ufeff"), f"{path}:{number}"
                    continue
                if line.strip():
                    if not lines:
                        first = number
                    lines.append(line)
                elif lines:
                    text = _decode(b"".join(lines), f"{path}:{first}", report)
                    if text is not None:
                        yield text.lstrip("\ufeff"), f"{path}:{first}"
                    lines = []
            if lines:
                text = _decode(b"".join(lines), f"{path}:{first}", report)
                if text is not None:
                    yield text.lstrip("\ufeff"), f"{path}:{first}"
        except OSError as error:
            report.drop("unreadable", f"{path} ({error.strerror})")


def _read_jsonl(path: str, text_field: str, report: SourceReport) -> Iterator[Tuple[str, str]]:
    try:
        handle = open(path, "rb")
    except OSError as error:
        report.drop("unreadable", f"{path} ({error.strerror})")
        return
    with handle:
        try:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                text = _decode(line, where, report)
                if text is None:
                    continue
                try:
                    row = json.loads(text)
                except ValueError:
                    report.drop("bad_json", where)
                    continue
                if not isinstance(row, dict):
                    report.drop("bad_json", where)
                    continue
                value = row.get(text_field)
                if not isinstance(value, str):
                    report.drop("missing_field", f"{where} (no string field {text_field!r}; keys: {sorted(row)[:8]})")
                    continue
                yield value, where
        except OSError as error:
            report.drop("unreadable", f"{path} ({error.strerror})")


def _read_parquet(path: str, text_field: str, report: SourceReport) -> Iterator[Tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        report.drop("unreadable", f"{path} ({error})")
        return
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise PretrainError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set --text-field.")
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            column = batch.column(0)
            # Read strings as raw bytes and decode here, so invalid UTF-8 is counted, not fatal.
            if pa.types.is_large_string(column.type):
                column = column.cast(pa.large_binary())
            elif pa.types.is_string(column.type):
                column = column.cast(pa.binary())
            elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                raise PretrainError(f"{path}: column {text_field!r} holds {column.type}, not text.")
            for value in column.to_pylist():
                row += 1
                where = f"{path}#row{row}"
                if value is None:
                    report.drop("missing_field", f"{where} (null)")
                    continue
                text = _decode(value, where, report)
                if text is not None:
                    yield text, where
    except (OSError, pa.ArrowException) as error:
        report.drop("unreadable", f"{path} after row {row} ({error})")


def _read_dataset(source: Source, config: PretrainConfig, report: SourceReport) -> Iterator[Tuple[str, str]]:
    import datasets

    try:
        if source.kind == "disk":
            loaded = datasets.load_from_disk(source.path)
            if isinstance(loaded, datasets.DatasetDict):
                if config.dataset_split not in loaded:
                    raise PretrainError(f"{source.spec}: no split {config.dataset_split!r} "
                                        f"(splits: {', '.join(loaded)}); set --dataset-split.")
                loaded = loaded[config.dataset_split]
            if config.streaming:
                loaded = loaded.to_iterable_dataset()
        else:
            loaded = datasets.load_dataset(source.path, config.dataset_config, split=config.dataset_split,
                                           streaming=config.streaming)
    except PretrainError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        offline = " (HF_HUB_OFFLINE is set: hub ids cannot be fetched)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise PretrainError(f"{source.spec}: datasets could not load it{offline}: {type(error).__name__}: {error}") from None
    columns = loaded.column_names
    if columns is not None and config.text_field not in columns:
        raise PretrainError(f"{source.spec}: no column {config.text_field!r} (columns: {', '.join(columns)}); "
                            f"set --text-field.")
    for number, row in enumerate(loaded):
        value = row.get(config.text_field)
        where = f"{source.spec}#row{number + 1}"
        if isinstance(value, bytes):
            value = _decode(value, where, report)
            if value is None:
                continue
        if not isinstance(value, str):
            report.drop("missing_field", f"{where} (no string field {config.text_field!r})")
            continue
        yield value, where


# --- cleaning -----------------------------------------------------------------------------------

_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize(text: str, nfkc: bool, whitespace: bool) -> str:
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANKS.sub("\n\n", text).strip()
    return text


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def holdout_fraction(digest: bytes) -> float:
    """A stable number in [0, 1) from the text's digest: documents below eval_fraction are held out."""
    return int.from_bytes(digest, "big") / 2.0 ** 64


class Cleaner:
    """normalize -> min length -> exact dedup -> near dedup; yields (text, digest) of kept documents."""

    def __init__(self, config: PretrainConfig, report: SourceReport):
        self.config = config
        self.report = report
        self.seen: set = set()
        self.near = NearDuplicateIndex(config.near_dedup_threshold, config.shingle_chars) if config.near_dedup else None

    def __call__(self, documents: Iterator[Tuple[str, str]]) -> Iterator[Tuple[str, bytes]]:
        config = self.config
        for text, where in documents:
            text = normalize(text, config.nfkc, config.normalize_whitespace)
            if len(text) < config.min_chars or not text.strip():
                self.report.drop("too_short", where)
                continue
            digest = text_digest(text)
            if config.dedup:
                if digest in self.seen:
                    self.report.drop("exact_duplicate", where)
                    continue
                self.seen.add(digest)
            if self.near is not None and self.near.is_duplicate_then_add(text):
                self.report.drop("near_duplicate", where)
                continue
            self.report.kept += 1
            self.report.chars += len(text)
            yield text, digest


# --- near-duplicates: MinHash + LSH ---------------------------------------------------------------

_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def shingles(text: str, size: int) -> set:
    if len(text) <= size:
        return {text}
    return {text[i:i + size] for i in range(len(text) - size + 1)}


def jaccard(a: str, b: str, size: int) -> float:
    """Exact Jaccard similarity of two texts' character shingle sets (the quantity MinHash estimates)."""
    sa, sb = shingles(a, size), shingles(b, size)
    return len(sa & sb) / len(sa | sb)


def lsh_bands(threshold: float, num_perm: int) -> Tuple[int, int]:
    """(bands, rows): the most rows per band whose S-curve midpoint (1/b)^(1/r) lies at or below the
    threshold, so that pairs at the threshold become candidates with high probability; candidates
    are then confirmed by their estimated Jaccard, so a low midpoint costs time, not accuracy."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        if (1.0 / bands) ** (1.0 / rows) <= threshold - 0.1:
            best = (bands, rows)
    return best


class NearDuplicateIndex:
    """MinHash signatures in LSH buckets. Each of the 128 hash functions is the splitmix64 finalizer of
    (crc32 of the shingle) XOR a random 64-bit seed: a strong mixer, so the 128 minima are close to
    independent. (A linear `a*x+b mod p` with small a is nearly monotone in x, and its minima all
    pick the same shingles: estimates were off by 0.3.)

    A document is a near-duplicate when some earlier document shares an LSH band with it and the
    share of equal signature entries (the MinHash estimate of Jaccard) is >= threshold.
    """

    def __init__(self, threshold: float, shingle_size: int = 5, num_perm: int = 128, seed: int = 1):
        import numpy as np

        self.np = np
        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        rng = np.random.default_rng(seed)
        self.seeds = rng.integers(0, 2 ** 64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)
        self.bands, self.rows = lsh_bands(threshold, num_perm)
        self.buckets: List[Dict[bytes, List[int]]] = [dict() for _ in range(self.bands)]
        self.signatures: List = []

    def signature(self, text: str):
        np = self.np
        hashed = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles(text, self.shingle_size)), dtype=np.uint64)
        z = hashed[:, None] ^ self.seeds[None, :]
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as splitmix64 intends
            z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
            z = z ^ (z >> np.uint64(31))
        return (z.min(axis=0) >> np.uint64(32)).astype(np.uint32)

    def similarity(self, first, second) -> float:
        return float((first == second).mean())

    def is_duplicate_then_add(self, text: str) -> bool:
        signature = self.signature(text)
        keys = [signature[i * self.rows:(i + 1) * self.rows].tobytes() for i in range(self.bands)]
        checked = set()
        for band, key in enumerate(keys):
            for other in self.buckets[band].get(key, ()):
                if other not in checked:
                    checked.add(other)
                    if self.similarity(signature, self.signatures[other]) >= self.threshold:
                        return True
        index = len(self.signatures)
        self.signatures.append(signature)
        for band, key in enumerate(keys):
            self.buckets[band].setdefault(key, []).append(index)
        return False
