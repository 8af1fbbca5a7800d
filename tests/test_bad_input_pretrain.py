"""Bad input through the real `finmerge pretrain`: one clear message, exit != 0, no traceback, inputs unchanged,
no output that looks complete. Each case writes its own broken input."""

import os

import pytest

from bad_input import assert_clean_failure, command, invoke, run, snapshot
from pretrain_fixtures import finance_documents, write_jsonl

# one `finmerge pretrain` process per case (each imports transformers): in `make test`, not `make test-fast`


def _yaml(text):
    def make(tmp, base, data):
        path = tmp / "cfg.yml"
        path.write_bytes(text.format(base=base, data=data, out=tmp / "out").encode("utf-8")
                         if isinstance(text, str) else text)
        return [str(path)]
    return make


def _flags(*extra):
    def make(tmp, base, data):
        return ["--model", base, "--data", data, "--output", str(tmp / "out"), *extra]
    return make


def _user_folder(tmp, base, data):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("precious")
    return ["--model", base, "--data", data, "--output", str(tmp / "out"), "--max_steps", "1"]


def _output_is_a_file(tmp, base, data):
    (tmp / "out").write_text("a file")
    return ["--model", base, "--data", data, "--output", str(tmp / "out"), "--max_steps", "1"]


CASES = {
    "malformed yaml": (_yaml("model: [unclosed\n"), "not valid YAML"),
    "non-utf8 yaml": (_yaml(b"model: \xff\xfe\n"), "not valid YAML"),
    "yaml list": (_yaml("- a\n- b\n"), "must be a mapping"),
    "empty yaml": (_yaml(""), "is required"),
    "wrong type": (_yaml("model: {base}\ndata: [{data}]\noutput: {out}\nseq_len: long\n"), "`seq_len` must be an integer"),
    "unknown key": (_yaml("model: {base}\ndata: [{data}]\noutput: {out}\nseq_length: 64\n"), "Did you mean seq_len"),
    "remote code from a file": (_yaml("model: {base}\ndata: [{data}]\noutput: {out}\ntrust_remote_code: true\n"),
                                "--trust-remote-code on the command line"),
    "pickle from a file": (_yaml("model: {base}\ndata: [{data}]\noutput: {out}\nallow_pickle: true\n"),
                           "--allow-pickle on the command line"),
    "renamed flag": (_flags("--warmup-ratio", "0.1"), "--warmup-ratio is now --warmup_steps"),
    "bad choice": (_flags("--optim", "adamw_bogus"), "invalid choice"),
    "missing data path": (lambda tmp, base, data: ["--model", base, "--data", str(tmp / ".." / "nowhere.jsonl"),
                                                   "--output", str(tmp / "out")], "nowhere.jsonl"),
    "user folder as output": (_user_folder, "not empty and holds no finmerge pretrain run"),
    "output is a file": (_output_is_a_file, "exists and is not a folder"),
    "seq_len beyond the model": (_flags("--seq_len", "4096"), "beyond the model's maximum"),
}


def _run_case(case, tiny_family, tmp_path, runner):
    make, mention = CASES[case]
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(20, seed=1))
    args = make(tmp_path, tiny_family.base, data)
    before = snapshot(tiny_family.base, data, *[a for a in args if os.path.exists(a) and a != str(tmp_path / "out")],
                      *([str(tmp_path / "out")] if os.path.exists(tmp_path / "out") else []))
    result = runner(args, tmp_path)
    assert_clean_failure(result, mentions=[mention], before=before, outputs=[tmp_path / "out"])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_cleanly(case, tiny_family, tmp_path):
    """In this process (the real click command): ~1 s a case instead of ~9 s of interpreter start-up."""
    _run_case(case, tiny_family, tmp_path, lambda args, cwd: invoke(["pretrain", *args], cwd=cwd))


@pytest.mark.slow
def test_one_case_through_the_installed_command(tiny_family, tmp_path):
    _run_case("remote code from a file", tiny_family, tmp_path,
              lambda args, cwd: run([command("finmerge"), "pretrain", *args], cwd=cwd))
