"""End-to-end: a recipe merged by mergekit itself gives base + w_d·τ_d + w_i·τ_i and a chat model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from finmerge.demo.tiny_models import END, recipe, write_recipe
from merge_helpers import assert_close_state, expected_merge, run_merge, tensors

BIN = os.path.dirname(sys.executable)


def _chat_prompt(tokenizer, question="What is the river of Velm?"):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _assert_instruct_chat_model(out, family):
    """Loads offline, formats chats like the instruct model, and generation stops at the instruct eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, instruct_tokenizer = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(family.instruct)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == instruct_tokenizer.apply_chat_template(messages, tokenize=False)
    end_id = instruct_tokenizer.convert_tokens_to_ids(END)
    assert tokenizer.eos_token == END
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["eos_token_id"] == end_id != json.load(open(os.path.join(family.base, "config.json")))["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.generation_config.eos_token_id == end_id
    prompt = _chat_prompt(tokenizer)
    generated = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert generated[-1].item() == end_id and (generated == end_id).sum() == 1, tokenizer.decode(generated)
    assert len(generated) < 30


@pytest.mark.slow
def test_plain_mergekit_yaml(tiny_family, tmp_path):
    out = tmp_path / "out"
    recipe_path = write_recipe(str(tmp_path / "recipe.yml"), tiny_family)
    subprocess.run([os.path.join(BIN, "mergekit-yaml"), recipe_path, str(out)], check=True, capture_output=True)
    assert_close_state(tensors(out), expected_merge(tiny_family))
    _assert_instruct_chat_model(out, tiny_family)
    card = (out / "README.md").read_text()
    assert "## finmerge: domain_instruct" in card and "# out" in card
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


@pytest.mark.slow
def test_equals_mergekit_task_arithmetic_on_disk(tiny_family, tmp_path):
    ours, reference = tmp_path / "ours", tmp_path / "ta"
    run_merge(recipe(tiny_family), ours)
    task_arithmetic = {
        "merge_method": "task_arithmetic", "base_model": tiny_family.base, "dtype": "float32",
        "models": [{"model": tiny_family.domain, "parameters": {"weight": 1.0}},
                   {"model": tiny_family.instruct, "parameters": {"weight": 1.0}}],
    }
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", _write(tmp_path / "ta.yml", task_arithmetic), str(reference)],
                   check=True, capture_output=True)
    assert_close_state(tensors(ours), tensors(reference), atol=1e-6)


def _write(path, data):
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


@pytest.mark.slow
def test_python_module_entry_point_and_finmerge_merge(tiny_family, tmp_path):
    recipe_path = write_recipe(str(tmp_path / "recipe.yml"), tiny_family, w_domain=0.5, w_instruct=1.5)
    expected = expected_merge(tiny_family, 0.5, 1.5)
    subprocess.run([sys.executable, "-m", "mergekit.scripts.run_yaml", recipe_path, str(tmp_path / "a")], check=True, capture_output=True)
    assert_close_state(tensors(tmp_path / "a"), expected)
    finmerge = os.path.join(BIN, "finmerge")
    subprocess.run([finmerge, "merge", recipe_path, str(tmp_path / "b"), "--quiet", "--out-shard-size", "50K"], check=True, capture_output=True)
    assert len([f for f in os.listdir(tmp_path / "b") if f.endswith(".safetensors")]) > 1  # a mergekit option went through
    assert_close_state(tensors(tmp_path / "b"), expected)
    _assert_instruct_chat_model(tmp_path / "b", tiny_family)
    refused = subprocess.run([finmerge, "merge", recipe_path, str(tmp_path / "b")], capture_output=True, text=True)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    subprocess.run([finmerge, "merge", recipe_path, str(tmp_path / "b"), "--overwrite"], check=True, capture_output=True)


def test_in_process_output_is_instruct_chat_model(tiny_family, tmp_path):
    run_merge(recipe(tiny_family, 1.0, 1.0), tmp_path / "out")
    assert_close_state(tensors(tmp_path / "out"), expected_merge(tiny_family))
    _assert_instruct_chat_model(tmp_path / "out", tiny_family)


def test_per_module_weights_with_filters(tiny_family, tmp_path):
    merge = recipe(tiny_family, w_domain=[{"filter": "embed_tokens", "value": 0.0}, {"value": 1.0}], w_instruct=0.5)
    run_merge(merge, tmp_path / "out")
    merged, with_domain, without_domain = tensors(tmp_path / "out"), expected_merge(tiny_family, 1.0, 0.5), expected_merge(tiny_family, 0.0, 0.5)
    for name, tensor in merged.items():
        expected = without_domain if "embed_tokens" in name else with_domain
        assert torch.allclose(tensor, expected[name], atol=1e-6, rtol=0), name
    assert not torch.allclose(with_domain["model.embed_tokens.weight"], without_domain["model.embed_tokens.weight"])


def test_explicit_chat_template_in_recipe_wins(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    run_merge(recipe(tiny_family, chat_template="chatml"), tmp_path / "out")
    template = AutoTokenizer.from_pretrained(str(tmp_path / "out")).chat_template
    assert "<|im_start|>" in template


def test_bf16_output(tiny_family, tmp_path):
    run_merge(recipe(tiny_family, dtype="float32", out_dtype="bfloat16"), tmp_path / "out")
    merged = tensors(tmp_path / "out")
    expected = {k: v.to(torch.bfloat16) for k, v in expected_merge(tiny_family).items()}
    assert all(merged[k].dtype == torch.bfloat16 for k in merged)
    assert_close_state(merged, expected, atol=0)


def test_remote_code_files_of_the_instruct_model_are_copied_not_run(tiny_family, tmp_path):
    """A Qwen-v1-style instruct model names its code in auto_map; OUT needs those files to load."""
    import shutil

    from merge_helpers import copy_model

    instruct = copy_model(tiny_family.instruct, tmp_path / "instruct-with-code",
                          edit_config=lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}))
    (tmp_path / "instruct-with-code" / "modeling_tiny.py").write_text("raise SystemExit('must never run')\n")
    (tmp_path / "instruct-with-code" / "tokenization_tiny.py").write_text("raise SystemExit('must never run')\n")
    config_path = tmp_path / "instruct-with-code" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}
    config_path.write_text(json.dumps(tokenizer_config))
    merge = recipe(tiny_family)
    merge["models"][1]["model"] = instruct
    run_merge(merge, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_tiny.py").exists() and (tmp_path / "out" / "tokenization_tiny.py").exists()
    shutil.rmtree(tmp_path / "out")
