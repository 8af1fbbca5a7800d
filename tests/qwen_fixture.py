"""A tiny Qwen-v1 checkpoint triplet laid out like rinna's nekomata family, for tests.

nekomata (the paper's base, rinna/nekomata-14b) is a Qwen-v1 model whose folder carries its own
Python code and loads only with trust_remote_code. The folders built here have that shape:

- configuration_qwen.py (QWenConfig, model_type "qwen"), modeling_qwen.py (QWenLMHeadModel with the
  Qwen-v1 tensor names mergekit's qwen architecture expects), which imports
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
deterministic. The code is our own minimal model (RMSNorm, rotary attention with a fused qkv
projection, SwiGLU MLP); it runs forward passes, `generate` (no KV cache: each step recomputes the
sequence) and transformers' Trainer (loss from `labels`, gradient checkpointing, sdpa).
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
}

# Words that get their own tokens (besides the 256 single bytes), so that Japanese prompts and the
# Alpaca-ja template's markers encode to a few tokens each.
WORDS = (
    "以下", "は", "、", "。", "タスク", "説明", "指示", "入力", "応答", "要求", "文脈", "組み合わせ",
    "適切", "満たす", "書きなさい", "です", "金融", "市場", "株式", "会社", "決算", "利益", "###", "### ",
    ":\n", "\n\n", " the", " of", " and", "ing", "Hello", " world", "the", "market",
)

CONFIGURATION_QWEN = '''\
"""Configuration of the tiny Qwen-v1-shaped test model (model_type "qwen")."""

from transformers import PretrainedConfig


class QWenConfig(PretrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=256, layer_norm_epsilon=1e-6,
                 rotary_emb_base=10000, initializer_range=0.02, use_cache_kernel=False,
                 tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.initializer_range = initializer_range
        self.use_cache_kernel = use_cache_kernel
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_QWEN = '''\
"""The tiny Qwen-v1-shaped test model: Qwen-v1 tensor names, RMSNorm, rotary attention, SwiGLU."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_qwen import QWenConfig
from .qwen_generation_utils import HistoryType, get_stop_words_ids, make_context

try:  # Qwen-v1 compiles a fused KV-cache kernel from sources shipped beside its code, when it can
    from .cpp_kernels import cache_kernel_source
except ImportError:
    cache_kernel_source = None


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def _rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x, position_ids, base):
    """x: (batch, heads, seq, head_dim); position_ids: (batch, seq)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    freqs = position_ids[:, None, :, None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    rotated = x.float() * angles.cos() + _rotate_half(x.float()) * angles.sin()
    return rotated.to(x.dtype)


class QWenAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rotary_base = config.rotary_emb_base
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, mask, position_ids):
        batch, seq, _ = hidden.shape
        query, key, value = self.c_attn(hidden).split(self.hidden_size, dim=-1)
        query, key, value = (t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
                             for t in (query, key, value))
        query = apply_rotary(query, position_ids, self.rotary_base)
        key = apply_rotary(key, position_ids, self.rotary_base)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.c_proj(out.transpose(1, 2).reshape(batch, seq, self.hidden_size))


class QWenMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, inner, bias=False)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=False)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, hidden):
        return self.c_proj(self.w1(hidden) * F.silu(self.w2(hidden)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden, mask, position_ids):
        hidden = hidden + self.attn(self.ln_1(hidden), mask, position_ids)
        return hidden + self.mlp(self.ln_2(hidden))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock"]
    _supports_sdpa = True


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.h = nn.ModuleList([QWenBlock(config) for _ in range(config.num_hidden_layers)])
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        hidden = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, seq, dtype=torch.long, device=hidden.device)
        if position_ids is None:  # left padding: positions count the real tokens only
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = mask | torch.eye(seq, dtype=torch.bool, device=hidden.device)  # a padded row attends to itself
        for block in self.h:
            hidden = block(hidden, mask, position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden))


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}  # no KV cache: recompute

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, labels=None, use_cache=None, return_dict=None, **kwargs):
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            flat_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            flat_labels = labels[:, 1:].reshape(-1).to(logits.device)
            items = kwargs.get("num_items_in_batch")  # Trainer: gradient accumulation sums, then divides
            if items is None:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum") / items
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def chat(self, tokenizer, query: str, history: HistoryType = None, system: str = "", **kwargs):
        """Qwen-v1's chat helper, reduced: raw prompt, stop at <|endoftext|>."""
        history = list(history or [])
        prompt_ids = make_context(tokenizer, query, history, system)
        output = self.generate(torch.tensor([prompt_ids]), eos_token_id=get_stop_words_ids(tokenizer)[0], **kwargs)
        response = tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)
        return response, history + [(query, response)]
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
