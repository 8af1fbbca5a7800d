"""Bad input: every case fails before or during the merge with a message naming what is wrong,
and a failed merge never leaves a complete-looking OUT."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from finmerge.demo.tiny_models import recipe
from finmerge.plugins.method import NonFiniteTensorError
from finmerge.plugins.preflight import RecipeError, preflight
from merge_helpers import assert_close_state, copy_model, expected_merge, nan_recipe, pickled_copy, run_merge, tensors


def _config(merge):
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate(merge)


def _no_partial_left(folder):
    return not [name for name in os.listdir(folder) if "partial" in name]


def test_missing_role(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    del merge["models"][0]["parameters"]["role"]
    with pytest.raises(RecipeError, match=rf"model {tiny_family.domain} has no `role`"):
        run_merge(merge, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicated_role_names_both_models(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    merge["models"][1]["parameters"]["role"] = "domain"
    with pytest.raises(RecipeError, match="exactly one model with `role: domain`") as error:
        run_merge(merge, tmp_path / "out")
    assert tiny_family.domain in str(error.value) and tiny_family.instruct in str(error.value)


def test_unknown_role_value(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    merge["models"][1]["parameters"]["role"] = "chat"
    with pytest.raises(RecipeError, match="has `role: 'chat'`; it must be 'domain' or 'instruct'"):
        run_merge(merge, tmp_path / "out")


def test_role_given_to_base(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    merge["models"].append({"model": tiny_family.base, "parameters": {"role": "domain"}})
    with pytest.raises(RecipeError, match="the base model .* has `role: domain`; the base has no role"):
        run_merge(merge, tmp_path / "out")


def test_missing_base_model(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    del merge["base_model"]
    with pytest.raises(RecipeError, match="needs `base_model:`"):
        run_merge(merge, tmp_path / "out")


def test_model_path_does_not_exist(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = str(tmp_path / "nowhere" / "domain")
    with pytest.raises(RecipeError, match=r"domain model path .*nowhere/domain does not exist"):
        run_merge(merge, tmp_path / "out")


def test_architectures_differ(tiny_family, tmp_path):
    other = copy_model(tiny_family.domain, tmp_path / "mistral", edit_config=lambda c: c.update(architectures=["MistralForCausalLM"]))
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = other
    with pytest.raises(RecipeError, match=r"different architectures: .*domain .*mistral: \['MistralForCausalLM'\]"):
        run_merge(merge, tmp_path / "out")


def test_missing_architectures_field(tiny_family, tmp_path):
    other = copy_model(tiny_family.instruct, tmp_path / "bare", edit_config=lambda c: c.pop("architectures"))
    merge = recipe(tiny_family)
    merge["models"][1]["model"] = other
    with pytest.raises(RecipeError, match=r"bare/config.json has no `architectures` field"):
        run_merge(merge, tmp_path / "out")


def test_tensor_shapes_differ(tiny_family, tmp_path):
    def shrink(state):
        state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"][:48]

    other = copy_model(tiny_family.domain, tmp_path / "small", edit_tensors=shrink)
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = other
    with pytest.raises(RecipeError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight has shape \[64, 32\] in the base .* but \[48, 32\] in the domain model"):
        run_merge(merge, tmp_path / "out")


def _grow_vocab(state):
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = torch.cat([state[name], torch.zeros(8, state[name].shape[1])])


def test_vocab_sizes_differ_points_to_tokenizer_settings(tiny_family, tmp_path):
    other = copy_model(tiny_family.instruct, tmp_path / "bigvocab", edit_tensors=_grow_vocab,
                       edit_config=lambda c: c.update(vocab_size=c["vocab_size"] + 8))
    merge = recipe(tiny_family)
    merge["models"][1]["model"] = other
    with pytest.raises(RecipeError, match=r"vocabulary sizes differ \(base \d+, domain \d+, instruct \d+\).*`tokenizer: \{source:"):
        run_merge(merge, tmp_path / "out")


def test_vocab_difference_with_tokenizer_settings_is_a_warning(tiny_family, tmp_path, caplog):
    other = copy_model(tiny_family.instruct, tmp_path / "bigvocab", edit_tensors=_grow_vocab,
                       edit_config=lambda c: c.update(vocab_size=c["vocab_size"] + 8))
    merge = recipe(tiny_family, tokenizer={"source": other})
    merge["models"][1]["model"] = other
    with caplog.at_level(logging.WARNING):
        preflight(_config(merge), str(tmp_path / "out"))
    assert "vocabulary sizes differ" in caplog.text


def test_tie_word_embeddings_disagreement_warns(tiny_family, tmp_path, caplog):
    other = copy_model(tiny_family.domain, tmp_path / "tied", edit_config=lambda c: c.update(tie_word_embeddings=True))
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = other
    with caplog.at_level(logging.WARNING):
        preflight(_config(merge), str(tmp_path / "out"))
    assert "tie_word_embeddings differs" in caplog.text


def test_pickled_weights_need_explicit_permission(tiny_family, tmp_path):
    pickled = pickled_copy(tiny_family.domain, tmp_path / "pickled")
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = pickled
    with pytest.raises(RecipeError, match=r"only pickled weights \(pytorch_model\.bin\)") as error:
        run_merge(merge, tmp_path / "out")
    for named in (f"domain model {pickled}", "--allow-pickle (finmerge merge)", "FINMERGE_ALLOW_PICKLE=1 (mergekit-yaml)"):
        assert named in str(error.value)
    preflight(_config(merge), str(tmp_path / "out"), allow_pickle=True)  # allowed when asked


def test_non_empty_out_is_refused_unless_overwrite(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(RecipeError, match=r"exists and is not empty.*FINMERGE_OVERWRITE=1"):
        run_merge(recipe(tiny_family), out)
    assert (out / "precious.txt").read_text() == "keep me"
    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    run_merge(recipe(tiny_family), out)
    assert not (out / "precious.txt").exists() and (out / "model.safetensors").exists()
    assert _no_partial_left(tmp_path)


def test_empty_out_folder_is_fine(tiny_family, tmp_path):
    """An existing empty OUT is merged into like an absent one: the whole, correct merge lands there."""
    (tmp_path / "out").mkdir()
    run_merge(recipe(tiny_family), tmp_path / "out")
    assert_close_state(tensors(tmp_path / "out"), expected_merge(tiny_family))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert _no_partial_left(tmp_path)


def test_nan_fails_mid_merge_and_leaves_no_output(tiny_family, tmp_path):
    merge = nan_recipe(tiny_family, tmp_path)
    with pytest.raises(NonFiniteTensorError, match=r"nan-domain has NaN or Inf values in tensor model\.layers\.1\.self_attn\.o_proj\.weight"):
        run_merge(merge, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _no_partial_left(tmp_path)


def test_failed_overwrite_keeps_previous_output(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_merge(recipe(tiny_family), out)
    before = tensors(out)
    merge = nan_recipe(tiny_family, tmp_path)
    monkeypatch.setenv("FINMERGE_OVERWRITE", "1")
    with pytest.raises(NonFiniteTensorError):
        run_merge(merge, out)
    after = tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _no_partial_left(tmp_path)


@pytest.mark.slow
def test_plain_mergekit_yaml_reports_nan_and_writes_nothing(tiny_family, tmp_path):
    merge = nan_recipe(tiny_family, tmp_path)
    recipe_path = tmp_path / "recipe.yml"
    recipe_path.write_text(json.dumps(merge))
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    result = subprocess.run([mergekit_yaml, str(recipe_path), str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "Error: model " in result.stderr and "NaN or Inf values in tensor model.layers.1.self_attn.o_proj.weight" in result.stderr
    assert not (tmp_path / "out").exists() and _no_partial_left(tmp_path)


def test_other_merge_methods_pass_through_untouched(tiny_family, tmp_path):
    """The wrapper must not change mergekit for other methods (base tokenizer, OUT written in place)."""
    merge = {"merge_method": "task_arithmetic", "dtype": "float32", "base_model": tiny_family.base,
             "models": [{"model": tiny_family.domain, "parameters": {"weight": 1.0}},
                        {"model": tiny_family.instruct, "parameters": {"weight": 1.0}}]}
    run_merge(merge, tmp_path / "out")
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["eos_token_id"] == json.load(open(os.path.join(tiny_family.base, "config.json")))["eos_token_id"]
