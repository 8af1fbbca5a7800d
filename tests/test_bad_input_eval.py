"""Bad input to `finmerge eval`: one clear message, exit != 0, no traceback, no input changed, no results file.

The cases run the command in this process (`invoke`); one runs the installed console script."""

import shutil

import pytest
import torch

from bad_input import assert_clean_failure, command, invoke, run, snapshot

GOOD_QA = '{"question": "What is the ticker of Aurora Bank?", "answer": "ARB."}\n'


def _qa(content):
    return ("qa.jsonl", content, ["--qa"])


def _text(content, name="held.txt"):
    return (name, content, ["--text"])


# (case id, (file name, content, option) or None, what the message must name)
DATA_CASES = [
    ("qa-malformed-line", _qa(GOOD_QA + '{"question": "q", "answer": \n'), ["qa.jsonl:2", "not valid JSON"]),
    ("qa-not-an-object", _qa('["q", "a"]\n'), ["qa.jsonl:1", "expected a JSON object"]),
    ("qa-question-wrong-type", _qa('{"question": 5, "answer": "a"}\n'), ["qa.jsonl:1", "'question'"]),
    ("qa-choices-wrong-type", _qa('{"question": "q", "answer": "a", "choices": "a,b"}\n'), ["qa.jsonl:1", "'choices' must be a list"]),
    ("qa-answer-not-a-choice", _qa('{"question": "q", "answer": "c", "choices": ["a", "b"]}\n'), ["qa.jsonl:1", "not one of the choices"]),
    ("qa-not-utf8", _qa(b'{"question": "caf\xe9", "answer": "a"}\n'), ["qa.jsonl", "not UTF-8"]),
    ("qa-empty", _qa(""), ["qa.jsonl", "holds no questions"]),
    ("text-not-utf8", _text(b"Aurora \xff\xfe Bank\n"), ["held.txt", "not UTF-8"]),
    ("text-empty", _text("\n\n  \n"), ["held.txt", "holds no documents"]),
    ("text-jsonl-without-text", _text('{"body": "x"}\n', "held.jsonl"), ["held.jsonl:1", "'text' string"]),
    ("text-jsonl-text-wrong-type", _text('{"text": 3}\n', "held.jsonl"), ["held.jsonl:1", "'text' string"]),
]


@pytest.mark.parametrize("case,data,mentions", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tiny_family, tmp_path, case, data, mentions):
    name, content, option = data
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(str(tmp_path), tiny_family.base)
    result = invoke(["eval", tiny_family.base, *option, path, "--out", tmp_path / "out" / "r.json"])
    assert_clean_failure(result, mentions=mentions, before=before)
    assert not (tmp_path / "out" / "r.json").exists()


def test_missing_qa_file(tiny_family, tmp_path):
    result = run([command("finmerge"), "eval", tiny_family.base, "--qa", tmp_path / "nowhere.jsonl"])
    assert_clean_failure(result, mentions=["nowhere.jsonl does not exist"])


def _model_without_weights(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))


def _config_not_json(source, target):
    shutil.copytree(source, target)
    (target / "config.json").write_text("{not json")


MODEL_CASES = [
    ("model-folder-missing", None, ["model folder(s) not found"]),
    ("model-without-weights", _model_without_weights, ["holds no weights"]),
    ("config-not-json", _config_not_json, ["config.json", "not a valid JSON"]),
]


@pytest.mark.parametrize("case,make,mentions", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(tiny_family, tmp_path, case, make, mentions):
    model = tmp_path / "model"
    if make:
        make(tiny_family.base, model)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(GOOD_QA)
    before = snapshot(str(tmp_path))
    result = invoke(["eval", model, "--qa", qa, "--out", tmp_path / "r.json"])
    assert_clean_failure(result, mentions=[str(model), *mentions], before=before)
    assert not (tmp_path / "r.json").exists()


def _not_a_clone(tmp_path):
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "README.md").write_text("not the harness")
    return [tmp_path / "harness"]


def _unknown_task(tmp_path):
    for sub in ("tasks", "datasets"):
        (tmp_path / "harness" / "jlm_fin_eval" / sub).mkdir(parents=True)
    return [tmp_path / "harness", "--fin-tasks", "fp3"]


def _archive_not_a_zip(tmp_path):
    for sub in ("tasks/chabsa", "datasets/chabsa"):
        (tmp_path / "harness" / "jlm_fin_eval" / sub).mkdir(parents=True)
    (tmp_path / "harness" / "jlm_fin_eval" / "tasks/chabsa/chabsa-1.0-0.2.1.yaml").write_text("task: chabsa\n")
    (tmp_path / "harness" / "jlm_fin_eval" / "datasets/chabsa/chabsa.py").write_text("")
    (tmp_path / "chabsa.zip").write_text("not a zip")
    return [tmp_path / "harness", "--fin-tasks", "chabsa", "--chabsa-archive", tmp_path / "chabsa.zip"]


FIN_CASES = [
    ("fin-harness-not-a-clone", _not_a_clone, ["is not a clone of pfnet-research/japanese-lm-fin-harness"]),
    ("fin-harness-unknown-task", _unknown_task, ["unknown task(s) fp3"]),
    ("chabsa-archive-not-a-zip", _archive_not_a_zip, ["is not a zip archive", "kaggle.com"]),
]


@pytest.mark.parametrize("case,make,mentions", FIN_CASES, ids=[c[0] for c in FIN_CASES])
def test_bad_fin_harness(tiny_family, tmp_path, case, make, mentions):
    args = make(tmp_path)
    before = snapshot(str(tmp_path), tiny_family.base)
    result = invoke(["eval", tiny_family.base, "--fin-harness", *args, "--out", tmp_path / "out.json"])
    assert_clean_failure(result, mentions=mentions, before=before)
    assert not (tmp_path / "out.json").exists()


def test_out_inside_a_model_folder_is_refused(tiny_family, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_family.base, model)
    qa = tmp_path / "qa.jsonl"
    qa.write_text(GOOD_QA)
    before = snapshot(str(tmp_path))
    result = invoke(["eval", model, "--qa", qa, "--out", model / "results.json"])
    assert_clean_failure(result, mentions=["is inside the input"], before=before)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_family, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(GOOD_QA)
    result = invoke(["eval", tiny_family.base, "--qa", qa, "--device", "cuda"])
    assert_clean_failure(result, mentions=["--device cuda", "no CUDA device"])

