"""Readers: each document of a source as a stream of bounded text pieces.

A long document (a 10 MB annual report, a 1 GB corpus.txt read as one file) is never read whole:
.txt files are read in pieces of PIECE_BYTES (long lines too) and decoded incrementally, values from
.jsonl/.parquet/datasets are handed on in slices of PIECE_CHARS. Bad documents are counted in the
SourceReport and skipped, never fatal. Bytes that are not UTF-8 are found while the document streams,
so `Document.error` is only final once its pieces have been read to the end.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from typing import Iterable, Iterator, Optional, Tuple

from .config import PretrainError
from .corpus_report import SourceReport
from .sources import Source

PIECE_BYTES = 1 << 18  # bytes read from a file at a time (the tokenizer sees chunks of about this size)
PIECE_CHARS = 1 << 18  # characters handed on at a time from a string value
AUTO_PARAGRAPH_BYTES = 8 << 20  # txt_document=auto: larger .txt files are read one paragraph per document
PARQUET_BATCH_ROWS = 64  # rows per parquet batch: a batch holds whole values, so keep it small


class Document:
    """One document: where it comes from and its text as pieces (iterate `pieces` once, to the end)."""

    def __init__(self, where: str):
        self.where = where
        self.error: Optional[Tuple[str, str]] = None  # (reason, where) once the document turned out bad
        self.pieces: Iterator[str] = iter(())

    def drain(self) -> None:
        for _ in self.pieces:
            pass


def read_source(source: Source, config, report: SourceReport) -> Iterator[Document]:
    """Each document of a source; bad ones are counted in `report` and skipped (see Document.error)."""
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


# --- .txt ------------------------------------------------------------------------------------------

def txt_unit(path: str, unit: str) -> str:
    """What one document is in this file; `auto` reads files larger than AUTO_PARAGRAPH_BYTES by paragraph."""
    if unit != "auto":
        return unit
    try:
        return "paragraph" if os.path.getsize(path) > AUTO_PARAGRAPH_BYTES else "file"
    except OSError:
        return "file"


def _read_txt(path: str, unit: str, report: SourceReport) -> Iterator[Document]:
    chosen = txt_unit(path, unit)
    report.txt_units[chosen] += 1
    try:
        handle = open(path, "rb")
    except OSError as error:
        report.drop("unreadable", f"{path} ({error.strerror})")
        return
    _say_what_was_done(path, unit, chosen)
    with handle:
        try:
            if chosen == "file":
                document = Document(path)
                document.pieces = _decoded(document, iter(lambda: handle.read(PIECE_BYTES), b""))
                yield document
                document.drain()
                return
            parts = _line_parts(handle)
            for number, part, line_start, line_end in parts:
                if line_start and line_end and not part.strip():
                    continue  # a blank line separates documents
                document = Document(f"{path}:{number}")
                document.pieces = _decoded(document, _unit_parts(part, line_end, parts, chosen))
                yield document
                document.drain()
        except OSError as error:
            report.drop("unreadable", f"{path} ({error.strerror})")


def _say_what_was_done(path: str, asked: str, chosen: str) -> None:
    """A large .txt file is either split by `auto` or kept whole on request: say which, once per file."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size <= AUTO_PARAGRAPH_BYTES:
        return
    if asked == "auto":
        print(f"{path}: {size / 1e6:.1f} MB, read as one document per paragraph (txt_document=auto; "
              f"--txt-document file keeps it one document).", file=sys.stderr)
    elif asked == "file":
        print(f"{path}: {size / 1e6:.1f} MB read as ONE document (txt_document=file): it is held out or trained "
              f"on as a whole; --txt-document paragraph splits it.", file=sys.stderr)


def _line_parts(handle) -> Iterator[Tuple[int, bytes, bool, bool]]:
    """(line number, bytes, starts a line, ends a line): lines, a long one in pieces of PIECE_BYTES."""
    number, line_start = 1, True
    while True:
        part = handle.readline(PIECE_BYTES)
        if not part:
            return
        line_end = part.endswith(b"\n") or len(part) < PIECE_BYTES
        yield number, part, line_start, line_end
        if line_end:
            number += 1
        line_start = line_end


def _unit_parts(first: bytes, line_end: bool, parts: Iterator, unit: str) -> Iterator[bytes]:
    """The bytes of one line or paragraph, starting with `first`, pulled from the shared `parts`."""
    yield first
    if unit == "line":
        while not line_end:
            part = next(parts, None)
            if part is None:
                return
            _, chunk, _, line_end = part
            yield chunk
        return
    for _, chunk, line_start, line_end in parts:
        if line_start and line_end and not chunk.strip():
            return  # blank line: the paragraph ends
        yield chunk


def _decoded(document: Document, chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode UTF-8 incrementally (a character may span two chunks); at a bad byte, record the error and
    read the rest without yielding, so the reader stays in step. A leading BOM is dropped."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset, at_start = 0, True
    for chunk in chunks:
        if document.error is not None:
            continue
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(chunk)
        except UnicodeDecodeError as error:
            document.error = ("non_utf8", f"{document.where} (byte {offset - pending + error.start})")
            continue
        offset += len(chunk)
        if at_start:
            text = text.lstrip("\ufeff")
            at_start = not text
        if text:
            yield text
    if document.error is None:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            document.error = ("non_utf8", f"{document.where} (byte {offset - len(error.object) + error.start})")


def _string_document(value: str, where: str) -> Document:
    document = Document(where)
    document.pieces = (value[i:i + PIECE_CHARS] for i in range(0, len(value), PIECE_CHARS))
    return document


def _bytes_document(value: bytes, where: str) -> Document:
    document = Document(where)
    document.pieces = _decoded(document, (value[i:i + PIECE_BYTES] for i in range(0, len(value), PIECE_BYTES)))
    return document


# --- .jsonl, .parquet, datasets ----------------------------------------------------------------------

def _read_jsonl(path: str, text_field: str, report: SourceReport) -> Iterator[Document]:
    """One JSON object per line. A line is parsed whole (JSON has no streaming parser in the standard
    library), then its text streams on like any other document."""
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
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as error:
                    report.drop("non_utf8", f"{where} (byte {error.start})")
                    continue
                del line
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
                del row, text
                document = _string_document(value, where)
                del value
                yield document
                document.drain()
        except OSError as error:
            report.drop("unreadable", f"{path} ({error.strerror})")


def _read_parquet(path: str, text_field: str, report: SourceReport) -> Iterator[Document]:
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
        for batch in parquet.iter_batches(columns=[text_field], batch_size=PARQUET_BATCH_ROWS):
            column = batch.column(0)
            # Read strings as raw bytes and decode here, so invalid UTF-8 is counted, not fatal.
            if pa.types.is_large_string(column.type):
                column = column.cast(pa.large_binary())
            elif pa.types.is_string(column.type):
                column = column.cast(pa.binary())
            elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
                raise PretrainError(f"{path}: column {text_field!r} holds {column.type}, not text; "
                                    f"point --text-field at a string column.")
            for value in column.to_pylist():
                row += 1
                where = f"{path}#row{row}"
                if value is None:
                    report.drop("missing_field", f"{where} (null)")
                    continue
                document = _bytes_document(value, where)
                yield document
                document.drain()
    except (OSError, pa.ArrowException) as error:
        report.drop("unreadable", f"{path} after row {row} ({error})")


def _read_dataset(source: Source, config, report: SourceReport) -> Iterator[Document]:
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
            document = _bytes_document(value, where)
        elif isinstance(value, str):
            document = _string_document(value, where)
        else:
            report.drop("missing_field", f"{where} (no string field {config.text_field!r})")
            continue
        yield document
        document.drain()
