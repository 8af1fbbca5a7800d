"""Corpus reading and cleaning: formats, bad bytes, normalization, exact and near dedup, replay, hold-out."""

import os
import random
import tracemalloc

import pytest

from finmerge.pretrain import cleaning, readers
from finmerge.pretrain.config import PretrainError
from finmerge.pretrain.corpus import (Cleaner, NearDuplicateIndex, SourceReport, StreamNormalizer, holdout_fraction,
                                      lsh_bands, normalize, read_source, resolve_sources, safe_chunks, text_digest)
from finmerge.pretrain.data import interleave_replay
from pretrain_fixtures import corpus_config as _config, normalize_whole as _normalize_whole


def _texts(documents, report):
    """(text, where) of each document read whole, its error counted as the Cleaner counts it."""
    out = []
    for document in documents:
        text = "".join(document.pieces)
        if document.error is not None:
            report.drop(*document.error)
        else:
            out.append((text, document.where))
    return out


def _read_all(paths, **overrides):
    config, report = _config(**overrides), SourceReport()
    texts = _texts((d for s in resolve_sources(paths) for d in read_source(s, config, report)), report)
    return texts, report


def shingles(text: str, size: int) -> set:
    """Oracle: the set of character shingles (the whole text when it is shorter than one)."""
    if len(text) <= size:
        return {text}
    return {text[i:i + size] for i in range(len(text) - size + 1)}


def jaccard(a: str, b: str, size: int) -> float:
    """Exact Jaccard similarity of two texts' character shingle sets (the quantity MinHash estimates)."""
    sa, sb = shingles(a, size), shingles(b, size)
    return len(sa & sb) / len(sa | sb)


def _write_bytes(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


# --- formats ----------------------------------------------------------------------------------------

def test_txt_units(tmp_path):
    path = _write_bytes(tmp_path / "a.txt", b"\xef\xbb\xbffirst para\nline two\n\n\nsecond para\n")
    assert [t for t, _ in _read_all([path])[0]] == ["first para\nline two\n\n\nsecond para\n"]  # BOM stripped
    assert [t for t, _ in _read_all([path], txt_document="paragraph")[0]] == ["first para\nline two\n", "second para\n"]
    lines, _ = _read_all([path], txt_document="line")
    assert [t for t, _ in lines] == ["first para\n", "line two\n", "second para\n"]
    assert [w.rsplit(":", 1)[1] for _, w in lines] == ["1", "2", "5"]


def test_jsonl_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_bytes(tmp_path / "c" / "b.jsonl", b'{"body": "from jsonl", "id": 1}\n\n{"body": "second"}\n')
    pq.write_table(pa.table({"body": ["from parquet", None, "third"]}), tmp_path / "c" / "sub" / "a.parquet"
                   if os.makedirs(tmp_path / "c" / "sub") is None else None)
    _write_bytes(tmp_path / "c" / "notes.md", b"ignored")
    texts, report = _read_all([str(tmp_path / "c")], text_field="body")
    # sorted file order: b.jsonl before sub/a.parquet
    assert [t for t, _ in texts] == ["from jsonl", "second", "from parquet", "third"]
    assert report.dropped == {"missing_field": 1} and report.files == 2


def test_non_utf8_bytes_are_skipped_and_counted_never_fatal(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_bytes(tmp_path / "d" / "bad.txt", b"caf\xe9 latin-1 text")
    _write_bytes(tmp_path / "d" / "good.txt", "caf\u00e9 utf-8 text".encode())
    _write_bytes(tmp_path / "d" / "mixed.jsonl", b'{"text": "ok one"}\n{"text": "bad \xff\xfe"}\n{oops\n[1, 2]\n')
    pq.write_table(pa.table({"text": pa.array([b"fine", b"\xc3\x28 invalid"], type=pa.binary())}), tmp_path / "d" / "p.parquet")
    texts, report = _read_all([str(tmp_path / "d")], txt_document="line")
    assert sorted(t for t, _ in texts) == ["caf\u00e9 utf-8 text", "fine", "ok one"]
    assert report.dropped == {"non_utf8": 3, "bad_json": 2}
    examples = " ".join(report.examples["non_utf8"])
    assert "bad.txt:1 (byte 3)" in examples and "mixed.jsonl:2" in examples and "p.parquet#row2" in examples


def test_unreadable_file_is_counted_not_fatal(tmp_path):
    _write_bytes(tmp_path / "c" / "ok.txt", b"readable text")
    os.symlink(str(tmp_path / "gone.txt"), str(tmp_path / "c" / "dangling.txt"))  # listed, cannot be opened
    texts, report = _read_all([str(tmp_path / "c")])
    assert [t for t, _ in texts] == ["readable text"]
    assert report.dropped == {"unreadable": 1} and "dangling.txt (No such file or directory)" in report.examples["unreadable"][0]


def test_missing_parquet_column_names_file_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(PretrainError, match=r"p.parquet: no column 'text' \(columns: content\); set --text-field"):
        _read_all([str(tmp_path / "p.parquet")])


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "missing.jsonl"), r"--data .*missing.jsonl: no such file or folder"),
    (lambda p: _write_bytes(p / "x.csv", b"a,b"), r"x.csv: unsupported file type"),
    (lambda p: os.makedirs(p / "empty" / "sub") or str(p / "empty"), r"empty: no data files \(.txt, .jsonl, .parquet\)"),
])
def test_bad_source_specs(tmp_path, make, message):
    with pytest.raises(PretrainError, match=message):
        resolve_sources([make(tmp_path)])


def test_datasets_sources_saved_and_load_dataset_streaming(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "saved"))
    _write_bytes(tmp_path / "raw" / "train.jsonl", b'{"text": "streamed one"}\n{"text": "streamed two"}\n')
    sources = resolve_sources([str(tmp_path / "saved"), "dataset:" + str(tmp_path / "raw")])
    assert [s.kind for s in sources] == ["disk", "dataset"]
    texts, _ = _read_all([str(tmp_path / "saved"), "dataset:" + str(tmp_path / "raw")], streaming=True)
    assert [t for t, _ in texts] == ["saved one", "saved two", "streamed one", "streamed two"]
    with pytest.raises(PretrainError, match=r"saved: no column 'body'"):
        _read_all([str(tmp_path / "saved")], text_field="body")


def test_hub_dataset_id_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_sources(["someone/fin-corpus"])[0].kind == "dataset"
    with pytest.raises(PretrainError, match=r"someone/fin-corpus: datasets could not load it \(HF_HUB_OFFLINE"):
        _read_all(["someone/fin-corpus"])


# --- cleaning -----------------------------------------------------------------------------------------

def test_normalize():
    assert normalize("ＡＢＣ　１２３％", nfkc=True, whitespace=False) == "ABC 123%"
    assert normalize("ＡＢＣ", nfkc=False, whitespace=True) == "ＡＢＣ"
    assert normalize("  a \t b  \r\n\r\n\r\n\r\nc   \n", nfkc=False, whitespace=True) == "a b\n\nc"


def _documents(texts, prefix=""):
    for i, text in enumerate(texts):
        document = readers.Document(f"{prefix}{i}")
        document.pieces = iter([text])
        yield document


def test_cleaner_counts_each_reason():
    docs = ["short", "a long enough document about bonds", "a long enough document about bonds",
            "a  long enough   document about bonds", "another long document, quite different text"]
    report = SourceReport()
    kept = list(Cleaner(_config(min_chars=10, near_dedup=False), report)(_documents(docs, "doc")))
    assert [d.text() for d in kept] == [docs[1], docs[4]]
    # whitespace normalization makes doc3 an exact duplicate of doc1
    assert report.dropped == {"too_short": 1, "exact_duplicate": 2}
    assert report.examples["exact_duplicate"] == ["doc2", "doc3"] and report.kept == 2
    report2 = SourceReport()
    kept2 = list(Cleaner(_config(min_chars=10, dedup=False, near_dedup=False, normalize_whitespace=False),
                         report2)(_documents(docs)))
    assert len(kept2) == 4 and report2.dropped == {"too_short": 1}


def _mutate(text, rng, fraction):
    """Replace a share of the words with random ones (controls the Jaccard similarity)."""
    words = text.split()
    for i in rng.sample(range(len(words)), int(len(words) * fraction)):
        words[i] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
    return " ".join(words)


def _article(rng, words=120):
    vocabulary = ["bank", "yield", "bond", "coupon", "equity", "revenue", "yen", "rate", "price", "market",
                  "profit", "loss", "asset", "credit", "risk", "share", "index", "fund", "debt", "cash"]
    return " ".join(rng.choice(vocabulary) + str(rng.randint(0, 99)) for _ in range(words))


def test_minhash_estimates_jaccard():
    rng = random.Random(0)
    index = NearDuplicateIndex(threshold=0.8, shingle_size=5)
    errors = []
    for fraction in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7):
        a = _article(rng)
        b = _mutate(a, rng, fraction)
        exact = jaccard(a, b, 5)
        estimate = index.similarity(index.signature(a), index.signature(b))
        # fed in pieces of 7 characters, a document has the same signature as read whole
        sketch = index.sketch()
        for start in range(0, len(b), 7):
            sketch.update(b[start:start + 7])
        assert (sketch.finish().hashvalues == index.signature(b).hashvalues).all()
        errors.append(abs(exact - estimate))
    # 128 permutations: standard error <= 0.045; allow 3 sigma
    assert max(errors) < 0.135, errors
    assert shingles("abc", 5) == {"abc"} and jaccard("abcdefg", "abcdefg", 3) == 1.0


def test_near_duplicates_removed_distinct_documents_kept():
    rng = random.Random(1)
    originals = [_article(rng) for _ in range(30)]
    near = [_mutate(a, rng, 0.02) for a in originals[:10]]  # J well above 0.85
    far = [_mutate(a, rng, 0.5) for a in originals[10:20]]  # J far below 0.85
    report = SourceReport()
    config = _config(near_dedup_threshold=0.85, min_chars=1)
    kept = [d.text() for d in Cleaner(config, report)(_documents(originals + near + far))]
    # oracle: exact Jaccard against every earlier kept document
    for text in near:
        assert max(jaccard(text, o, 5) for o in originals) >= 0.9
    for text in far:
        assert max(jaccard(text, o, 5) for o in originals) < 0.6
    assert kept == originals + far
    assert report.dropped == {"near_duplicate": 10}


def test_lsh_bands_put_the_s_curve_below_the_threshold():
    for threshold in (0.5, 0.7, 0.85, 0.95):
        bands, rows = lsh_bands(threshold, 128)
        assert bands * rows == 128
        midpoint = (1 / bands) ** (1 / rows)
        assert midpoint <= threshold - 0.1
        # a pair exactly at the threshold becomes a candidate with probability >= 0.99
        assert 1 - (1 - threshold ** rows) ** bands >= 0.99


# --- hold-out and replay -------------------------------------------------------------------------------

def test_holdout_depends_on_text_only():
    texts = [f"document number {i}" for i in range(2000)]
    chosen = {t for t in texts if holdout_fraction(text_digest(t)) < 0.1}
    assert chosen == {t for t in reversed(texts) if holdout_fraction(text_digest(t)) < 0.1}
    assert 150 < len(chosen) < 250  # ~10%


def test_replay_interleave_hits_the_token_ratio():
    rng = random.Random(0)
    domain = [[1] * rng.randint(5, 50) for _ in range(500)]
    replay = [[2] * rng.randint(5, 50) for _ in range(2000)]
    counts = {"domain": 0, "replay": 0, "replay_documents": 0}
    mixed = list(interleave_replay((iter([d]) for d in domain), (iter([r]) for r in replay), 0.25, counts))
    ones, twos = sum(d.count(1) for d in mixed), sum(d.count(2) for d in mixed)
    assert ones == sum(map(len, domain)) and twos == counts["replay"]
    assert abs(twos / (ones + twos) - 0.25) < 0.01
    # the replay is spread through the stream, not dumped at one end
    first_half = mixed[: len(mixed) // 2]
    assert 0.15 < sum(d.count(2) for d in first_half) / sum(map(len, first_half)) < 0.35
    # a short replay corpus runs out: everything it has is used, the domain is untouched
    counts = {"domain": 0, "replay": 0, "replay_documents": 0}
    mixed = list(interleave_replay((iter([d]) for d in domain), (iter([r]) for r in replay[:3]), 0.5, counts))
    assert counts["replay_documents"] == 3 and len(mixed) == 503


def test_a_long_document_in_chunks_keeps_its_place_in_the_replay_mix():
    counts = {"domain": 0, "replay": 0, "replay_documents": 0}
    long_document = iter([[1] * 100, [1] * 100, [1] * 100])  # one document in three chunks
    mixed = list(interleave_replay(iter([long_document, iter([[1] * 10])]), (iter([[2] * 50]) for _ in range(100)),
                                   0.5, counts))
    # replay goes only between documents: the three chunks stay together
    assert mixed[:4] == [[2] * 50, [2] * 50, [1] * 100, [1] * 100] and mixed[4] == [1] * 100
    assert counts["domain"] == 310 and counts["replay"] >= 310  # topped up at the end


# --- streaming: long documents are cut on safe places and give exactly the whole-text result ---------------

def test_streaming_normalization_equals_whole_text_normalization():
    rng = random.Random(0)
    # combining marks, half-width kana + voiced mark, full-width forms, every kind of space and line end
    alphabet = ["a", "b", "Ａ", "１", "\u3000", " ", " ", "\t", "\n", "\n", "\r\n", "\r", "e\u0301", "\u0301",
                "ｶ", "ﾞ", "日", "。", "x", "\u00a8"]
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)]
        size = rng.randint(1, 12)
        chunks = list(safe_chunks(pieces, size))
        assert "".join(c for c, _ in chunks) == text and all(last == (i == len(chunks) - 1) for i, (_, last) in enumerate(chunks))
        for nfkc in (False, True):
            for whitespace in (False, True):
                normalizer = StreamNormalizer(nfkc, whitespace)
                streamed = "".join(normalizer.feed(chunk, last) for chunk, last in chunks)
                assert streamed == _normalize_whole(text, nfkc, whitespace), (text, size)
    assert normalize("ＡＢＣ  x\n\n\n\ny ", nfkc=True, whitespace=True) == "ABC x\n\ny"


def _long_report(path, paragraphs, rng):
    vocabulary = ["bank", "yield", "bond", "coupon", "equity", "revenue", "rate", "price", "円", "株式", "利回り"]
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(paragraphs):
            line = " ".join(rng.choice(vocabulary) + str(rng.randint(0, 9999)) for _ in range(rng.randint(5, 60)))
            handle.write(("  " if rng.random() < 0.2 else "") + line + ("\n\n\n" if rng.random() < 0.3 else "\n"))


def test_a_multi_megabyte_document_streams_in_bounded_memory(tmp_path, monkeypatch):
    """A 2.7 MB .txt read as one document: the cleaned text and digest equal the whole-text ones, while
    Python's peak allocation stays far below the document (the cleaned text waits in a temporary file)."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 1 << 16)
    monkeypatch.setattr(cleaning, "CHUNK_CHARS", 1 << 15)
    monkeypatch.setattr(cleaning, "SPOOL_CHARS", 1 << 18)
    peaks = {}
    for paragraphs in (4000, 8000):  # about 1.3 MB and 2.7 MB
        path = str(tmp_path / f"report{paragraphs}.txt")
        _long_report(path, paragraphs, random.Random(2))
        size = os.path.getsize(path)
        config, report = _config(txt_document="file", near_dedup=False), SourceReport()
        tracemalloc.start()
        kept = list(Cleaner(config, report)(read_source(resolve_sources([path])[0], config, report)))
        peaks[size] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    (small, small_peak), (large, large_peak) = sorted(peaks.items())
    # twice the text, the same peak (pieces, chunks and the in-memory part of the spool are bounded)
    assert large > 1.9 * small and large_peak < 1.2 * small_peak + 100_000 and large_peak < large, peaks
    assert len(kept) == 1 and kept[0].spool.file is not None  # spilled to disk, not held
    with open(path, encoding="utf-8") as handle:
        whole = _normalize_whole(handle.read(), False, True)
    assert kept[0].digest == text_digest(whole) and kept[0].chars == len(whole)
    assert "".join(kept[0].pieces()) == whole


def test_a_streamed_long_document_has_its_whole_text_signature(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_BYTES", 1 << 12)
    monkeypatch.setattr(cleaning, "CHUNK_CHARS", 1 << 11)
    path = str(tmp_path / "report.txt")
    _long_report(path, 1500, random.Random(3))
    with open(path, encoding="utf-8") as handle:
        whole = _normalize_whole(handle.read(), False, True)
    index = NearDuplicateIndex(0.85, 5)
    # exact dedup off: the second read is then caught as a near-duplicate of the first
    config = _config(dedup=False)
    cleaner = Cleaner(config, SourceReport())
    assert len(list(cleaner(read_source(resolve_sources([path])[0], config, SourceReport())))) == 1
    assert (cleaner.near.signatures[0] == index.signature(whole).hashvalues).all()
    assert list(cleaner(read_source(resolve_sources([path])[0], config, SourceReport()))) == []
    assert cleaner.report.dropped == {"near_duplicate": 1}


def test_txt_auto_reads_large_files_by_paragraph(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(readers, "AUTO_PARAGRAPH_BYTES", 100)
    small = _write_bytes(tmp_path / "c" / "a.txt", b"one small file\n\nof two paragraphs\n")
    large = _write_bytes(tmp_path / "c" / "b.txt", b"para one " * 10 + b"\n\n" + b"para two " * 10 + b"\n")
    texts, report = _read_all([str(tmp_path / "c")], txt_document="auto")
    assert [w for _, w in texts] == [small, large + ":1", large + ":3"]
    assert report.txt_units == {"file": 1, "paragraph": 1}
    assert "b.txt: 0.0 MB, read as one document per paragraph (txt_document=auto" in capsys.readouterr().err
    _read_all([large], txt_document="file")
    assert "read as ONE document (txt_document=file)" in capsys.readouterr().err


def test_long_lines_are_read_in_pieces_and_bad_bytes_found_late(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_BYTES", 64)
    line = ("wörd " * 300).encode()  # 1800 bytes, a 2-byte character across many piece borders
    path = _write_bytes(tmp_path / "l.txt", line + b"\n" + line[:-3] + b"\xff end\n\n" + line + b"\n")
    for unit, want in (("line", [(1, True), (2, False), (4, True)]), ("paragraph", [(1, False), (4, True)])):
        texts, report = _read_all([path], txt_document=unit)
        assert [w.rsplit(":", 1)[1] for _, w in texts] == [str(n) for n, ok in want if ok]
        assert all(t == line.decode() + "\n" for t, _ in texts)
        offset = len(line) - 3 if unit == "line" else 2 * len(line) - 2
        assert report.dropped == {"non_utf8": 1} and report.examples["non_utf8"] == [f"{path}:{[n for n, ok in want if not ok][0]} (byte {offset})"]
