"""Bad input to `finmerge diagnose`: each case is generated from a good checkpoint copy, and must end
with one clear message, exit code != 0, no traceback, no input changed and no report written.

Every case runs through the `finmerge` command group in process (click's runner: the same error
handling as the console script, without a 10 s interpreter start per case); the cases marked REAL
also run the installed console script in a subprocess.
"""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_input import assert_clean_failure, command, invoke, run, snapshot
from merge_helpers import copy_model, pickled_copy, shard_in_two

INDEX = "model.safetensors.index.json"
REAL = {"index-dotdot-path", "domain"}


def _diagnose(args, cwd=None, real=False):
    """`finmerge diagnose ARGS`; a result with returncode/stdout/stderr either way."""
    args = ["diagnose", *[str(a) for a in args], "--quiet"]
    if real:
        return run([command("finmerge"), *args], cwd=cwd)
    return invoke(args, cwd=cwd)


def _sharded(folder: str) -> str:
    """The checkpoint as two shards + index (what the index cases then break)."""
    return shard_in_two(folder)


def _write_index(folder: str, data) -> None:
    with open(os.path.join(folder, INDEX), "w") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))


def _weight_map(folder: str) -> dict:
    with open(os.path.join(folder, INDEX)) as handle:
        return json.load(handle)["weight_map"]


def _raw_header(path: str, header_bytes: bytes, declared: int = None) -> None:
    """Replace a safetensors file by a given header (and its declared length) plus its old data."""
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + size)
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes) if declared is None else declared) + header_bytes + data)


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 64)


def _edit_tensor(folder: str, edit) -> None:
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _first_tensor(folder: str) -> str:
    return sorted(load_file(os.path.join(folder, "model.safetensors")))[0]


# (case id, how to break the domain copy, words the message must contain)
CASES = [
    ("index-not-json", lambda f: _write_index(_sharded(f), "{not json"), [INDEX, "fix or remove it"]),
    ("index-empty", lambda f: _write_index(_sharded(f), ""), [INDEX]),
    ("index-non-utf8", lambda f: open(os.path.join(_sharded(f), INDEX), "wb").write(b"\xff\xfe{\x00"), [INDEX]),
    ("index-no-weight-map", lambda f: _write_index(_sharded(f), {"metadata": {}}), [INDEX, "weight_map"]),
    ("index-weight-map-list", lambda f: _write_index(_sharded(f), {"weight_map": ["a", "b"]}), [INDEX]),
    ("index-weight-map-numbers", lambda f: _write_index(_sharded(f), {"weight_map": {"a": 1}}), [INDEX]),
    ("index-missing-shard", lambda f: _write_index(_sharded(f), {"weight_map": {
        **_weight_map(f), "x": "model-00009-of-00009.safetensors"}}), ["model-00009-of-00009.safetensors", "missing shard"]),
    ("index-wrong-shard", lambda f: _write_index(_sharded(f), {"weight_map": {
        **_weight_map(f), "x.weight": "model-00001-of-00002.safetensors"}}), ["x.weight", "does not hold it"]),
    ("index-dotdot-path", lambda f: _write_index(_sharded(f), {"weight_map": {
        **_weight_map(f), "x": "../outside.safetensors"}}), ["../outside.safetensors", "not a file in the model folder"]),
    ("index-absolute-path", lambda f: _write_index(_sharded(f), {"weight_map": {
        **_weight_map(f), "x": "/etc/passwd"}}), ["/etc/passwd", "not a file in the model folder"]),
    ("truncated-weights", lambda f: _truncate(os.path.join(f, "model.safetensors")), ["model.safetensors", "truncated"]),
    ("header-longer-than-file", lambda f: _raw_header(os.path.join(f, "model.safetensors"), b"{}", declared=10 ** 7),
     ["model.safetensors"]),
    ("header-not-json", lambda f: _raw_header(os.path.join(f, "model.safetensors"), b"not json at all"),
     ["model.safetensors", "corrupt"]),
    ("header-zero-length", lambda f: _raw_header(os.path.join(f, "model.safetensors"), b"", declared=0),
     ["model.safetensors", "bad header length"]),
    ("empty-weights-file", lambda f: open(os.path.join(f, "model.safetensors"), "wb").close(),
     ["model.safetensors"]),
    ("unknown-dtype", lambda f: _raw_header(os.path.join(f, "model.safetensors"), json.dumps(
        {"w": {"dtype": "Q4_K", "shape": [1], "data_offsets": [0, 1]}}).encode()), ["Q4_K"]),
    ("offsets-lie", lambda f: _raw_header(os.path.join(f, "model.safetensors"), json.dumps(
        {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}).encode()), ["w", "data offsets"]),
    ("no-weights", lambda f: os.remove(os.path.join(f, "model.safetensors")), ["no *.safetensors weights"]),
    ("nan-in-a-tensor", lambda f: _edit_tensor(f, lambda s: s[_first_tensor(f)].view(-1).__setitem__(0, float("nan"))),
     ["domain model", "NaN"]),
    ("inf-in-a-tensor", lambda f: _edit_tensor(f, lambda s: s[_first_tensor(f)].view(-1).__setitem__(0, float("inf"))),
     ["domain model", "Inf"]),
]


@pytest.mark.parametrize("case,breaker,mentions", CASES, ids=[c[0] for c in CASES])
def test_broken_domain_checkpoint(tiny_family, tmp_path, case, breaker, mentions):
    domain = copy_model(tiny_family.domain, tmp_path / "domain")
    breaker(domain)
    out = tmp_path / "diag"
    before = snapshot(domain, tiny_family.base, tiny_family.instruct)
    result = _diagnose(["--base", tiny_family.base, "--domain", domain, "--instruct", tiny_family.instruct,
                        "--out", out], real=case in REAL)
    assert_clean_failure(result, mentions=["domain model", *mentions], before=before)
    assert not (out / "diagnostics.json").exists()


def test_pickle_only_checkpoint(tiny_family, tmp_path):
    domain = pickled_copy(tiny_family.domain, tmp_path / "domain")
    before = snapshot(domain)
    result = _diagnose(["--base", tiny_family.base, "--domain", domain, "--instruct", tiny_family.instruct,
                        "--out", tmp_path / "diag"])
    assert_clean_failure(result, mentions=["domain model", "pickled"], before=before)


@pytest.mark.parametrize("where", ["domain", "inside-instruct", "cwd"])
def test_report_never_written_into_an_input_or_the_working_folder(tiny_family, tmp_path, where):
    base, domain, instruct = (copy_model(getattr(tiny_family, r), tmp_path / r) for r in ("base", "domain", "instruct"))
    out = {"domain": domain, "inside-instruct": os.path.join(instruct, "reports"), "cwd": str(tmp_path)}[where]
    before = snapshot(base, domain, instruct)
    result = _diagnose(["--base", base, "--domain", domain, "--instruct", instruct, "--out", out],
                       cwd=str(tmp_path), real=where in REAL)
    assert_clean_failure(result, mentions=["diagnostics folder"], before=before)
    assert not os.path.exists(os.path.join(out, "diagnostics.json"))


@pytest.mark.parametrize("value,mentions", [
    ("/nonexistent/model", ["not a checkpoint folder"]),
    ("../../not/a/hub/id", ["not a checkpoint folder"]),
    ("", ["missing model"]),
])
def test_bad_model_argument(tiny_family, tmp_path, value, mentions):
    result = _diagnose(["--base", tiny_family.base, "--domain", value, "--instruct", tiny_family.instruct,
                        "--out", tmp_path / "diag"])
    assert_clean_failure(result, mentions=mentions)


def test_a_file_given_as_model(tiny_family, tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(2)}, str(file))
    result = _diagnose(["--base", tiny_family.base, "--domain", file, "--instruct", tiny_family.instruct,
                        "--out", tmp_path / "diag"])
    assert_clean_failure(result, mentions=["domain model", "not a checkpoint folder"])
