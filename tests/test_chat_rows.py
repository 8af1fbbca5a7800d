"""`instruct_rows: auto`: chat-control ids from the instruct tokenizer's chat template, never ordinary text."""

import json
import os
import shutil

import pytest
import yaml

from finmerge.demo.family import ASSISTANT, BASE_EOS, END, USER
from finmerge.demo.tiny_models import recipe
from finmerge.plugins.chat_rows import rendered_control_tokens
from finmerge.plugins.preflight import RecipeError
from merge_helpers import run_merge, tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _alpaca_ja_template():
    with open(os.path.join(ROOT, "recipes", "fin.yml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["chat_template"]


def test_template_from_tokenizer_config_gives_its_turn_tokens(tiny_family):
    tokenizer = _tokenizer(tiny_family.instruct)
    rows = rendered_control_tokens(tokenizer)
    assert [i for i, _ in rows] == sorted(_ids(tokenizer, USER, ASSISTANT, END))
    assert {t for _, t in rows} == {USER, ASSISTANT, END}


def test_chatml_template_gives_im_start_and_im_end_only(tiny_family, tmp_path):
    """Qwen2/SmolLM2 style: the role names the template writes ('user', 'assistant') are ordinary text."""
    tokenizer = _tokenizer(tiny_family.instruct)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    rows = rendered_control_tokens(tokenizer)
    assert {t for _, t in rows} == {"<|im_start|>", "<|im_end|>"}


def test_alpaca_ja_template_gives_only_the_end_of_text_token(tiny_family):
    """`### 指示:` and `### 応答:` are ordinary words: only the token that ends an answer is a control token."""
    tokenizer = _tokenizer(tiny_family.instruct)
    tokenizer.chat_template = _alpaca_ja_template()
    assert rendered_control_tokens(tokenizer) == [(tokenizer.convert_tokens_to_ids(BASE_EOS), BASE_EOS)]


def test_auto_merge_equals_the_merge_with_those_ids_and_reports_them(tiny_family, tmp_path):
    ids = sorted(_ids(_tokenizer(tiny_family.instruct), USER, ASSISTANT, END))
    explicit, auto = recipe(tiny_family), recipe(tiny_family)
    explicit["parameters"] = {"instruct_rows": ",".join(map(str, ids))}
    auto["parameters"] = {"instruct_rows": "auto"}
    for merge in (explicit, auto):  # weights where protecting the rows changes them
        merge["models"][0]["parameters"]["weight"] = 1.5
    run_merge(explicit, tmp_path / "explicit")
    run_merge(auto, tmp_path / "auto")
    expected, got = tensors(tmp_path / "explicit"), tensors(tmp_path / "auto")
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)
    plain = recipe(tiny_family)
    plain["models"][0]["parameters"]["weight"] = 1.5
    run_merge(plain, tmp_path / "plain")
    assert not (tensors(tmp_path / "plain")["lm_head.weight"] == got["lm_head.weight"]).all()  # the rows did change
    report = json.loads((tmp_path / "auto" / "diagnostics.json").read_text())
    assert [r["id"] for r in report["instruct_rows"]] == ids
    card = (tmp_path / "auto" / "README.md").read_text()
    assert "instruct_rows: auto" in card and f"`{END}`" in card


def test_auto_follows_the_recipes_own_chat_template(tiny_family, tmp_path):
    merge = recipe(tiny_family)
    merge["parameters"] = {"instruct_rows": "auto"}
    merge["chat_template"] = _alpaca_ja_template()
    run_merge(merge, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "diagnostics.json").read_text())
    assert [r["token"] for r in report["instruct_rows"]] == [BASE_EOS]


def test_auto_without_any_chat_template_is_refused(tiny_family, tmp_path):
    instruct = tmp_path / "instruct"
    shutil.copytree(tiny_family.instruct, instruct)
    config_path = instruct / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (instruct / "chat_template.jinja").unlink(missing_ok=True)
    merge = recipe(tiny_family)
    merge["models"][1]["model"] = str(instruct)
    merge["parameters"] = {"instruct_rows": "auto"}
    with pytest.raises(RecipeError, match=rf"instruct model {instruct} has none .*`chat_template:`"):
        run_merge(merge, tmp_path / "out")
    assert not (tmp_path / "out").exists()
