"""Bad input through `finmerge merge` and plain `mergekit-yaml`: one clear message, exit code != 0,
no traceback, no input changed, no complete-looking OUT.

Every case is generated here from copies of the session's tiny models. `finmerge merge` must turn
every case into a clean message; plain `mergekit-yaml` only the cases that reach our plugin
(recipes mergekit itself can parse: its own parsing errors stay mergekit's). Both commands run
in-process through their click objects (the real commands, minus interpreter start-up); a few cases
also run as real subprocesses.
"""

import os
import shutil
import struct
import subprocess
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import yaml

from bad_input import assert_clean_failure, command, run, snapshot
from finmerge.demo.tiny_models import recipe
from merge_helpers import pickled_copy


@dataclass
class Case:
    recipe: Path
    mentions: List[str]
    inputs: List[str] = field(default_factory=list)
    out: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    finmerge_args: List[str] = field(default_factory=list)


def _copy(source: str, destination: Path) -> str:
    shutil.copytree(source, destination)
    return str(destination)


def _write_recipe(root: Path, merge, name="recipe.yml") -> Path:
    path = root / name
    path.write_text(merge if isinstance(merge, str) else yaml.safe_dump(merge), encoding="utf-8")
    return path


def _with_model(root, family, role, make):
    """The standard recipe with `role`'s model replaced by what make(folder) builds from a copy of it."""
    folder = root / f"bad-{role}"
    made = make(_copy(getattr(family, role), folder))
    merge = recipe(family)
    if role == "base":
        merge["base_model"] = made
    else:
        merge["models"][0 if role == "domain" else 1]["model"] = made
    return merge, made


# --- recipe files ---------------------------------------------------------------------------------

def garbage_bytes(root, family):
    path = root / "recipe.yml"
    path.write_bytes(bytes(range(256)) * 4)
    return Case(path, ["recipe.yml", "UTF-8"])


def non_utf8_recipe(root, family):
    path = root / "recipe.yml"
    path.write_bytes(("# Zürich desk merge\n" + yaml.safe_dump(recipe(family))).encode("latin-1"))
    return Case(path, ["recipe.yml", "UTF-8"])


def empty_recipe(root, family):
    return Case(_write_recipe(root, ""), ["recipe.yml", "empty"])


def yaml_syntax_error(root, family):
    return Case(_write_recipe(root, "merge_method: domain_instruct\nmodels: [\n  - model: x\n"), ["recipe.yml", "line"])


def yaml_list(root, family):
    return Case(_write_recipe(root, "- merge_method: domain_instruct\n- models: []\n"), ["recipe.yml", "mapping"])


def no_merge_method(root, family):
    merge = recipe(family)
    del merge["merge_method"]
    return Case(_write_recipe(root, merge), ["recipe.yml", "merge_method"])


def no_models(root, family):
    merge = recipe(family)
    del merge["models"]
    return Case(_write_recipe(root, merge), ["recipe.yml", "models"])


def models_not_a_list(root, family):
    merge = recipe(family)
    merge["models"] = "domain and instruct"
    return Case(_write_recipe(root, merge), ["recipe.yml", "models"])


def recipe_sets_trust_remote_code(root, family):
    merge = recipe(family)
    merge["trust_remote_code"] = True
    return Case(_write_recipe(root, merge), ["recipe.yml", "trust_remote_code", "--trust-remote-code"])


# --- recipe fields that mergekit accepts and our plugin checks ------------------------------------

def role_key_typo(root, family):
    merge = recipe(family)
    merge["models"][0]["parameters"] = {"rol": "domain", "weight": 1.0}
    return Case(_write_recipe(root, merge), ["unknown parameter `rol`"])


def role_value_typo(root, family):
    merge = recipe(family)
    merge["models"][1]["parameters"]["role"] = "instrcut"
    return Case(_write_recipe(root, merge), ["instrcut", "instruct"])


def weight_not_a_number(root, family):
    merge = recipe(family)
    merge["models"][0]["parameters"]["weight"] = "abc"
    return Case(_write_recipe(root, merge), ["weight", "abc"])


def unknown_dtype(root, family):
    merge = recipe(family)
    merge["dtype"] = "float13"
    return Case(_write_recipe(root, merge), ["dtype", "float13"])


def unknown_out_dtype(root, family):
    merge = recipe(family)
    merge["out_dtype"] = "bf16x"
    return Case(_write_recipe(root, merge), ["out_dtype", "bf16x"])


def file_as_base(root, family):
    path = root / "base.safetensors"
    shutil.copy(os.path.join(family.base, "model.safetensors"), path)
    merge = recipe(family)
    merge["base_model"] = str(path)
    return Case(_write_recipe(root, merge), [str(path), "is a file"])


def missing_model(root, family):
    merge = recipe(family)
    merge["models"][0]["model"] = str(root / "models" / "domain-v2")
    return Case(_write_recipe(root, merge), [str(root / "models" / "domain-v2"), "does not exist"])


def dotdot_path(root, family):
    merge = recipe(family)
    merge["base_model"] = "../../nowhere/base"
    return Case(_write_recipe(root, merge), ["../../nowhere/base", "does not exist"])


def missing_tokenizer_source(root, family):
    merge = recipe(family)
    merge["tokenizer"] = {"source": str(root / "no-such-tokenizer")}
    return Case(_write_recipe(root, merge), [str(root / "no-such-tokenizer"), "tokenizer"])


# --- model folders --------------------------------------------------------------------------------

def _model_case(root, family, role, make, mentions):
    merge, made = _with_model(root, family, role, make)
    return Case(_write_recipe(root, merge), [m.format(folder=made) for m in mentions], inputs=[made])


def truncated_safetensors(root, family):
    def make(folder):
        path = os.path.join(folder, "model.safetensors")
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        return folder

    return _model_case(root, family, "domain", make, ["{folder}/model.safetensors"])


def header_lies_about_its_length(root, family):
    def make(folder):
        with open(os.path.join(folder, "model.safetensors"), "r+b") as handle:
            handle.write(struct.pack("<Q", 10 ** 12))
        return folder

    return _model_case(root, family, "instruct", make, ["{folder}/model.safetensors"])


def header_not_json(root, family):
    def make(folder):
        garbage = b"{this is not json" + b" " * 15
        with open(os.path.join(folder, "model.safetensors"), "wb") as handle:
            handle.write(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 64)
        return folder

    return _model_case(root, family, "base", make, ["{folder}/model.safetensors"])


def config_not_json(root, family):
    def make(folder):
        Path(folder, "config.json").write_text('{"architectures": ["LlamaForCausalLM"], vocab_size: ')
        return folder

    return _model_case(root, family, "base", make, ["{folder}/config.json", "JSON"])


def config_is_a_list(root, family):
    def make(folder):
        Path(folder, "config.json").write_text("[1, 2, 3]")
        return folder

    return _model_case(root, family, "domain", make, ["{folder}/config.json"])


def config_not_utf8(root, family):
    def make(folder):
        Path(folder, "config.json").write_bytes(b'{"architectures": ["Llama\xff\xfe"]}')
        return folder

    return _model_case(root, family, "instruct", make, ["{folder}/config.json", "UTF-8"])


def empty_model_folder(root, family):
    folder = root / "empty-domain"
    folder.mkdir()
    merge = recipe(family)
    merge["models"][0]["model"] = str(folder)
    return Case(_write_recipe(root, merge), [str(folder), "config.json"], inputs=[str(folder)])


def no_weights(root, family):
    def make(folder):
        os.remove(os.path.join(folder, "model.safetensors"))
        return folder

    return _model_case(root, family, "domain", make, ["{folder}", "no weights"])


def weights_symlink_pointing_outside(root, family):
    outside = root / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text("not a checkpoint, just a file somewhere else on the disk\n" * 20)

    def make(folder):
        os.remove(os.path.join(folder, "model.safetensors"))
        os.symlink(outside, os.path.join(folder, "model.safetensors"))
        return folder

    case = _model_case(root, family, "domain", make, ["{folder}/model.safetensors"])
    case.inputs.append(str(outside))
    return case


def model_symlink_pointing_nowhere(root, family):
    link = root / "domain-link"
    os.symlink(root / "outside" / "gone", link)
    merge = recipe(family)
    merge["models"][0]["model"] = str(link)
    return Case(_write_recipe(root, merge), [str(link), "does not exist"])


def pickled_weights_only(root, family):
    folder = pickled_copy(family.domain, root / "pickled-domain")
    merge = recipe(family)
    merge["models"][0]["model"] = folder
    return Case(_write_recipe(root, merge), [folder, "--allow-pickle", "FINMERGE_ALLOW_PICKLE=1"], inputs=[folder])


def shapes_differ(root, family):
    from safetensors.torch import load_file, save_file

    def make(folder):
        path = os.path.join(folder, "model.safetensors")
        state = load_file(path)
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:8].clone()
        save_file(state, path, metadata={"format": "pt"})
        return folder

    return _model_case(root, family, "instruct", make, ["model.layers.0.mlp.up_proj.weight"])


# --- OUT ------------------------------------------------------------------------------------------

def out_is_an_input(root, family):
    instruct = _copy(family.instruct, root / "instruct")
    merge = recipe(family)
    merge["models"][1]["model"] = instruct
    return Case(_write_recipe(root, merge), [instruct, "input"], inputs=[instruct], out=instruct,
                env={"FINMERGE_OVERWRITE": "1"}, finmerge_args=["--overwrite"])


def out_inside_an_input(root, family):
    domain = _copy(family.domain, root / "domain")
    merge = recipe(family)
    merge["models"][0]["model"] = domain
    out = os.path.join(domain, "merged")
    return Case(_write_recipe(root, merge), [domain, "input"], inputs=[domain], out=out)


def out_is_a_file(root, family):
    out = root / "out.txt"
    out.write_text("keep me")
    return Case(_write_recipe(root, recipe(family)), [str(out), "file"], inputs=[str(out)], out=str(out))


def out_not_empty(root, family):
    out = root / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    return Case(_write_recipe(root, recipe(family)), [str(out), "--overwrite", "FINMERGE_OVERWRITE=1"],
                inputs=[str(out)], out=str(out))


RECIPE_PARSING = [garbage_bytes, non_utf8_recipe, empty_recipe, yaml_syntax_error, yaml_list, no_merge_method,
                  no_models, models_not_a_list, recipe_sets_trust_remote_code]
REACH_THE_PLUGIN = [role_key_typo, role_value_typo, weight_not_a_number, unknown_dtype, unknown_out_dtype,
                    file_as_base, missing_model, dotdot_path, missing_tokenizer_source, truncated_safetensors,
                    header_lies_about_its_length, header_not_json, config_not_json, config_is_a_list,
                    config_not_utf8, empty_model_folder, no_weights, weights_symlink_pointing_outside,
                    model_symlink_pointing_nowhere, pickled_weights_only, shapes_differ, out_is_an_input,
                    out_inside_an_input, out_is_a_file, out_not_empty]
CASES = [(c, "finmerge") for c in RECIPE_PARSING + REACH_THE_PLUGIN] + [(c, "mergekit-yaml") for c in REACH_THE_PLUGIN]


def _in_process(tool: str, args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    from click.testing import CliRunner

    if tool == "finmerge":
        from finmerge.cli.main import cli as entry
    else:
        from mergekit.scripts.run_yaml import main as entry
    result = CliRunner().invoke(entry, args, env={"FINMERGE_DEBUG": "", **env})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


def _arguments(tool: str, case: Case, out: str) -> List[str]:
    if tool == "finmerge":
        return ["merge", str(case.recipe), out, *case.finmerge_args]
    return [str(case.recipe), out]


def _check(result, case: Case, out: str, before, root: Path) -> None:
    outputs = [] if out in case.inputs else [out]  # an input that is named as OUT is complete, and must stay so
    message = assert_clean_failure(result, mentions=case.mentions, before=before, outputs=outputs)
    assert "\n\n" not in message.strip(), f"more than one paragraph:\n{message}"
    assert not [n for n in os.listdir(root) if ".partial-" in n or n.endswith(".lock")], os.listdir(root)


def _prepare(make: Callable, tmp_path: Path, family):
    root = tmp_path / "work"
    root.mkdir()
    case = make(root, family)
    out = case.out or str(root / "out")
    before = snapshot(case.recipe, family.base, family.domain, family.instruct, *case.inputs)
    return root, case, out, before


@pytest.mark.parametrize("make,tool", CASES, ids=[f"{tool}-{make.__name__}" for make, tool in CASES])
def test_bad_input_is_one_clean_message(make, tool, tiny_family, tmp_path, monkeypatch):
    root, case, out, before = _prepare(make, tmp_path, tiny_family)
    monkeypatch.chdir(root)
    result = _in_process(tool, _arguments(tool, case, out), case.env)
    _check(result, case, out, before, root)


SUBPROCESS = [(garbage_bytes, "finmerge"), (no_models, "finmerge"), (truncated_safetensors, "finmerge"),
              (role_value_typo, "mergekit-yaml"), (header_lies_about_its_length, "mergekit-yaml"),
              (out_is_an_input, "mergekit-yaml")]


@pytest.mark.slow
@pytest.mark.parametrize("make,tool", SUBPROCESS, ids=[f"{tool}-{make.__name__}" for make, tool in SUBPROCESS])
def test_bad_input_through_the_installed_commands(make, tool, tiny_family, tmp_path):
    root, case, out, before = _prepare(make, tmp_path, tiny_family)
    result = run([command(tool), *_arguments(tool, case, out)], cwd=root, env=case.env)
    _check(result, case, out, before, root)
    assert result.returncode == 1 and "Error:" in result.stderr, result.stderr


def test_the_suite_covers_what_the_issue_lists():
    """Garbage bytes, YAML list, no merge_method, no models, role typo, weight: abc, dtype: float13, a file
    as base, truncated safetensors, a lying header, config.json not JSON, an empty folder, non-UTF-8."""
    names = {make.__name__ for make, _ in CASES}
    assert {"garbage_bytes", "yaml_list", "no_merge_method", "no_models", "role_key_typo", "weight_not_a_number",
            "unknown_dtype", "file_as_base", "truncated_safetensors", "header_lies_about_its_length",
            "config_not_json", "empty_model_folder", "non_utf8_recipe", "weights_symlink_pointing_outside",
            "dotdot_path", "missing_model"} <= names
