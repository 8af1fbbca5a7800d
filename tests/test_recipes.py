"""Every recipe under recipes/ validates offline: mergekit's schema, our roles and parameters."""

import glob
import os

import pytest
import yaml
from mergekit.config import MergeConfiguration

from finmerge.demo.tiny_models import recipe
from finmerge.plugins.preflight import RecipeError, check_parameters, resolve_roles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yml"), recursive=True))
MERGE_RECIPES = [p for p in RECIPES if "merge_method" in (yaml.safe_load(open(p)) or {})]


def test_the_papers_models_have_recipes():
    names = {os.path.relpath(p, os.path.join(ROOT, "recipes")) for p in MERGE_RECIPES}
    assert {"fin.yml", "fin-7b.yml"} <= names


@pytest.mark.parametrize("path", MERGE_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_merge_recipe_validates_offline(path):
    data = yaml.safe_load(open(path))
    config = MergeConfiguration.model_validate(data)
    assert config.merge_method == "domain_instruct"
    base, roles, _ = resolve_roles(config)
    check_parameters(config)
    assert base not in roles.values()
    assert "trust_remote_code" not in open(path).read().replace("--trust-remote-code", "")  # only ever a CLI flag


def test_papers_recipes_match_the_released_models():
    for name, size in (("fin.yml", "14b"), ("fin-7b.yml", "7b")):
        config = MergeConfiguration.model_validate(yaml.safe_load(open(os.path.join(ROOT, "recipes", name))))
        base, roles, params = resolve_roles(config)
        assert str(base) == f"rinna/nekomata-{size}"
        assert str(roles["domain"]) == f"pfnet/nekomata-{size}-pfn-qfin"
        assert str(roles["instruct"]) == f"rinna/nekomata-{size}-instruction"
        assert params["domain"]["weight"] == params["instruct"]["weight"] == 1.0 and config.dtype == "bfloat16"


ALPACA_JA = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n{instruction}\n\n### 応答:\n"
ALPACA_JA_INPUT = ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
                   "\n\n### 指示:\n{instruction}\n\n### 入力:\n{input}\n\n### 応答:\n")


def test_papers_recipes_carry_the_instruct_models_alpaca_ja_template():
    """nekomata-instruction has no chat template: both recipes give the merge the same one, which renders
    its model card's prompt (the merged-model rendering is tested in test_merge_output.py)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    templates = [yaml.safe_load(open(os.path.join(ROOT, "recipes", n), encoding="utf-8"))["chat_template"]
                 for n in ("fin.yml", "fin-7b.yml")]
    assert templates[0] == templates[1]
    template = _compile_jinja_template(templates[0])

    def render(messages):
        return template.render(messages=messages, add_generation_prompt=True)

    assert render([{"role": "user", "content": "要約せよ。"}]) == ALPACA_JA.format(instruction="要約せよ。")
    assert render([{"role": "user", "content": "要約せよ。\n\n### 入力:\n本文"}]) == ALPACA_JA_INPUT.format(
        instruction="要約せよ。", input="本文")
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        render([{"role": "tool", "content": "x"}])
    with pytest.raises(Exception, match="system message must come first"):
        render([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


@pytest.mark.parametrize("edit,message", [
    (lambda r: r["models"][0]["parameters"].update(wieght=0.5), r"unknown parameter `wieght`"),
    (lambda r: r["models"][0]["parameters"].update(weight="heavy"), r"`weight`: invalid value 'heavy'"),
    (lambda r: r["models"][0]["parameters"].update(weight=[{"filter": "lm_head", "value": "x"}]), r"invalid value 'x'"),
    (lambda r: r["models"][0]["parameters"].update(role=["domain"]), r"`role` is one string per model"),
])
def test_bad_parameters_are_named(tiny_family, edit, message):
    merge = recipe(tiny_family)
    edit(merge)
    with pytest.raises(RecipeError, match=message):
        check_parameters(MergeConfiguration.model_validate(merge))


def test_per_module_entry_without_value_fails_in_mergekits_schema(tiny_family):
    """mergekit's own schema (not finmerge) refuses a per-module weight entry that has a filter and no value."""
    from pydantic import ValidationError

    merge = recipe(tiny_family, w_domain=[{"filter": "lm_head"}])
    with pytest.raises(ValidationError) as raised:
        MergeConfiguration.model_validate(merge)
    missing = [e["loc"] for e in raised.value.errors() if e["type"] == "missing"]
    assert missing == [("models", 0, "parameters", "weight", "list[ConditionalParameter]", 0, "value")]


def test_role_in_top_level_parameters_is_refused(tiny_family):
    merge = recipe(tiny_family, parameters={"role": "domain"})
    with pytest.raises(RecipeError, match="set per model"):
        resolve_roles(MergeConfiguration.model_validate(merge))
