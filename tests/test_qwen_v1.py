"""The nekomata-shaped fixture (tests/qwen_fixture.py) is what it claims: remote-code Qwen-v1 checkpoints
that transformers loads with trust_remote_code and that run."""

import json
import os

import pytest
import torch

from qwen_fixture import EOD, SHARDS, build_qwen_v1_triplet, code_files, eod_id, load_tensors

ROLES = ("base", "domain", "instruct")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def triplet(request, tmp_path_factory):
    dtype = request.param
    return dtype, build_qwen_v1_triplet(str(tmp_path_factory.mktemp("qwen")), dtype=dtype)


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_layout_is_nekomata_shaped(triplet):
    from importlib.resources import files

    _, paths = triplet
    qwen = json.loads(files("mergekit._data.architectures").joinpath("qwen.json").read_text())
    expected = {w["name"] for w in qwen["pre_weights"] + qwen["post_weights"]}
    for layer in range(2):
        expected |= {w["name"].replace("${layer_index}", str(layer)) for w in qwen["layer_templates"]["weights"]}
    for role in ROLES:
        folder = paths[role]
        for name in code_files() + SHARDS + ("qwen.tiktoken", "model.safetensors.index.json"):
            assert os.path.isfile(os.path.join(folder, name)), (role, name)
        config = _read(os.path.join(folder, "config.json"))
        assert config["architectures"] == ["QWenLMHeadModel"] and config["model_type"] == "qwen"
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        weight_map = _read(os.path.join(folder, "model.safetensors.index.json"))["weight_map"]
        assert set(weight_map) == expected and set(weight_map.values()) == set(SHARDS)
        tokenizer_config = _read(os.path.join(folder, "tokenizer_config.json"))
        assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_qwen.QWenTokenizer"
        assert "chat_template" not in tokenizer_config
        assert not os.path.exists(os.path.join(folder, "chat_template.jinja"))
    with open(os.path.join(paths["base"], "modeling_qwen.py"), encoding="utf-8") as handle:
        assert "from .qwen_generation_utils import" in handle.read()
    generation = _read(os.path.join(paths["instruct"], "generation_config.json"))
    assert generation["eos_token_id"] == eod_id() and generation["do_sample"] is True


def test_roles_differ_by_small_deterministic_perturbations(triplet, tmp_path):
    dtype, paths = triplet
    base, domain, instruct = (load_tensors(paths[r]) for r in ROLES)
    for name, tensor in base.items():
        assert tensor.dtype == dtype
        for other in (domain, instruct):
            delta = (other[name].double() - tensor.double()).abs()
            assert 0 < delta.max() < 0.2, name
    assert not torch.equal(domain["lm_head.weight"], instruct["lm_head.weight"])
    again = build_qwen_v1_triplet(str(tmp_path), dtype=dtype)
    for role in ROLES:
        rebuilt = load_tensors(again[role])
        assert all(torch.equal(rebuilt[n], t) for n, t in load_tensors(paths[role]).items())


# What released Qwen-v1 modeling_qwen.py (Qwen/Qwen-7B, shipped unchanged by rinna/nekomata-*) declares.
REAL_FORWARD = ["self", "input_ids", "past_key_values", "attention_mask", "token_type_ids", "position_ids", "head_mask",
                "inputs_embeds", "encoder_hidden_states", "encoder_attention_mask", "labels", "use_cache",
                "output_attentions", "output_hidden_states", "return_dict"]


def _classes(path):
    """The fixture's classes as its own module defines them (before any auto class wraps them)."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    head = get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], path)
    return head, head.__mro__[1], config


def test_class_surface_is_the_released_codes(triplet):
    """As strict as the real code: nothing transformers 5 would credit it with beyond what Qwen-v1 declares."""
    import inspect

    from transformers import GenerationMixin, PreTrainedModel

    _, paths = triplet
    head, pretrained, config = _classes(paths["base"])
    assert head.__bases__ == (pretrained,) and pretrained.__bases__ == (PreTrainedModel,)
    assert not issubclass(head, GenerationMixin)
    for hook in ("_supports_sdpa", "_supports_flash_attn", "_supports_flex_attn"):
        assert not getattr(head, hook), hook  # PreTrainedModel's own False, never overridden
        assert hook not in vars(pretrained) and hook not in vars(head)
    assert pretrained._no_split_modules == ["QWenBlock"] and pretrained.supports_gradient_checkpointing
    assert pretrained.is_parallelizable is False and pretrained._skip_keys_device_placement == "past_key_values"
    assert list(inspect.signature(pretrained._set_gradient_checkpointing).parameters) == ["self", "module", "value"]
    assert "generate" in vars(head) and "prepare_inputs_for_generation" in vars(head)
    assert list(inspect.signature(head.forward).parameters) == REAL_FORWARD  # and no **kwargs
    assert (config.bf16, config.fp16, config.fp32, config.use_flash_attn) == (False, False, False, "auto")


def test_plain_transformers_5_cannot_run_it_as_it_cannot_run_qwen_v1(triplet):
    """The released code calls self.get_head_mask (gone in transformers 5) and refuses sdpa; so does the fixture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths = triplet
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        AutoModelForCausalLM.from_pretrained(paths["base"], trust_remote_code=True, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_pretrained(paths["base"], trust_remote_code=True)
    assert model.config._attn_implementation == "eager"  # transformers' pick when nothing is declared
    batch = AutoTokenizer.from_pretrained(paths["base"], trust_remote_code=True)("Hello world", return_tensors="pt")
    with pytest.raises(AttributeError, match="get_head_mask"):
        model(**batch)


def test_each_model_loads_with_remote_code_and_runs(triplet):
    from finmerge.evaluation.run import load_model
    from finmerge.pretrain.remote_code import generation_cache_kwargs

    dtype, paths = triplet
    for role in ROLES:
        model, tokenizer = load_model(paths[role], trust_remote_code=True, dtype="auto")
        assert type(model).__name__ == "QWenLMHeadModel" and model.dtype == dtype
        assert type(tokenizer).__name__ == "QWenTokenizer"
        assert tokenizer.eos_token == EOD and tokenizer.eos_token_id == eod_id()
        assert tokenizer.chat_template is None
        state = model.state_dict()
        assert all(torch.equal(state[n], t) for n, t in load_tensors(paths[role]).items())

        text = "以下は、金融市場の説明です。" + EOD + "Hello world"
        batch = tokenizer(text, return_tensors="pt")
        assert tokenizer.decode(batch.input_ids[0]) == text
        assert batch.input_ids[0].tolist().count(eod_id()) == 1  # the special token is one id
        out = model(**batch, labels=batch.input_ids)
        assert out.logits.shape == (1, batch.input_ids.shape[1], model.config.vocab_size)
        assert torch.isfinite(out.loss) and out.loss.item() > 0
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, **generation_cache_kwargs(model))
        assert generated.shape[1] == batch.input_ids.shape[1] + 3


def test_a_tuple_cache_continues_the_sequence_exactly(tmp_path):
    """The fixture's own KV cache (tuples, as Qwen-v1's) gives the logits of the full forward."""
    from finmerge.evaluation.run import load_model

    model, tokenizer = load_model(build_qwen_v1_triplet(str(tmp_path))["base"], trust_remote_code=True)
    ids = tokenizer("株式会社の決算と利益。", return_tensors="pt").input_ids
    full = model(input_ids=ids, use_cache=False).logits
    prefix = model(input_ids=ids[:, :-2], use_cache=True)
    rest = model(input_ids=ids[:, -2:], past_key_values=prefix.past_key_values, use_cache=True).logits
    assert isinstance(prefix.past_key_values, tuple)
    assert torch.allclose(rest, full[:, -2:], atol=1e-5)


def test_training_step_reduces_the_loss(tmp_path):
    """What `finmerge pretrain` needs from the base: a loss from labels that gradients lower (fp32), with
    activation checkpointing enabled through the transformers-4 hook the released code defines."""
    from finmerge.evaluation.run import load_model

    model, tokenizer = load_model(build_qwen_v1_triplet(str(tmp_path))["base"], trust_remote_code=True)
    model.activation_checkpointing_enable()
    assert model.transformer.gradient_checkpointing
    model.train()
    batch = tokenizer("株式会社の決算と利益。" * 3, return_tensors="pt")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        loss = model(**batch, labels=batch.input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
