"""Which layer and which module type a weight belongs to, from its name alone.

Covers Llama-style names (model.layers.3.self_attn.q_proj.weight, mlp.gate_proj, embed_tokens,
input_layernorm, model.norm, lm_head), Qwen-v1-style names (transformer.h.3.attn.c_attn,
attn.c_proj, mlp.w1/w2/c_proj, transformer.wte, ln_1/ln_2/ln_f) and the common relatives
(GPT-NeoX query_key_value/dense/embed_in/embed_out, Phi-3 qkv_proj/gate_up_proj, Mixtral experts).
Anything else is "other", so an unknown architecture still gets per-layer and overall numbers.
"""

import re
from typing import Optional, Tuple

# Column order of the tables and the heatmap.
MODULE_TYPES = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "norm", "lm_head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder_layers)\.(\d+)(?:\.|$)")
_NORM = re.compile(r"(^|_)(norm|layernorm|ln|rms_norm)(_|\d|$)|^ln_\w+$|^ln$")
# part of the name (one dotted component) -> module type; checked after norms
_COMPONENTS = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
    "qkv_proj": "qkv", "c_attn": "qkv", "query_key_value": "qkv", "W_pack": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "fc1": "up", "fc2": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down", "c_fc": "up",
    "embed_tokens": "embed", "wte": "embed", "wpe": "embed", "word_embeddings": "embed",
    "embed_in": "embed", "tok_embeddings": "embed",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
# Same component, different meaning by context: (parent, component) -> module type.
_IN_CONTEXT = {
    ("attn", "c_proj"): "o", ("mlp", "c_proj"): "down",            # Qwen-v1, GPT-2
    ("attention", "dense"): "o", ("self_attention", "dense"): "o", ("self_attn", "dense"): "o",
    ("mlp", "w1"): "up", ("mlp", "w2"): "gate",                     # Qwen-v1: w1(x) * silu(w2(x))
    ("experts", "w1"): "gate", ("experts", "w3"): "up", ("experts", "w2"): "down",  # Mixtral
}


def layer_of(name: str) -> Optional[int]:
    """Block index for weights inside a numbered block; None for embeddings, final norm, lm_head."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    for part in reversed(parts):
        if _NORM.search(part):
            return "norm"
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        # Mixtral: experts.<n>.w1; everything else: the direct parent
        parent = parts[index - 2] if index >= 2 and parts[index - 1].isdigit() else parts[index - 1] if index else ""
        if (parent, part) in _IN_CONTEXT:
            return _IN_CONTEXT[(parent, part)]
        if part in _COMPONENTS:
            return _COMPONENTS[part]
    return "other"


def classify(name: str) -> Tuple[Optional[int], str]:
    return layer_of(name), module_of(name)
