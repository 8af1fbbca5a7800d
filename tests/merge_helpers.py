"""Shared helpers for the merge tests: run a recipe in-process, read a checkpoint's tensors."""

import glob
import os
import shutil

import torch
from safetensors.torch import load_file, save_file


def run_merge(recipe: dict, out, **options) -> None:
    """mergekit's own run_merge (wrapped by the finmerge import hook), in this process."""
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(recipe)
    mergekit.merge.run_merge(config, str(out), options=MergeOptions(quiet=True, **options))


def tensors(folder) -> dict:
    result = {}
    for file in sorted(glob.glob(os.path.join(str(folder), "*.safetensors"))):
        result.update(load_file(file))
    return result


def copy_model(source: str, destination, edit_tensors=None, edit_config=None) -> str:
    """Copy a checkpoint folder, optionally changing its tensors or config.json."""
    import json

    destination = str(destination)
    shutil.copytree(source, destination)
    if edit_tensors:
        path = os.path.join(destination, "model.safetensors")
        state = load_file(path)
        edit_tensors(state)
        save_file(state, path, metadata={"format": "pt"})
    if edit_config:
        path = os.path.join(destination, "config.json")
        with open(path) as handle:
            config = json.load(handle)
        edit_config(config)
        with open(path, "w") as handle:
            json.dump(config, handle)
    return destination


def nan_domain(family, folder) -> str:
    """A copy of the family's domain model with one NaN in model.layers.1.self_attn.o_proj.weight."""
    def poison(state):
        state["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")

    return copy_model(family.domain, folder, edit_tensors=poison)


def nan_recipe(family, folder) -> dict:
    """The family's (1, 1) recipe whose domain model is a nan_domain copy made under `folder`."""
    from finmerge.demo.tiny_models import recipe

    merge = recipe(family)
    merge["models"][0]["model"] = nan_domain(family, os.path.join(str(folder), "nan-domain"))
    return merge


def copy_family(family, root):
    """The three models copied under `root`, for a test that may break or (wrongly) replace one."""
    from finmerge.demo.tiny_models import TinyFamily

    for role in ("base", "domain", "instruct"):
        shutil.copytree(getattr(family, role), os.path.join(str(root), role))
    return TinyFamily(**{role: os.path.join(str(root), role) for role in ("base", "instruct", "domain")})


def pickled_copy(source: str, destination) -> str:
    """A copy of a checkpoint whose weights are only a pickled pytorch_model.bin."""
    destination = copy_model(source, destination)
    path = os.path.join(destination, "model.safetensors")
    state = load_file(path)
    os.remove(path)
    torch.save(state, os.path.join(destination, "pytorch_model.bin"))
    return destination


def expected_merge(family, w_d=1.0, w_i=1.0) -> dict:
    base, domain, instruct = (tensors(p) for p in (family.base, family.domain, family.instruct))
    return {k: base[k] + w_d * (domain[k] - base[k]) + w_i * (instruct[k] - base[k]) for k in base}


def assert_close_state(actual: dict, expected: dict, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert torch.allclose(actual[name], expected[name], atol=atol, rtol=0), name


def shard_in_two(folder: str) -> str:
    """Replace model.safetensors by two shards + model.safetensors.index.json (the layout of real checkpoints)."""
    import json

    state = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    names = sorted(state)
    weight_map = {}
    for n, part in enumerate((names[::2], names[1::2])):
        shard = f"model-0000{n + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    return folder
