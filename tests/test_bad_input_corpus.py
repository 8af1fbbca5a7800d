"""Bad corpora through `finmerge pretrain`: one clear message naming the file, exit != 0, no traceback,
the corpus untouched, and no output that looks like a finished run. Every case is generated here.

Each case runs the `finmerge` command group in-process (click's runner: the same error handling as the
console script, without paying the torch/transformers start-up per case); a few also run as a real
subprocess of the installed `finmerge` script."""

import json
import os

import pytest

from bad_input import assert_clean_failure, command, invoke, run, snapshot


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


def _parquet(path, table):
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    pq.write_table(table, str(path))
    return str(path)


def _jsonl(path, rows):
    return _write(path, b"".join(json.dumps(r).encode() + b"\n" for r in rows))


def _empty_txt(d):
    return _write(d / "empty.txt", b""), ["empty.txt", "too_short"]


def _blank_txt(d):
    return _write(d / "blank.txt", b"  \n\n\t\n\xef\xbb\xbf\n"), ["blank.txt", "too_short"]


def _latin1_txt(d):
    return _write(d / "latin1.txt", "Bénéfice net du trimestre: 12 millions d'euros.\n".encode("latin-1")), \
        ["latin1.txt", "non_utf8", "byte 1"]


def _latin1_lines(d):
    return _write(d / "c" / "lines.txt", "Rendement élevé des obligations d'État.\n".encode("latin-1") * 3), \
        ["lines.txt", "non_utf8"]


def _utf16_txt(d):
    return _write(d / "utf16.txt", "社債の利回りは上昇した。".encode("utf-16")), ["utf16.txt", "non_utf8"]


def _jsonl_wrong_types(d):
    return _jsonl(d / "types.jsonl", [{"text": 5}, {"text": ["a list"]}, {"text": None}, {"text": {"x": 1}}]), \
        ["types.jsonl", "missing_field", "no string field 'text'"]


def _jsonl_missing_field(d):
    return _jsonl(d / "body.jsonl", [{"body": "Quarterly revenue rose by ten percent."}] * 3), \
        ["body.jsonl", "missing_field", "keys: ['body']"]


def _jsonl_not_objects(d):
    return _write(d / "arrays.jsonl", b'[1, 2]\n"just a string"\n{oops\n'), ["arrays.jsonl", "bad_json"]


def _jsonl_non_utf8(d):
    return _write(d / "bytes.jsonl", b'{"text": "caf\xe9 au lait, long enough text"}\n'), ["bytes.jsonl", "non_utf8"]


def _jsonl_huge_broken_line(d):
    return _write(d / "huge.jsonl", b'{"text": "' + b"bond yield " * 300_000 + b'\n'), ["huge.jsonl", "bad_json"]


def _txt_huge_line_bad_tail(d):
    return _write(d / "huge.txt", b"bond yield " * 300_000 + b"\xff\n"), ["huge.txt", "non_utf8", "byte 3300000"]


def _parquet_without_text(d):
    import pyarrow as pa

    return _parquet(d / "p.parquet", pa.table({"body": ["A long enough financial text."]})), \
        ["p.parquet", "no column 'text'", "--text-field"]


def _parquet_number_column(d):
    import pyarrow as pa

    return _parquet(d / "n.parquet", pa.table({"text": [1, 2, 3]})), ["n.parquet", "holds int64, not text"]


def _parquet_corrupt(d):
    return _write(d / "broken.parquet", b"PAR1 this is not really parquet"), ["broken.parquet", "unreadable"]


def _dangling_symlink_outside(d):
    os.makedirs(d / "linked")
    os.symlink("/nonexistent-finmerge-target/corpus.txt", str(d / "linked" / "corpus.txt"))
    return str(d / "linked"), ["corpus.txt", "unreadable"]


def _symlink_to_folder_outside_without_data(d):
    outside = d.parent / (d.name + "-outside")
    _write(outside / "notes.md", b"# not a corpus")
    os.symlink(str(outside), str(d / "elsewhere"))
    return str(d / "elsewhere"), ["elsewhere", "no data files"]


def _folder_without_supported_files(d):
    _write(d / "corpus" / "a.csv", b"text\nhello\n")
    _write(d / "corpus" / "sub" / "b.md", b"# readme")
    return str(d / "corpus"), ["corpus", "no data files (.txt, .jsonl, .parquet)"]


def _unsupported_file(d):
    return _write(d / "corpus.csv", b"text\nhello world\n"), ["corpus.csv", "unsupported file type"]


def _missing_path(d):
    return str(d / "no-such-corpus.jsonl"), ["no-such-corpus.jsonl", "no such file or folder"]


def _all_too_short(d):
    return _write(d / "short.txt", b"a\n\nb\n\nc\n"), ["short.txt", "too_short"]


CASES = [_empty_txt, _blank_txt, _latin1_txt, _latin1_lines, _utf16_txt, _jsonl_wrong_types, _jsonl_missing_field,
         _jsonl_not_objects, _jsonl_non_utf8, _jsonl_huge_broken_line, _txt_huge_line_bad_tail, _parquet_without_text,
         _parquet_number_column, _parquet_corrupt, _dangling_symlink_outside, _symlink_to_folder_outside_without_data,
         _folder_without_supported_files, _unsupported_file, _missing_path, _all_too_short]


def _in_process(args):
    return invoke(args)


SUBPROCESS_CASES = {_latin1_txt, _parquet_without_text}


def _mark(make):
    # a real subprocess pays the torch/transformers start-up: slow on a shared 2-core machine
    return pytest.param(make, marks=pytest.mark.slow) if make in SUBPROCESS_CASES else make


@pytest.mark.parametrize("make", [_mark(c) for c in CASES], ids=[c.__name__.strip("_") for c in CASES])
def test_bad_corpus_fails_cleanly(tiny_family, tmp_path, make, monkeypatch):
    monkeypatch.delenv("FINMERGE_DEBUG", raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data, mentions = make(data_dir)
    extra = ["--txt-document", "line"] if data.endswith("lines.txt") else []
    out = tmp_path / "out"
    before = snapshot(str(data_dir))
    args = ["pretrain", "--model", tiny_family.base, "--data", data, "--output", str(out), "--max-steps", "1",
            "--seq-len", "16", *extra]
    result = run([command("finmerge"), *args]) if make in SUBPROCESS_CASES else _in_process(args)
    message = assert_clean_failure(result, mentions=mentions, before=before, outputs=[str(out)])
    assert not os.path.exists(out) or not os.listdir(out), f"output left behind: {os.listdir(out)}"
    # one paragraph: a single "Error: ..." line (progress bars aside)
    errors = [line for line in message.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), message
