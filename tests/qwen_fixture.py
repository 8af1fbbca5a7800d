"""A tiny Qwen-v1 checkpoint triplet laid out like rinna's nekomata family, for tests.

nekomata (the paper's base, rinna/nekomata-14b) is a Qwen-v1 model whose folder carries its own
Python code and loads only with trust_remote_code. The folders built here have that shape:

- configuration_qwen.py (QWenConfig, model_type "qwen", Qwen-v1's fields and defaults), modeling_qwen.py
  (QWenLMHeadModel with the Qwen-v1 tensor names mergekit's qwen architecture expects), which imports
  `from .qwen_generation_utils import ...` and, in a try block, `from .cpp_kernels import ...`;
  cpp_kernels.py refers to a kernel source next to itself (cache_autogptq_cuda_256.cpp) by a path
  relative to `__file__`, as Qwen-v1's does;
- tokenization_qwen.py: a tiktoken tokenizer reading qwen.tiktoken (a small byte-level BPE vocabulary
  with Qwen's special tokens), named in tokenizer_config.json's auto_map;
- auto_map in config.json, weights as two safetensors shards with model.safetensors.index.json,
  dtype float32 or bfloat16;
- the instruct model has NO chat template and a generation_config.json whose eos is `<|endoftext|>`
  (with other sampling settings than the base's, so a test can tell whose was copied).

domain = base + a small perturbation (seed 1), instruct = base + another (seed 2); everything is
deterministic.

The modeling code is our own, written against the class surface of the released Qwen-v1
modeling_qwen.py (Qwen/Qwen-7B, which nekomata ships unchanged), so that finmerge meets what it would
meet on nekomata. It MIRRORS:
- bases: QWenPreTrainedModel(PreTrainedModel), QWenModel/QWenLMHeadModel(QWenPreTrainedModel); no
  GenerationMixin (transformers' auto class adds it, on the first load in a process only), no
  `_supports_sdpa`/`_supports_flash_attn`/`_supports_flex_attn` (so transformers refuses sdpa and
  flash_attention_2 requests and records eager); its own attention: torch's scaled_dot_product_attention,
  or flash-attn when importable, on CUDA, in bf16/fp16 (`use_flash_attn: "auto"`);
- class attributes: config_class, base_model_prefix "transformer", is_parallelizable False,
  supports_gradient_checkpointing, `_no_split_modules = ["QWenBlock"]`, `_skip_keys_device_placement`,
  `_keys_to_ignore_on_load_*`; `_init_weights`;
- gradient checkpointing the transformers < 4.35 way: `_set_gradient_checkpointing(module, value)` sets
  QWenModel.gradient_checkpointing, whose forward calls torch.utils.checkpoint itself (no use_reentrant);
  QWenBlock is a plain nn.Module;
- forward signatures (QWenLMHeadModel: input_ids, past_key_values, attention_mask, token_type_ids,
  position_ids, head_mask, inputs_embeds, encoder_hidden_states, encoder_attention_mask, labels,
  use_cache, output_attentions, output_hidden_states, return_dict; no **kwargs, so the Trainer passes
  no num_items_in_batch); `self.get_head_mask(...)` called in every forward (gone in transformers 5);
  `config.use_return_dict`; a 0/1 attention_mask made additive; position_ids accepted and ignored
  (rotary positions count from the cache length); tuple caches of (batch, seq, heads, head_dim);
  loss = mean cross-entropy of the shifted labels;
- `prepare_inputs_for_generation` (drops the prompt to its last token when given any truthy cache,
  drops attention_mask for a batch of one) and its own `generate` (pops `stop_words_ids`, passes
  generation_config explicitly to GenerationMixin.generate);
- RotaryEmbedding rebuilding its non-persistent inv_freq on first use (transformers 5 leaves it
  uninitialized after loading);
- QWenLMHeadModel.__init__ picking the precision when config.json sets none of bf16/fp16/fp32 (bf16 or
  fp16 on a GPU, fp32 otherwise, written into the config) and converting itself to it;
- the tokenizer's `_decode`: skip_special_tokens drops every id from `<|endoftext|>` on.
It SIMPLIFIES: no dynamic NTK or logn attention scaling (they act only beyond seq_length, which tests
never reach), no KV-cache quantization or its kernels, no output_attentions, no dropout beyond the
config's zero rates, stop_words_ids only as single-token stops, `chat` reduced to a raw prompt, no
`chat_stream`, and a smaller qwen_generation_utils.py.
"""

import base64
import json
import os
from typing import Dict, List

import torch
from safetensors.torch import save_file

EOD = "<|endoftext|>"
SPECIAL_TOKENS = (EOD, "<|im_start|>", "<|im_end|>")
CODE_FILES = ("configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "cpp_kernels.py",
              "tokenization_qwen.py")
KERNEL_SOURCE = "cache_autogptq_cuda_256.cpp"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")

CONFIG = {
    "vocab_size": 512,  # padded beyond the tokenizer's size, as Qwen-v1's 151936 is
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,  # Qwen-v1 convention: the MLP's w1/w2 have intermediate_size // 2 rows
    "max_position_embeddings": 256,
    "layer_norm_epsilon": 1e-6,
    "rotary_emb_base": 10000,
    "initializer_range": 0.02,
    "use_cache_kernel": False,
    "tie_word_embeddings": False,
    # Qwen-v1's own switches, as nekomata's config.json sets them
    "kv_channels": 8,  # hidden_size // num_attention_heads
    "seq_length": 256,
    "bf16": False, "fp16": False, "fp32": False,  # none set: the model picks bf16/fp16 itself on a GPU
    "use_flash_attn": "auto",
    "use_dynamic_ntk": True, "use_logn_attn": True,
    "no_bias": True,
    "emb_dropout_prob": 0.0, "attn_dropout_prob": 0.0,
    "scale_attn_weights": True,
    "use_cache": True,
    "use_cache_quantization": False,
    "softmax_in_fp32": False,
}

# Words that get their own tokens (besides the 256 single bytes), so that Japanese prompts and the
# Alpaca-ja template's markers encode to a few tokens each.
WORDS = (
    "以下", "は", "、", "。", "タスク", "説明", "指示", "入力", "応答", "要求", "文脈", "組み合わせ",
    "適切", "満たす", "書きなさい", "です", "金融", "市場", "株式", "会社", "決算", "利益", "###", "### ",
    ":\n", "\n\n", " the", " of", " and", "ing", "Hello", " world", "the", "market",
)

CONFIGURATION_QWEN = '''\
"""Configuration of the tiny Qwen-v1-shaped test model (model_type "qwen"): Qwen-v1's fields and defaults."""

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=151936, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 emb_dropout_prob=0.0, attn_dropout_prob=0.0, layer_norm_epsilon=1e-6, initializer_range=0.02,
                 max_position_embeddings=8192, scale_attn_weights=True, use_cache=True, bf16=False, fp16=False,
                 fp32=False, kv_channels=128, rotary_pct=1.0, rotary_emb_base=10000, use_dynamic_ntk=True,
                 use_logn_attn=True, use_flash_attn="auto", intermediate_size=22016, no_bias=True,
                 tie_word_embeddings=False, use_cache_quantization=False, use_cache_kernel=False,
                 softmax_in_fp32=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.max_position_embeddings = max_position_embeddings
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.no_bias = no_bias
        self.use_cache_quantization = use_cache_quantization
        self.use_cache_kernel = use_cache_kernel
        self.softmax_in_fp32 = softmax_in_fp32
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_QWEN = '''\
"""The tiny Qwen-v1-shaped test model: Qwen-v1's class surface and tensor names, minimal internals.

Written for transformers 4 as Qwen-v1's modeling_qwen.py is: the model classes derive from
PreTrainedModel only (no GenerationMixin, no _supports_sdpa/_supports_flash_attn: the attention is
the model's own), caches are tuples of (batch, seq, heads, head_dim) tensors, and QWenModel.forward
calls `self.get_head_mask`, which transformers 5 no longer provides.
"""

import math
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import GenerationConfig, StoppingCriteriaList
from transformers.generation.logits_process import LogitsProcessorList
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import HistoryType, get_stop_words_ids, make_context

try:  # Qwen-v1 compiles a fused KV-cache kernel from sources shipped beside its code, when it can
    from .cpp_kernels import cache_kernel_source
except ImportError:
    cache_kernel_source = None

SUPPORT_CUDA = torch.cuda.is_available()
SUPPORT_BF16 = SUPPORT_CUDA and torch.cuda.is_bf16_supported()
SUPPORT_FP16 = SUPPORT_CUDA and torch.cuda.get_device_capability(0)[0] >= 7

flash_attn_func = None


def _import_flash_attn():
    """Qwen-v1 imports the flash-attn package itself (never through transformers' attn_implementation)."""
    global flash_attn_func
    try:
        from flash_attn.flash_attn_interface import flash_attn_func as imported
        flash_attn_func = imported
    except ImportError:
        flash_attn_func = None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin for positions 0..seq_len-1: Qwen-v1 numbers positions itself and never reads position_ids.

    As Qwen-v1's, inv_freq is a non-persistent buffer rebuilt (with the cos/sin cache) the first time a
    longer sequence comes: transformers 5 leaves such buffers uninitialized after from_pretrained, and
    this rebuild is what keeps the released code right all the same."""

    def __init__(self, dim, base=10000):
        super().__init__()
        self.dim = dim
        self.base = base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rotary_pos_emb_cache = None
        self._seq_len_cached = 0

    def update_rotary_pos_emb_cache(self, seq_len):
        if seq_len > self._seq_len_cached:
            device = self.inv_freq.device
            self.inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))
            self._seq_len_cached = max(2 * seq_len, 16)
            positions = torch.arange(self._seq_len_cached, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]  # (1, seq, 1, head_dim)
            self._rotary_pos_emb_cache = [angles.cos(), angles.sin()]

    def forward(self, seq_len):
        self.update_rotary_pos_emb_cache(seq_len)
        cos, sin = self._rotary_pos_emb_cache
        return [cos[:, :seq_len], sin[:, :seq_len]]


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary_pos_emb(t, freqs):
    """t: (batch, seq, heads, head_dim)."""
    cos, sin = freqs
    rotated = t.float() * cos + _rotate_half(t.float()) * sin
    return rotated.type_as(t)


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.projection_size = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * self.projection_size)
        self.c_proj = nn.Linear(config.hidden_size, self.projection_size, bias=not config.no_bias)
        self.use_flash_attn = config.use_flash_attn
        self.is_fp32 = not (config.bf16 or config.fp16)
        self.attn_dropout = nn.Dropout(config.attn_dropout_prob)

    def forward(self, hidden_states, rotary_pos_emb_list=None, layer_past=None, attention_mask=None,
                head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                output_attentions=False, use_cache=False):
        batch, seq, _ = hidden_states.shape
        query, key, value = self.c_attn(hidden_states).split(self.hidden_size, dim=2)
        query, key, value = (t.view(batch, seq, self.num_heads, self.head_dim) for t in (query, key, value))
        if rotary_pos_emb_list is not None:
            freqs = [f[:, -seq:] for f in rotary_pos_emb_list[0]]
            query = apply_rotary_pos_emb(query, freqs)
            key = apply_rotary_pos_emb(key, freqs)
        if layer_past is not None:
            key = torch.cat((layer_past[0], key), dim=1)
            value = torch.cat((layer_past[1], value), dim=1)
        present = (key, value) if use_cache else None
        key_len = key.size(1)
        if self.use_flash_attn and flash_attn_func is not None and not self.is_fp32 and query.is_cuda:
            out = flash_attn_func(query, key, value, causal=seq == key_len)
        else:
            causal = torch.ones(key_len, key_len, dtype=torch.bool, device=query.device).tril()[-seq:]
            mask = torch.zeros(1, 1, seq, key_len, dtype=query.dtype, device=query.device)
            mask = mask.masked_fill(~causal, torch.finfo(query.dtype).min)
            if attention_mask is not None:
                mask = mask + attention_mask
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=mask).transpose(1, 2)
        out = self.c_proj(out.reshape(batch, seq, self.projection_size))
        if output_attentions:
            raise ValueError("Cannot output attentions while using scaled_dot_product_attention")
        return out, present


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, hidden_states):
        return self.c_proj(self.w1(hidden_states) * F.silu(self.w2(hidden_states)))


class QWenBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, rotary_pos_emb_list=None, layer_past=None, attention_mask=None,
                head_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False,
                output_attentions=False):
        attn_output, present = self.attn(self.ln_1(hidden_states), rotary_pos_emb_list, layer_past=layer_past,
                                         attention_mask=attention_mask, head_mask=head_mask, use_cache=use_cache,
                                         output_attentions=output_attentions)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return (hidden_states, present) if use_cache else (hidden_states,)


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    is_parallelizable = False
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _skip_keys_device_placement = "past_key_values"

    def __init__(self, *inputs, **kwargs):
        super().__init__(*inputs, **kwargs)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def _set_gradient_checkpointing(self, module, value=False):  # the transformers < 4.35 hook
        if isinstance(module, QWenModel):
            module.gradient_checkpointing = value


class QWenModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = ["attn.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.rotary_emb = RotaryEmbedding(config.kv_channels, base=config.rotary_emb_base)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("You cannot specify both input_ids and inputs_embeds at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if past_key_values is None:
            past_length = 0
            past_key_values = tuple([None] * len(self.h))
        else:  # tuples of (key, value), each (batch, seq, heads, head_dim)
            past_length = past_key_values[0][0].size(1)
        if attention_mask is not None:  # 1/0 per key -> additive, in the model's dtype
            attention_mask = attention_mask.view(batch, -1)[:, None, None, :].to(dtype=self.dtype)
            attention_mask = (1.0 - attention_mask) * torch.finfo(self.dtype).min
        head_mask = self.get_head_mask(head_mask, self.config.num_hidden_layers)
        rotary_pos_emb_list = [self.rotary_emb(past_length + seq)]
        hidden_states = self.drop(inputs_embeds)
        if self.gradient_checkpointing and self.training:
            use_cache = False
        presents = () if use_cache else None
        all_hidden_states = () if output_hidden_states else None
        for i, (block, layer_past) in enumerate(zip(self.h, past_key_values)):
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if self.gradient_checkpointing and self.training:
                def custom_forward(*inputs, block=block):
                    return block(*inputs, use_cache, output_attentions)

                outputs = torch.utils.checkpoint.checkpoint(custom_forward, hidden_states, rotary_pos_emb_list,
                                                            None, attention_mask, head_mask[i],
                                                            encoder_hidden_states, encoder_attention_mask)
            else:
                outputs = block(hidden_states, layer_past=layer_past, rotary_pos_emb_list=rotary_pos_emb_list,
                                attention_mask=attention_mask, head_mask=head_mask[i], use_cache=use_cache,
                                output_attentions=output_attentions)
            hidden_states = outputs[0]
            if use_cache:
                presents = presents + (outputs[1],)
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        if not return_dict:
            return tuple(v for v in (hidden_states, presents, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=presents,
                                       hidden_states=all_hidden_states)


class QWenLMHeadModel(QWenPreTrainedModel):
    _keys_to_ignore_on_load_missing = [r"h\\.\\d+\\.attn\\.rotary_emb\\.inv_freq"]
    _keys_to_ignore_on_load_unexpected = [r"h\\.\\d+\\.attn\\.masked_bias"]

    def __init__(self, config):
        super().__init__(config)
        assert config.bf16 + config.fp16 + config.fp32 <= 1, "Only one of bf16, fp16, fp32 can be true"
        if config.bf16 + config.fp16 + config.fp32 == 0:  # Qwen-v1 picks its own precision on a GPU
            if SUPPORT_BF16:
                config.bf16 = True
            elif SUPPORT_FP16:
                config.fp16 = True
            else:
                config.fp32 = True
        if config.use_flash_attn == "auto":
            config.use_flash_attn = bool(config.bf16 or config.fp16)
        if config.use_flash_attn:
            _import_flash_attn()
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.bf16:
            self.transformer.bfloat16()
            self.lm_head.bfloat16()
        if config.fp16:
            self.transformer.half()
            self.lm_head.half()
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, inputs_embeds=None, **kwargs):
        if past_key_values:
            input_ids = input_ids[:, -1].unsqueeze(-1)
        attention_mask = None if input_ids.size(0) == 1 else kwargs.get("attention_mask", None)
        if inputs_embeds is not None and past_key_values is None:
            model_inputs = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids}
        model_inputs.update({"past_key_values": past_key_values, "use_cache": kwargs.get("use_cache"),
                             "attention_mask": attention_mask})
        return model_inputs

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, head_mask=None, inputs_embeds=None, encoder_hidden_states=None,
                encoder_attention_mask=None, labels=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.transformer(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=return_dict)
        lm_logits = self.lm_head(transformer_outputs[0])
        loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            loss = CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        if not return_dict:
            output = (lm_logits,) + tuple(transformer_outputs[1:])
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=lm_logits, past_key_values=transformer_outputs.past_key_values,
                                      hidden_states=transformer_outputs.hidden_states)

    def chat(self, tokenizer, query: str, history: HistoryType = None, system: str = "", **kwargs):
        """Qwen-v1's chat helper, reduced: raw prompt, stop at <|endoftext|>."""
        history = list(history or [])
        prompt_ids = make_context(tokenizer, query, history, system)
        output = self.generate(torch.tensor([prompt_ids]), stop_words_ids=get_stop_words_ids(tokenizer), **kwargs)
        response = tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)
        return response, history + [(query, response)]

    def generate(self, inputs: Optional[torch.Tensor] = None, generation_config: Optional[GenerationConfig] = None,
                 logits_processor: Optional[LogitsProcessorList] = None,
                 stopping_criteria: Optional[StoppingCriteriaList] = None,
                 prefix_allowed_tokens_fn: Optional[Callable[[int, torch.Tensor], List[int]]] = None,
                 synced_gpus: Optional[bool] = None, assistant_model=None, streamer=None, **kwargs):
        generation_config = generation_config if generation_config is not None else self.generation_config
        stop_words_ids = kwargs.pop("stop_words_ids", None)
        if stop_words_ids is None:
            stop_words_ids = getattr(generation_config, "stop_words_ids", None)
        if stop_words_ids:  # single-token stop words end generation like an eos
            eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            kwargs["eos_token_id"] = eos + [words[0] for words in stop_words_ids if len(words) == 1]
        return super().generate(inputs, generation_config=generation_config, logits_processor=logits_processor,
                                stopping_criteria=stopping_criteria, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                synced_gpus=synced_gpus, assistant_model=assistant_model, streamer=streamer, **kwargs)
'''

QWEN_GENERATION_UTILS = '''\
"""Prompt helpers imported by modeling_qwen.py (Qwen-v1 ships a larger file of this name)."""

from typing import List, Tuple

HistoryType = List[Tuple[str, str]]


def get_stop_words_ids(tokenizer) -> List[List[int]]:
    return [[tokenizer.eod_id]]


def make_context(tokenizer, query: str, history: HistoryType = None, system: str = "") -> List[int]:
    """Raw format: system, then each turn as query and response, separated by <|endoftext|>."""
    text = system
    for old_query, response in history or []:
        text += old_query + response + "<|endoftext|>"
    return tokenizer.encode(text + query)
'''

CPP_KERNELS = '''\
"""Where the fused cache kernel's C++ source lies: next to this file, as in Qwen-v1's cpp_kernels.py.

Nothing is compiled here: the test model only looks the source up.
"""

import pathlib

_KERNEL_DIR = pathlib.Path(__file__).parent
SOURCES = ["cache_autogptq_cuda_256.cpp"]


def cache_kernel_source():
    """Path of the kernel source, or None when it was not shipped next to this file."""
    path = _KERNEL_DIR / SOURCES[0]
    return path if path.is_file() else None
'''

KERNEL_CPP = '''\
// Stand-in for Qwen-v1's fused KV-cache kernel source; cpp_kernels.py finds it next to itself.
int cache_autogptq_cuda_256_stub() { return 0; }
'''

TOKENIZATION_QWEN = '''\
"""tiktoken tokenizer of the tiny Qwen-v1-shaped test model (vocabulary in qwen.tiktoken)."""

import base64
import os
import shutil

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken"}
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"""
           r"""|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+""")
ENDOFTEXT = "<|endoftext|>"
SPECIAL_TOKENS = (ENDOFTEXT, "<|im_start|>", "<|im_end|>")


def _load_tiktoken_bpe(path):
    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


class QWenTokenizer(PreTrainedTokenizer):
    """Byte-level BPE by tiktoken. Tokens are shown as their bytes read as latin-1 (one char per byte)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, errors="replace", eos_token=ENDOFTEXT, **kwargs):
        self.vocab_file = vocab_file
        self.errors = errors
        self.mergeable_ranks = _load_tiktoken_bpe(vocab_file)
        start = len(self.mergeable_ranks)
        self.special_tokens = {token: start + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.tokenizer = tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks,
                                           special_tokens=self.special_tokens)
        self.decoder = {rank: token.decode("latin-1") for token, rank in self.mergeable_ranks.items()}
        self.encoder = {text: rank for rank, text in self.decoder.items()}
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self._added_tokens_decoder = {
            index: AddedToken(token, special=True, normalized=False) for token, index in self.special_tokens.items()
        }
        super().__init__(errors=errors, eos_token=eos_token, **kwargs)

    @property
    def vocab_size(self):
        return len(self.mergeable_ranks) + len(self.special_tokens)

    def get_vocab(self):
        return {**self.encoder, **self.special_tokens}

    def _tokenize(self, text, **kwargs):
        return [self.decoder[rank] for rank in self.tokenizer.encode_ordinary(text)]

    def _convert_token_to_id(self, token):
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.encoder[token]

    def _convert_id_to_token(self, index):
        for token, special in self.special_tokens.items():
            if special == index:
                return token
        return self.decoder[index]

    def convert_tokens_to_string(self, tokens):
        data = b"".join(t.encode("utf-8") if t in self.special_tokens else t.encode("latin-1") for t in tokens)
        return data.decode("utf-8", errors=self.errors)

    def _decode(self, token_ids, skip_special_tokens=False, errors=None, **kwargs):
        """As Qwen-v1's: tiktoken decodes; skip_special_tokens drops every id from <|endoftext|> on, the
        special tokens and the embedding's padding rows alike (other unknown ids raise KeyError)."""
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            token_ids = [i for i in token_ids if i < self.eod_id]
        return self.tokenizer.decode(token_ids, errors=errors or self.errors)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        if os.path.abspath(path) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, path)
        return (path,)
'''


def _vocabulary() -> List[bytes]:
    """The 256 bytes, then every prefix of each word's UTF-8 bytes (so BPE can reach the word)."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for word in WORDS:
        data = word.encode("utf-8")
        for end in range(2, len(data) + 1):
            if data[:end] not in seen:
                seen.add(data[:end])
                tokens.append(data[:end])
    return tokens


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def _write_code_and_tokenizer(folder: str, generation: dict, model_max_length: int) -> None:
    sources = {
        "configuration_qwen.py": CONFIGURATION_QWEN, "modeling_qwen.py": MODELING_QWEN,
        "qwen_generation_utils.py": QWEN_GENERATION_UTILS, "cpp_kernels.py": CPP_KERNELS,
        "tokenization_qwen.py": TOKENIZATION_QWEN, KERNEL_SOURCE: KERNEL_CPP,
    }
    for name, text in sources.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    with open(os.path.join(folder, "qwen.tiktoken"), "w", encoding="ascii") as handle:
        for rank, token in enumerate(_vocabulary()):
            handle.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
    _write_json(os.path.join(folder, "tokenizer_config.json"), {
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
        "tokenizer_class": "QWenTokenizer",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    })
    _write_json(os.path.join(folder, "generation_config.json"), generation)


def tokenizer_size() -> int:
    """Token ids the tokenizer uses (the embedding has CONFIG["vocab_size"] rows, more than this)."""
    return len(_vocabulary()) + len(SPECIAL_TOKENS)


def eod_id() -> int:
    return len(_vocabulary())


def _shapes() -> Dict[str, tuple]:
    hidden, vocab, inner = CONFIG["hidden_size"], CONFIG["vocab_size"], CONFIG["intermediate_size"] // 2
    shapes = {"transformer.wte.weight": (vocab, hidden)}
    for layer in range(CONFIG["num_hidden_layers"]):
        prefix = f"transformer.h.{layer}."
        shapes.update({
            prefix + "ln_1.weight": (hidden,),
            prefix + "attn.c_attn.weight": (3 * hidden, hidden),
            prefix + "attn.c_attn.bias": (3 * hidden,),
            prefix + "attn.c_proj.weight": (hidden, hidden),
            prefix + "ln_2.weight": (hidden,),
            prefix + "mlp.w1.weight": (inner, hidden),
            prefix + "mlp.w2.weight": (inner, hidden),
            prefix + "mlp.c_proj.weight": (hidden, inner),
        })
    shapes.update({"transformer.ln_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def base_tensors() -> Dict[str, torch.Tensor]:
    """The base's weights in float32: norms near 1, biases and matrices small random."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in _shapes().items():
        noise = torch.randn(shape, generator=generator)
        state[name] = 1.0 + 0.05 * noise if ".ln_" in name else 0.1 * noise
    return state


def _perturbed(state: Dict[str, torch.Tensor], seed: int, scale: float) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in state.items()}


def _write_weights(folder: str, state: Dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Two shards (embedding + first half of the layers | the rest) and the index that maps them."""
    names = list(state)
    half = CONFIG["num_hidden_layers"] // 2
    first = [n for n in names if n == "transformer.wte.weight" or any(n.startswith(f"transformer.h.{i}.")
                                                                     for i in range(half))]
    weight_map, total = {}, 0
    for shard, members in zip(SHARDS, (first, [n for n in names if n not in first])):
        tensors = {n: state[n].to(dtype).contiguous() for n in members}
        save_file(tensors, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in members})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_model(folder: str, state: Dict[str, torch.Tensor], dtype: torch.dtype, generation: dict,
                 model_max_length: int) -> str:
    os.makedirs(folder, exist_ok=True)
    _write_code_and_tokenizer(folder, generation, model_max_length)
    _write_json(os.path.join(folder, "config.json"), {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "model_type": "qwen",
        "dtype": str(dtype).replace("torch.", ""),
        **CONFIG,
    })
    _write_weights(folder, state, dtype)
    return folder


def build_qwen_v1_triplet(folder: str, dtype: torch.dtype = torch.float32,
                          perturbation: float = 0.02) -> Dict[str, str]:
    """base / domain / instruct Qwen-v1-shaped remote-code checkpoints under `folder`.

    Returns {"base": path, "domain": path, "instruct": path}. Only the instruct model's generation
    config has sampling settings; no folder has a chat template.
    """
    eos = eod_id()
    base_generation = {"eos_token_id": eos, "pad_token_id": eos, "max_new_tokens": 512, "do_sample": False,
                       "chat_format": "raw"}
    instruct_generation = {"eos_token_id": eos, "pad_token_id": eos, "max_new_tokens": 200, "do_sample": True,
                           "temperature": 0.5, "repetition_penalty": 1.05, "chat_format": "raw"}
    base = base_tensors()
    paths = {}
    for role, state, generation, max_length in (
        ("base", base, base_generation, 8192),
        ("domain", _perturbed(base, 1, perturbation), base_generation, 8192),
        ("instruct", _perturbed(base, 2, perturbation), instruct_generation, 2048),
    ):
        paths[role] = _write_model(os.path.join(folder, role), state, dtype, generation, max_length)
    return paths


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's tensors, read through its index (each file once)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "model.safetensors.index.json"), encoding="utf-8") as handle:
        files = sorted(set(json.load(handle)["weight_map"].values()))
    state: Dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(path, name)))
    return state


def code_files() -> tuple:
    """Files a loader of these checkpoints needs besides weights and configs."""
    return CODE_FILES + (KERNEL_SOURCE,)
