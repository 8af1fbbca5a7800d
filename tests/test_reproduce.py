"""`finmerge reproduce`: all stages from one recipe, skipped on a rerun, redone when an input
changes, and clear errors for a bad recipe."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from finmerge.demo.tiny_models import CHATS, CORPUS, recipe
from finmerge.reproduce.recipe import ReproductionError, load_reproduction
from finmerge.reproduce.report import collect, write_report
from finmerge.reproduce.run import run_reproduction


def _workdir(tiny_family, tmp_path, **section):
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = "./domain"
    merge["finmerge"] = {
        "stages": ["pretrain", "merge", "eval"],
        "pretrain": {"data": ["./corpus.txt"], "txt_document": "paragraph", "seq_len": 32, "max_steps": 6,
                     "per_device_train_batch_size": 2, "learning_rate": 1e-3, "eval_fraction": 0.2, "min_chars": 5,
                     "near_dedup": False, "dedup": False, "save_steps": 3, "logging_steps": 1},
        "eval": {"text": "./corpus.txt", "qa": {"chat": "./qa.jsonl"}, "max_new_tokens": 12},
        **section,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(merge, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_all_stages_then_rerun_skips_them(tiny_family, tmp_path):
    path = _workdir(tiny_family, tmp_path)
    repro = load_reproduction(path)
    first = run_reproduction(repro, log=lambda m: None)
    assert first["stages"] == {"pretrain": False, "merge": False, "eval": False}
    report = collect(repro)
    assert set(report["results"]) == {"base", "domain", "instruct", "merged"}
    assert report["results"]["merged"]["chat"]["accuracy"] is not None
    assert report["diagnostics"]["overall"]["cos"] is not None
    assert report["pretrain"]["steps"] == 6
    paths = write_report(report)
    assert "| merged |" in open(paths["md"]).read()

    second = run_reproduction(load_reproduction(path), log=lambda m: None)
    assert second["stages"] == {"pretrain": True, "merge": True, "eval": True}

    # A changed evaluation set redoes only the evaluation.
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": CHATS[0][0], "answer": CHATS[0][1]}) + "\n")
    third = run_reproduction(load_reproduction(path), log=lambda m: None)
    assert third["stages"] == {"pretrain": True, "merge": True, "eval": False}


@pytest.mark.slow
def test_the_reproduction_recipe_still_works_with_plain_mergekit_yaml(tiny_family, tmp_path):
    path = _workdir(tiny_family, tmp_path)
    data = yaml.safe_load(open(path))
    data["models"][0]["model"] = tiny_family.domain  # no pretrain stage here: an existing domain model
    (tmp_path / "plain.yml").write_text(yaml.safe_dump(data))
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    subprocess.run([mergekit_yaml, str(tmp_path / "plain.yml"), str(tmp_path / "out")], check=True, capture_output=True, cwd=tmp_path)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_an_interrupted_stage_is_redone(tiny_family, tmp_path):
    from finmerge.reproduce.stages import Stages

    stages, calls = Stages(str(tmp_path), log=lambda m: None), []

    def crash():
        calls.append("crash")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run("merge", "k1", crash)
    assert stages.run("merge", "k1", lambda: calls.append("ok")) is True
    assert stages.run("merge", "k1", lambda: calls.append("again")) is False
    assert calls == ["crash", "ok"]


@pytest.mark.parametrize("section,message", [
    ({"stages": ["pretrain", "merge", "publish"]}, r"unknown stage\(s\) 'publish'"),
    ({"colour": "blue"}, r"unknown key\(s\) in `finmerge:`: colour"),
    ({"eval": {"text": "./missing.txt"}}, r"file .*missing\.txt does not exist"),
    ({"eval": {"qa": {"chat": "./qa.jsonl"}, "temperature": 0}}, r"finmerge\.eval: unknown key\(s\) temperature"),
    ({"stages": ["merge", "eval"]}, r"domain model .*domain does not exist \(add the `pretrain` stage"),
    ({"stages": ["pretrain", "merge", "sweep"]}, r"stage `sweep` needs a `finmerge.sweep:` section"),
])
def test_bad_reproduction_recipes(tiny_family, tmp_path, section, message):
    path = _workdir(tiny_family, tmp_path, **section)
    with pytest.raises(ReproductionError, match=message):
        load_reproduction(path)


def test_missing_recipe_and_cli_error_is_clean(tmp_path):
    with pytest.raises(ReproductionError, match="does not exist"):
        load_reproduction(str(tmp_path / "nope.yml"))
    finmerge = os.path.join(os.path.dirname(sys.executable), "finmerge")
    result = subprocess.run([finmerge, "reproduce", str(tmp_path / "nope.yml")], capture_output=True, text=True)
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_pretrain_data_paths_are_read_from_the_workdir_whatever_the_current_folder(tiny_family, tmp_path, monkeypatch):
    """The pretrain stage's key must see the corpus itself, so an edited corpus redoes the stage."""
    from finmerge.reproduce.stages import stage_key

    path = _workdir(tiny_family, tmp_path)
    monkeypatch.chdir("/")
    repro = load_reproduction(path)
    assert repro.pretrain["data"] == [str(tmp_path / "corpus.txt")]
    before = stage_key({}, repro.pretrain["data"])
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 11))
    assert stage_key({}, repro.pretrain["data"]) != before
