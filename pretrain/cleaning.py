"""Cleaning a document as it streams: normalize -> min length -> exact dedup -> near dedup.

A document's text passes through in chunks of about CHUNK_CHARS that end on *safe cuts* (below), so
NFKC, whitespace normalization and tokenization of the chunks give exactly what they give on the whole
text. Whether a document is kept, and whether it is held out, depend on its whole normalized text (its
digest, its length, its MinHash), so the cleaned text is kept until the end of the document: in memory
up to SPOOL_CHARS, in a temporary file beyond, and read back in chunks by the tokenizer.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
import unicodedata
from typing import Iterable, Iterator, List, Optional, Tuple

from .corpus_report import SourceReport
from .dedup import NearDuplicateIndex
from .readers import Document

CHUNK_CHARS = 1 << 18  # characters normalized / tokenized at a time
SPOOL_CHARS = 1 << 22  # a cleaned document longer than this waits in a temporary file, not in memory

# A safe cut is right after a newline that is followed by a non-space, or right before a single space
# between two non-spaces. Neither "\n" nor " " takes part in a Unicode composition, a whitespace run is
# never split, and byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen) start a new piece there.
_SAFE_CUT = re.compile(r"(?<=\n)(?=\S)|(?<=\S)(?= \S)")
_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def safe_chunks(pieces: Iterable[str], size: Optional[int] = None) -> Iterator[Tuple[str, bool]]:
    """Re-cut text pieces into (chunk, is_last) of at least `size` characters, each ending on a safe cut.
    Text without any safe cut (no newline, no space between words) stays together until one comes."""
    size = size or CHUNK_CHARS
    parts: List[str] = []
    length = 0
    searched = 0  # characters of the pending text already known to hold no safe cut
    ready: Optional[str] = None
    for piece in pieces:
        if not piece:
            continue
        parts.append(piece)
        length += len(piece)
        if length < size:
            continue
        text = "".join(parts)
        cut = _last_safe_cut(text, max(1, searched - 2))
        if cut is None:
            parts, searched = [text], len(text)
            continue
        if ready is not None:
            yield ready, False
        ready = text[:cut]
        rest = text[cut:]
        parts, length, searched = [rest], len(rest), len(rest)
    if ready is not None:
        yield ready, not length
    if length:
        yield "".join(parts), True


def _last_safe_cut(text: str, start: int) -> Optional[int]:
    """The last safe cut at or after `start` (the last 64K characters are searched first)."""
    window = max(start, len(text) - (1 << 16))
    for begin in ((window, start) if window > start else (start,)):
        cut = None
        for match in _SAFE_CUT.finditer(text, begin):
            cut = match.start()
        if cut:
            return cut
    return None


class StreamNormalizer:
    """Unicode NFKC and whitespace normalization of chunks that end on safe cuts; the concatenated output
    equals `normalize(whole text)`. Whitespace: runs of spaces/tabs become one space, lines are stripped,
    at most one blank line is kept, and the document is stripped."""

    def __init__(self, nfkc: bool, whitespace: bool):
        self.nfkc = nfkc
        self.whitespace = whitespace
        self.started = False  # something was written
        self.newlines = 0  # newlines seen since the last text written
        self.mid_line = False  # the last chunk ended inside a line (before a space)

    def feed(self, chunk: str, last: bool) -> str:
        if self.nfkc:
            chunk = unicodedata.normalize("NFKC", chunk)
        if not self.whitespace:
            return chunk
        lines = chunk.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        tail = lines.pop()  # after the last newline: the start of a line that continues, or the final line
        cleaned = [_SPACES.sub(" ", line).strip() for line in lines]
        if cleaned and self.mid_line:  # the first line continues the previous chunk's last line
            cleaned[0] = _SPACES.sub(" ", lines[0]).rstrip()
        out: List[str] = []
        if cleaned:
            self._write("\n".join(cleaned) + "\n", out)
        if tail:
            if last:
                self.mid_line = self.mid_line and not lines
                tail = _SPACES.sub(" ", tail).rstrip()
                if not self.mid_line:
                    tail = tail.lstrip()
                self._write(tail, out)
            else:
                continues = self.mid_line and not lines
                tail = _SPACES.sub(" ", tail)
                self._write(tail if continues else tail.lstrip(), out)
                self.mid_line = True
        elif cleaned or lines:
            self.mid_line = False
        return "".join(out)

    def _write(self, text: str, out: List[str]) -> None:
        core = text.strip("\n")
        if not core:
            self.newlines += len(text)
            return
        self.newlines += len(text) - len(text.lstrip("\n"))
        if self.started and self.newlines:
            out.append("\n" * min(self.newlines, 2))
        out.append(_BLANKS.sub("\n\n", core))
        self.started = True
        self.newlines = len(text) - len(text.rstrip("\n"))


def normalize(text: str, nfkc: bool, whitespace: bool) -> str:
    normalizer = StreamNormalizer(nfkc, whitespace)
    return "".join(normalizer.feed(chunk, last) for chunk, last in safe_chunks([text]))


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def holdout_fraction(digest: bytes) -> float:
    """A stable number in [0, 1) from the text's digest: documents below eval_fraction are held out."""
    return int.from_bytes(digest, "big") / 2.0 ** 64


class TextSpool:
    """The cleaned text of one document between the two passes: a list of chunks in memory, spilled to
    a temporary file once longer than SPOOL_CHARS."""

    def __init__(self, limit: Optional[int] = None):
        self.limit = limit or SPOOL_CHARS
        self.chunks: List[str] = []
        self.length = 0
        self.file = None

    def write(self, text: str) -> None:
        self.length += len(text)
        if self.file is not None:
            self.file.write(text)
            return
        self.chunks.append(text)
        if self.length > self.limit:
            self.file = tempfile.TemporaryFile("w+", encoding="utf-8", newline="")
            for chunk in self.chunks:
                self.file.write(chunk)
            self.chunks = []

    def pieces(self, size: Optional[int] = None) -> Iterator[str]:
        size = size or CHUNK_CHARS
        if self.file is None:
            yield from self.chunks
            return
        self.file.seek(0)
        yield from iter(lambda: self.file.read(size), "")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.chunks = []


class CleanDocument:
    """A kept document: where it came from, the digest of its cleaned text, and the text itself."""

    def __init__(self, where: str, digest: bytes, spool: TextSpool):
        self.where = where
        self.digest = digest
        self.spool = spool

    @property
    def chars(self) -> int:
        return self.spool.length

    @property
    def long(self) -> bool:
        """Tokenized in chunks (anything larger than one chunk)."""
        return self.spool.length > CHUNK_CHARS

    def text(self) -> str:
        return "".join(self.spool.pieces())

    def pieces(self) -> Iterator[str]:
        try:
            yield from self.spool.pieces()
        finally:
            self.spool.close()


class Cleaner:
    """normalize -> min length -> exact dedup -> near dedup; yields the kept documents as CleanDocument."""

    def __init__(self, config, report: SourceReport):
        self.config = config
        self.report = report
        self.seen: set = set()
        self.near = NearDuplicateIndex(config.near_dedup_threshold, config.shingle_chars) if config.near_dedup else None

    def __call__(self, documents: Iterable[Document]) -> Iterator[CleanDocument]:
        config = self.config
        for document in documents:
            normalizer = StreamNormalizer(config.nfkc, config.normalize_whitespace)
            digest = hashlib.blake2b(digest_size=8)
            sketch = self.near.sketch() if self.near is not None else None
            spool = TextSpool()
            content = False  # any non-whitespace character
            for chunk, last in safe_chunks(document.pieces):
                text = normalizer.feed(chunk, last)
                if not text:
                    continue
                digest.update(text.encode("utf-8"))
                content = content or not text.isspace()
                if sketch is not None:
                    sketch.update(text)
                spool.write(text)
            if document.error is not None:
                spool.close()
                self.report.drop(*document.error)
                continue
            if spool.length < config.min_chars or not content:
                spool.close()
                self.report.drop("too_short", document.where)
                continue
            key = digest.digest()
            if config.dedup:
                if key in self.seen:
                    spool.close()
                    self.report.drop("exact_duplicate", document.where)
                    continue
                self.seen.add(key)
            if sketch is not None and self.near.is_duplicate_then_add(sketch.finish()):
                spool.close()
                self.report.drop("near_duplicate", document.where)
                continue
            self.report.kept += 1
            self.report.chars += spool.length
            yield CleanDocument(document.where, key, spool)
