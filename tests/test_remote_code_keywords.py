"""Every keyword finmerge hands transformers for a model it did not write, on the strict Qwen-v1 fixture
(tests/qwen_fixture.py: no sdpa/flash declarations, no GenerationMixin, transformers-4 hooks, tuple caches):
each works, or gets a finmerge error naming the model and what to pass instead."""

import json
import os
import shutil

import pytest
import torch

from finmerge.evaluation.run import ModelLoadError, load_model
from finmerge.pretrain.config import PretrainConfig, PretrainError
from qwen_fixture import build_qwen_v1_triplet

FIN_TEMPLATE_QUESTIONS = ["金融市場を説明して。", "株式会社の決算と利益は? 市場の説明です。", "Hello"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build_qwen_v1_triplet(str(tmp_path_factory.mktemp("qwen")))


def _variant(source, folder, config_edit=None, code_edit=None):
    """A copy of a fixture model with its config.json or modeling code edited."""
    shutil.copytree(source, folder)
    if config_edit:
        path = os.path.join(folder, "config.json")
        config = json.load(open(path, encoding="utf-8"))
        config_edit(config)
        json.dump(config, open(path, "w", encoding="utf-8"))
    if code_edit:
        path = os.path.join(folder, "modeling_qwen.py")
        code = open(path, encoding="utf-8").read()
        open(path, "w", encoding="utf-8").write(code_edit(code))
    return str(folder)


def _pretrain_config(model, tmp_path, **overrides):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"株式会社{i}の決算と利益。Hello world {i} the market." for i in range(40)))
    values = dict(model=model, output_dir=str(tmp_path / "out"), data=[str(data)], txt_document="paragraph",
                  seq_len=16, max_steps=1, per_device_train_batch_size=2, eval_fraction=0.0, min_chars=5,
                  near_dedup=False, logging_steps=1, save_steps=1, num_threads=1, trust_remote_code=True)
    values.update(overrides)
    return PretrainConfig(**values)


# ---- attn_implementation ---------------------------------------------------------------------------

def test_attention_by_default_is_transformers_pick(qwen, tiny_family):
    """No backend requested: eager for code that declares none (Qwen-v1), sdpa where declared (Llama)."""
    from transformers import AutoConfig

    from finmerge.pretrain.train import load_model as pretrain_load_model

    assert PretrainConfig.__dataclass_fields__["attn_implementation"].default is None
    for path, expected in ((qwen["base"], "eager"), (tiny_family.base, "sdpa")):
        config = PretrainConfig(model=path, output_dir="unused", data=["unused"], trust_remote_code=True)
        model = pretrain_load_model(config, tokenizer=None, model_config=AutoConfig.from_pretrained(path, trust_remote_code=True))
        assert model.config._attn_implementation == expected, path


@pytest.mark.parametrize("backend", ["sdpa", "flash_attention_2"])
def test_attention_the_model_cannot_honour_is_refused_before_the_corpus_is_read(qwen, tmp_path, backend):
    from finmerge.pretrain.train import run_pretraining

    config = _pretrain_config(qwen["base"], tmp_path, attn_implementation=backend)
    with pytest.raises(PretrainError) as refused:
        run_pretraining(config)
    message = str(refused.value)
    assert f"--attn_implementation {backend}" in message and qwen["base"] in message
    assert "QWenLMHeadModel" in message and "values that work for it: eager" in message
    assert "leave the option unset" in message
    assert not (tmp_path / "out").exists()  # refused before OUT or the packed corpus was made


def test_eager_requested_explicitly_trains(qwen, tmp_path):
    from finmerge.pretrain.train import run_pretraining

    summary = run_pretraining(_pretrain_config(qwen["base"], tmp_path, attn_implementation="eager"))
    assert summary["steps"] == 1


# ---- dtype -----------------------------------------------------------------------------------------

def test_dtype_changed_by_the_models_own_code_is_refused(qwen, tmp_path):
    """Qwen-v1 converts itself to bf16 on a GPU when config.json sets none of bf16/fp16/fp32; a config saying
    bf16 does the same on any machine, so the CPU can show what finmerge does then."""
    from transformers import AutoConfig

    from finmerge.pretrain.train import load_model as pretrain_load_model

    bf16 = _variant(qwen["base"], tmp_path / "bf16", config_edit=lambda c: c.update(bf16=True))
    config = PretrainConfig(model=bf16, output_dir="unused", data=["unused"], trust_remote_code=True)
    with pytest.raises(PretrainError, match='loaded as bfloat16, though float32 was requested') as refused:
        pretrain_load_model(config, None, AutoConfig.from_pretrained(bf16, trust_remote_code=True))
    assert bf16 in str(refused.value) and '"fp32": true' in str(refused.value)
    with pytest.raises(ModelLoadError, match='"fp32": true'):
        load_model(bf16, trust_remote_code=True, dtype="fp32")
    model, _ = load_model(bf16, trust_remote_code=True, dtype="auto")  # its own dtype asked: nothing changed
    assert model.dtype == torch.bfloat16
    fp32, _ = load_model(qwen["base"], trust_remote_code=True, dtype="fp32")
    assert fp32.dtype == torch.float32 and fp32.config.fp32  # the CPU choice the real code makes


# ---- device_map ------------------------------------------------------------------------------------

def test_device_map_auto_loads_and_runs(qwen):
    """accelerate places the model by its _no_split_modules (["QWenBlock"], as Qwen-v1 declares)."""
    model, tokenizer = load_model(qwen["base"], trust_remote_code=True, device="auto")
    batch = tokenizer("株式会社の決算", return_tensors="pt")
    assert torch.isfinite(model(**batch).logits).all()


# ---- generate: use_cache, attention_mask, GenerationMixin ------------------------------------------

def _greedy_alone(model, prompt, steps, eos):
    """Oracle: one prompt, no padding, no cache, the full sequence rerun for every new token."""
    ids, new = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
            if token in eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_generation_of_a_padded_batch_equals_each_prompt_alone(qwen):
    """finmerge's eval generates batches, left-padded with an attention_mask, greedily; on Qwen-v1's code (its own
    prepare_inputs_for_generation, tuple caches) without a KV cache, since transformers 5 hands it a Cache object."""
    from finmerge.evaluation.data import QAItem
    from finmerge.evaluation.metrics import chat_generation, chat_prompt_ids
    from finmerge.pretrain.remote_code import legacy_generation

    import yaml

    template = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "recipes", "fin.yml"),
                                   encoding="utf-8"))["chat_template"]
    # the base: the instruct's generation_config adds a repetition penalty, which greedy generate applies too
    model, tokenizer = load_model(qwen["base"], trust_remote_code=True)
    assert legacy_generation(model) and model.generation_config.repetition_penalty in (None, 1.0)
    items = [QAItem(question=q, answer="x") for q in FIN_TEMPLATE_QUESTIONS]
    prompts = [chat_prompt_ids(tokenizer, item.question, template) for item in items]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is padded
    result = chat_generation(model, tokenizer, items, chat_template=template, max_new_tokens=5, batch_size=3)
    eos = [tokenizer.eos_token_id]
    for prompt, sample in zip(prompts, result["samples"]):
        assert sample["answer"] == tokenizer.decode(_greedy_alone(model, prompt, 5, eos), skip_special_tokens=True)
    with pytest.raises(TypeError, match="not subscriptable"):  # what a cached generate does to this code
        model.generate(input_ids=torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)


def test_every_load_in_a_process_can_generate(qwen):
    """transformers' auto class adds GenerationMixin to such code on its first load only."""
    from finmerge.pretrain.remote_code import generation_cache_kwargs

    for _ in range(2):
        model, tokenizer = load_model(qwen["domain"], trust_remote_code=True)
        batch = tokenizer("Hello world", return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=2, do_sample=False, **generation_cache_kwargs(model))
        assert out.shape[1] == batch.input_ids.shape[1] + 2


# ---- gradient checkpointing ------------------------------------------------------------------------

def test_activation_checkpointing_through_the_transformers_4_hook_gives_the_same_gradients(qwen):
    model, tokenizer = load_model(qwen["base"], trust_remote_code=True)
    model.train()
    batch = tokenizer("株式会社の決算と利益。" * 2, return_tensors="pt")

    def gradients():
        model.zero_grad()
        model(**batch, labels=batch.input_ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing  # set by the model's own _set_gradient_checkpointing
    with pytest.warns(UserWarning, match="use_reentrant"):  # Qwen-v1 calls torch's checkpoint itself
        checkpointed = gradients()
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)
