"""End-to-end: a recipe merged by mergekit itself gives base + w_d·τ_d + w_i·τ_i and a chat model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bad_input import invoke
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
    # the same command in this process (no second start-up): an existing OUT needs --overwrite
    refused = invoke(["merge", recipe_path, tmp_path / "b"])
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    overwritten = invoke(["merge", recipe_path, tmp_path / "b", "--overwrite", "--quiet"])
    assert overwritten.returncode == 0, overwritten.stderr
    assert_close_state(tensors(tmp_path / "b"), expected)


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


def test_remote_code_of_the_model_from_the_base_of_the_tokenizer_from_the_instruct(tiny_family, tmp_path):
    """auto_map files are copied, never run: the model's from the base (OUT's config.json is the base's),
    the tokenizer's from the instruct model (OUT's tokenizer is the instruct's)."""
    from merge_helpers import copy_model

    never_run = "raise SystemExit('must never run')\n"
    model_map = {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}
    base = copy_model(tiny_family.base, tmp_path / "base-with-code", edit_config=lambda c: c.update(auto_map=model_map))
    instruct = copy_model(tiny_family.instruct, tmp_path / "instruct-with-code", edit_config=lambda c: c.update(auto_map=model_map))
    (tmp_path / "base-with-code" / "modeling_tiny.py").write_text("# the base's\n" + never_run)
    (tmp_path / "instruct-with-code" / "modeling_tiny.py").write_text("# the instruct's\n" + never_run)
    (tmp_path / "instruct-with-code" / "tokenization_tiny.py").write_text(never_run)
    config_path = tmp_path / "instruct-with-code" / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}
    config_path.write_text(json.dumps(tokenizer_config))
    merge = recipe(tiny_family)
    merge["base_model"], merge["models"][1]["model"] = base, instruct
    run_merge(merge, tmp_path / "out")
    assert (tmp_path / "out" / "modeling_tiny.py").read_text().startswith("# the base's")
    assert (tmp_path / "out" / "tokenization_tiny.py").read_text() == never_run


# ---- the paper's model shape: Qwen-v1 remote code (tests/qwen_fixture.py) ----------------------------

# Alpaca-ja prompt of rinna/nekomata-14b-instruction (its model card), with and without an input.
WITH_INPUT = ("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。"
              "\n\n### 指示:\n{instruction}\n\n### 入力:\n{input}\n\n### 応答:\n")
WITHOUT_INPUT = "以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。\n\n### 指示:\n{instruction}\n\n### 応答:\n"
INPUT_MARK = "\n\n### 入力:\n"


def _fin_recipe_for(paths, tmp_path, name="fin.yml"):
    """recipes/fin.yml's exact text with only the three model ids replaced by the fixture's folders."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    body = open(os.path.join(root, "recipes", name), encoding="utf-8").read()
    size = "14b" if name == "fin.yml" else "7b"
    for model_id, role in ((f"rinna/nekomata-{size}-instruction", "instruct"),
                           (f"pfnet/nekomata-{size}-pfn-qfin", "domain"), (f"rinna/nekomata-{size}", "base")):
        assert model_id in body
        body = body.replace(model_id, paths[role])
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def qwen_merged(tmp_path_factory):
    """The bf16 nekomata-shaped triplet merged by plain `mergekit-yaml` with fin.yml's body."""
    from qwen_fixture import build_qwen_v1_triplet

    folder = tmp_path_factory.mktemp("qwen-merge")
    paths = build_qwen_v1_triplet(str(folder / "models"), dtype=torch.bfloat16)
    out = folder / "OUT"
    result = subprocess.run([os.path.join(BIN, "mergekit-yaml"), _fin_recipe_for(paths, folder), str(out),
                             "--trust-remote-code"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return paths, str(out)


@pytest.mark.slow
def test_fin_recipe_on_remote_code_models_loads_and_runs(qwen_merged):
    from finmerge.evaluation.run import load_model

    from qwen_fixture import EOD, code_files, eod_id

    paths, out = qwen_merged
    for name in code_files():  # auto_map modules, what they import relatively, the kernel source beside them
        assert os.path.isfile(os.path.join(out, name)), name
    # Through finmerge's loader: Qwen-v1's code calls get_head_mask, which plain transformers 5 lacks
    model, tokenizer = load_model(out, trust_remote_code=True, dtype="auto")
    assert type(model).__name__ == "QWenLMHeadModel" and type(tokenizer).__name__ == "QWenTokenizer"
    assert model.dtype == torch.bfloat16 and tokenizer.eos_token == EOD
    assert model.generation_config.eos_token_id == eod_id() and model.generation_config.do_sample  # the instruct's
    assert tokenizer.model_max_length == 2048  # the instruct's tokenizer_config (the base's says 8192)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "株式市場を説明して。"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    logits = model(**prompt).logits
    assert logits.shape == (1, prompt["input_ids"].shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_fin_recipe_on_remote_code_models_is_base_plus_both_task_vectors(qwen_merged):
    """OUT = bf16(base + τ_d + τ_i), the sum taken in float64 from the bf16 inputs. Tolerance: one bf16
    ulp of the reference (|Δ| ≤ 2^-7·|ref|); we compute in fp32 and round once, so most entries are exact."""
    from qwen_fixture import load_tensors

    paths, out = qwen_merged
    base, domain, instruct = (load_tensors(paths[r]) for r in ("base", "domain", "instruct"))
    merged = tensors(out)
    assert set(merged) == set(base)
    exact = total = 0
    for name, b in base.items():
        reference = b.double() + (domain[name].double() - b.double()) + (instruct[name].double() - b.double())
        assert merged[name].dtype == torch.bfloat16
        error = (merged[name].double() - reference).abs()
        assert (error <= 2.0 ** -7 * reference.abs() + 1e-30).all(), name
        exact += int((merged[name] == reference.to(torch.bfloat16)).sum())
        total += reference.numel()
        assert not torch.equal(merged[name], b), name
    assert exact / total > 0.99


@pytest.mark.slow
def test_fin_recipe_chat_template_renders_the_alpaca_ja_prompt(qwen_merged):
    from transformers import AutoTokenizer

    from qwen_fixture import EOD

    _, out = qwen_merged
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)

    def render(messages, generation=True):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    question, context = "この決算の要点を述べなさい。", "売上高は前年比10%増。"
    assert render([{"role": "user", "content": question}]) == WITHOUT_INPUT.format(instruction=question)
    with_input = [{"role": "user", "content": question + INPUT_MARK + context}]
    assert render(with_input) == WITH_INPUT.format(instruction=question, input=context)
    answer = "増収です。"
    turns = with_input + [{"role": "assistant", "content": answer}, {"role": "user", "content": "理由は?"}]
    assert render(turns) == (WITH_INPUT.format(instruction=question, input=context) + answer + EOD
                             + WITHOUT_INPUT.format(instruction="理由は?"))
    system = [{"role": "system", "content": "あなたは金融の専門家です。"}, {"role": "user", "content": question}]
    assert render(system) == "あなたは金融の専門家です。" + WITHOUT_INPUT.format(instruction=question)[
        len("以下は、タスクを説明する指示です。要求を適切に満たす応答を書きなさい。"):]
    assert render([{"role": "user", "content": question}], generation=False) == (
        WITHOUT_INPUT.format(instruction=question)[:-len("\n\n### 応答:\n")])
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids) == render(turns)
    with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as handle:
        saved = json.load(handle).get("chat_template")
    if saved is None:
        saved = open(os.path.join(out, "chat_template.jinja"), encoding="utf-8").read()
    assert "### 応答:" in saved  # stored in OUT, not only in this process


def test_remote_code_output_loads_in_process(tmp_path):
    """Fast twin of the mergekit-yaml test: OUT of an in-process merge carries every code file and loads."""
    import yaml

    from finmerge.evaluation.run import load_model
    from qwen_fixture import build_qwen_v1_triplet, code_files

    paths = build_qwen_v1_triplet(str(tmp_path / "models"))
    merge = yaml.safe_load(open(_fin_recipe_for(paths, tmp_path), encoding="utf-8"))
    run_merge(merge, tmp_path / "out", trust_remote_code=True)
    out = str(tmp_path / "out")
    assert all(os.path.isfile(os.path.join(out, n)) for n in code_files())
    model, tokenizer = load_model(out, trust_remote_code=True)  # finmerge's loader: see the test above
    batch = tokenizer("以下は、金融市場の説明です。", return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


def test_which_files_remote_code_needs(tmp_path):
    """Relative imports followed recursively (transformers' parser), kernel sources referenced by name
    beside the code; weights, unreferenced files and code in other repositories left out."""
    from finmerge.plugins.instruct_output import remote_code_files

    (tmp_path / "modeling_x.py").write_text("from .helpers import f\nKERNEL = 'kernels/../fused.cu'\n")
    (tmp_path / "helpers.py").write_text("from .deeper import g\nWEIGHTS = 'model.safetensors'\n")
    (tmp_path / "deeper.py").write_text("import os\nSOURCE = os.path.join(os.path.dirname(__file__), 'fused.cpp')\n")
    for name in ("fused.cu", "fused.cpp", "model.safetensors", "unrelated.cpp", "unused.py"):
        (tmp_path / name).write_text("x")
    auto_map = {"AutoModelForCausalLM": "modeling_x.XForCausalLM", "AutoTokenizer": ["other/repo--tok.T", None],
                "AutoConfig": str(tmp_path.parent / "outside") + ".C"}  # a file outside the folder: never copied
    assert "." not in str(tmp_path.parent)
    (tmp_path.parent / "outside.py").write_text("x")
    assert remote_code_files(str(tmp_path), auto_map) == [
        "deeper.py", "fused.cpp", "fused.cu", "helpers.py", "modeling_x.py"]


