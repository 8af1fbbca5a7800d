"""Diagnostics end to end: the report in OUT for both ways of merging, and `finmerge diagnose`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from diagnostics_helpers import assert_stats_match, concatenated
from finmerge.cli.main import cli
from finmerge.demo.tiny_models import recipe, write_recipe
from merge_helpers import copy_model, pickled_copy, run_merge, shard_in_two, tensors

BIN = os.path.dirname(sys.executable)
REPORT_FILES = ("diagnostics.json", "diagnostics.md", "diagnostics.svg")


def _models(family):
    return {"base": tensors(family.base), "domain": tensors(family.domain), "instruct": tensors(family.instruct)}


def _report(folder):
    with open(os.path.join(folder, "diagnostics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _assert_report_matches_torch(folder, models):
    data = _report(folder)
    assert {t["name"] for t in data["tensors"]} == set(models["base"])
    for entry in data["tensors"]:
        assert_stats_match(entry, *concatenated(models, [entry["name"]]))
    assert_stats_match(data["overall"], *concatenated(models, models["base"]))
    return data


def _assert_report_files(out):
    for name in REPORT_FILES:
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "### Independence of the task vectors" in card
    assert _report(out)["verdict"] in card
    assert not [p for p in os.listdir(out.parent) if "partial" in p]


def test_report_in_out_in_process_merge(tiny_family, tmp_path):
    out = tmp_path / "out"
    run_merge(recipe(tiny_family), out)
    _assert_report_files(out)
    data = _assert_report_matches_torch(out, _models(tiny_family))
    assert data["source"] == "merge" and data["weights"] == {"domain": 1.0, "instruct": 1.0}


@pytest.mark.slow
def test_report_in_out_plain_mergekit_yaml(tiny_family, tmp_path):
    out = tmp_path / "out"
    recipe_path = write_recipe(str(tmp_path / "recipe.yml"), tiny_family)
    subprocess.run([os.path.join(BIN, "mergekit-yaml"), recipe_path, str(out)], check=True, capture_output=True)
    _assert_report_files(out)
    _assert_report_matches_torch(out, _models(tiny_family))


@pytest.mark.slow
def test_report_in_out_finmerge_merge(tiny_family, tmp_path):
    out = tmp_path / "out"
    recipe_path = write_recipe(str(tmp_path / "recipe.yml"), tiny_family, w_domain=0.5, w_instruct=1.5)
    result = subprocess.run([os.path.join(BIN, "finmerge"), "merge", recipe_path, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "diagnostics: " in result.stdout
    _assert_report_files(out)
    data = _assert_report_matches_torch(out, _models(tiny_family))
    assert data["weights"] == {"domain": 0.5, "instruct": 1.5}  # the vectors do not depend on the weights


def test_diagnose_equals_in_merge_report(tiny_family, tmp_path):
    merged, standalone = tmp_path / "merged", tmp_path / "diag"
    run_merge(recipe(tiny_family), merged)
    result = CliRunner().invoke(cli, [
        "diagnose", "--base", tiny_family.base, "--domain", tiny_family.domain, "--instruct", tiny_family.instruct,
        "--out", str(standalone), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    for name in REPORT_FILES:
        assert (standalone / name).is_file(), name
    a, b = _report(merged), _report(standalone)
    assert b["source"] == "diagnose" and b["verdict"] in result.output
    for key in ("overall", "by_module", "by_layer", "cells", "tensors", "verdict", "skipped"):
        assert a[key] == b[key], key  # same chunks, same arithmetic: identical, not merely close


def test_diagnose_reads_shards_and_reports_what_it_skips(tiny_family, tmp_path):
    def shard(source, destination, extra=None):
        folder = copy_model(source, destination)
        state = load_file(os.path.join(folder, "model.safetensors"))
        state.update(extra or {})
        os.remove(os.path.join(folder, "model.safetensors"))
        names = sorted(state)
        for n, part in enumerate((names[::2], names[1::2])):
            save_file({k: state[k] for k in part}, os.path.join(folder, f"model-0000{n + 1}-of-00002.safetensors"))
        return folder

    base = shard(tiny_family.base, tmp_path / "base")
    domain = shard(tiny_family.domain, tmp_path / "domain")
    instruct = shard(tiny_family.instruct, tmp_path / "instruct", {"extra.weight": torch.ones(3)})
    out = tmp_path / "diag"
    result = CliRunner().invoke(cli, ["diagnose", "--base", base, "--domain", domain, "--instruct", instruct,
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    data = _assert_report_matches_torch(out, _models(tiny_family))
    assert data["skipped"] == [{"name": "extra.weight", "reason": "only in the instruct model, not in the base"}]
    assert "extra.weight" in (out / "diagnostics.md").read_text()


def _indexed_with_consolidated_copy(source, destination):
    """Two shards + model.safetensors.index.json, and beside them consolidated.safetensors: the same
    weights under other names (as Mistral-style repositories ship them)."""
    folder = copy_model(source, destination)
    state = load_file(os.path.join(folder, "model.safetensors"))
    shard_in_two(folder)
    save_file({"consolidated." + k: v for k, v in state.items()}, os.path.join(folder, "consolidated.safetensors"))
    return folder


def test_diagnose_follows_the_index_and_counts_each_weight_once(tiny_family, tmp_path):
    folders = {role: _indexed_with_consolidated_copy(getattr(tiny_family, role), tmp_path / role)
               for role in ("base", "domain", "instruct")}
    out = tmp_path / "diag"
    result = CliRunner().invoke(cli, ["diagnose", *[x for r, f in folders.items() for x in (f"--{r}", f)],
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    models = _models(tiny_family)
    data = _assert_report_matches_torch(out, models)  # tensors == the model's names, overall from them only
    assert data["overall"]["n"] == sum(t.numel() for t in models["base"].values())
    assert data["skipped"] == []


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update({"extra.weight": "model-00003-of-00002.safetensors"}), "download the missing shard"),
    (lambda m: m.update({"extra.weight": "model-00001-of-00002.safetensors"}), "does not hold it"),
    (lambda m: m.update({"extra.weight": "../elsewhere.safetensors"}), "not a file in the model folder"),
])
def test_diagnose_bad_index_is_a_clear_error(tiny_family, tmp_path, edit, message):
    domain = _indexed_with_consolidated_copy(tiny_family.domain, tmp_path / "domain")
    index_path = os.path.join(domain, "model.safetensors.index.json")
    with open(index_path) as handle:
        index = json.load(handle)
    edit(index["weight_map"])
    with open(index_path, "w") as handle:
        json.dump(index, handle)
    result = CliRunner().invoke(cli, ["diagnose", "--base", tiny_family.base, "--domain", domain, "--instruct",
                                      tiny_family.instruct, "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code != 0 and message in result.output and "domain model" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o" / "diagnostics.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--base", "/nonexistent/base"], "not a checkpoint folder"),
    (["--base", "no-such-org/no-such-model"], "could not be fetched from the Hugging Face hub"),
])
def test_diagnose_bad_model_is_a_clear_error(tiny_family, tmp_path, args, message):
    models = {"--base": tiny_family.base, "--domain": tiny_family.domain, "--instruct": tiny_family.instruct}
    models.update(dict(zip(args[::2], args[1::2])))
    result = CliRunner().invoke(cli, ["diagnose", *[x for kv in models.items() for x in kv], "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code != 0 and message in result.output and "base model" in result.output
    assert "Traceback" not in result.output


def test_diagnose_pickle_only_checkpoint_is_refused(tiny_family, tmp_path):
    domain = pickled_copy(tiny_family.domain, tmp_path / "domain")
    result = CliRunner().invoke(cli, ["diagnose", "--base", tiny_family.base, "--domain", domain, "--instruct",
                                      tiny_family.instruct, "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code != 0 and "only pickled .bin weights" in result.output and "domain model" in result.output


def test_zero_domain_vector_end_to_end(tiny_family, tmp_path):
    domain = copy_model(tiny_family.base, tmp_path / "domain_is_base")
    out = tmp_path / "out"
    run_merge(recipe(tiny_family) | {"models": [
        {"model": domain, "parameters": {"role": "domain", "weight": 1.0}},
        {"model": tiny_family.instruct, "parameters": {"role": "instruct", "weight": 1.0}},
    ]}, out)
    data = _report(out)
    assert data["overall"]["cos"] is None and all(t["cos"] is None for t in data["tensors"])
    assert "domain task vector is zero" in data["verdict"]
    assert "n/a" in (out / "diagnostics.md").read_text() and "nan" not in (out / "diagnostics.json").read_text().lower()


def test_each_merge_gets_its_own_report(tiny_family, tmp_path):
    """Two merges in one process (as mergekit-multi runs them): the second starts from nothing."""
    first, second = tmp_path / "first", tmp_path / "second"
    run_merge(recipe(tiny_family), first)
    swapped = recipe(tiny_family) | {"models": [  # instruct as the domain model and vice versa
        {"model": tiny_family.instruct, "parameters": {"role": "domain", "weight": 1.0}},
        {"model": tiny_family.domain, "parameters": {"role": "instruct", "weight": 1.0}},
    ]}
    run_merge(swapped, second)
    a, b = _report(first), _report(second)
    assert len(a["tensors"]) == len(b["tensors"])
    assert b["overall"]["norm_domain"] == pytest.approx(a["overall"]["norm_instruct"], rel=1e-12)
    assert b["overall"]["n"] == a["overall"]["n"]  # not accumulated over both merges


@pytest.mark.slow
def test_mergekit_multi_writes_a_report_per_merge(tiny_family, tmp_path):
    import yaml

    first = recipe(tiny_family) | {"name": "first"}
    final = recipe(tiny_family) | {"models": [
        {"model": tiny_family.domain, "parameters": {"role": "domain", "weight": 1.0}},
        {"model": "first", "parameters": {"role": "instruct", "weight": 1.0}},
    ]}
    config = tmp_path / "multi.yml"
    config.write_text(yaml.safe_dump_all([first, final]))
    result = subprocess.run([os.path.join(BIN, "mergekit-multi"), str(config), "--intermediate-dir", str(tmp_path / "steps"),
                             "--out-path", str(tmp_path / "final")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_report_matches_torch(tmp_path / "steps" / "first", _models(tiny_family))
    final_models = _models(tiny_family) | {"instruct": tensors(tmp_path / "steps" / "first")}
    _assert_report_matches_torch(tmp_path / "final", final_models)


def test_diagnostics_can_be_switched_off(tiny_family, tmp_path, monkeypatch):
    monkeypatch.setenv("FINMERGE_NO_DIAGNOSTICS", "1")
    out = tmp_path / "out"
    run_merge(recipe(tiny_family), out)
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert "Independence of the task vectors" not in (out / "README.md").read_text()


def test_diagnose_dtype_matches_a_bf16_merge(tiny_family, tmp_path):
    """The fp32 family merged with `dtype: bfloat16` is measured on bf16-rounded inputs; --dtype does the same."""
    merged, standalone = tmp_path / "merged", tmp_path / "diag"
    run_merge(recipe(tiny_family, dtype="bfloat16"), merged)
    result = CliRunner().invoke(cli, ["diagnose", "--base", tiny_family.base, "--domain", tiny_family.domain,
                                      "--instruct", tiny_family.instruct, "--out", str(standalone), "--quiet",
                                      "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert _report(merged)["tensors"] == _report(standalone)["tensors"]
    as_fp32 = _models(tiny_family)
    bf16 = {role: {k: v.bfloat16() for k, v in state.items()} for role, state in as_fp32.items()}
    _assert_report_matches_torch(standalone, bf16)


def test_diagnose_names_the_model_with_nan(tiny_family, tmp_path):
    def poison(state):
        state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")

    instruct = copy_model(tiny_family.instruct, tmp_path / "instruct", edit_tensors=poison)
    result = CliRunner().invoke(cli, ["diagnose", "--base", tiny_family.base, "--domain", tiny_family.domain,
                                      "--instruct", instruct, "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code != 0
    assert "the instruct model has NaN or Inf values in tensor model.layers.1.mlp.up_proj.weight" in result.output


def test_diagnose_truncated_file_is_a_clear_error(tiny_family, tmp_path):
    domain = copy_model(tiny_family.domain, tmp_path / "domain")
    path = os.path.join(domain, "model.safetensors")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) - 100)
    result = CliRunner().invoke(cli, ["diagnose", "--base", tiny_family.base, "--domain", domain,
                                      "--instruct", tiny_family.instruct, "--out", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code != 0 and "domain model" in result.output and "truncated file" in result.output
