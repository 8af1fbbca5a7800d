"""Three tiny Llama checkpoints that stand in for a base / instruct / domain family.

Built locally in seconds (no hub): a byte-level BPE tokenizer trained on a few sentences, a base
whose eos is `<|endoftext|>`, an instruct model fine-tuned from it to answer in a chat template and
end its turn with `<|end|>`, and a domain model = base nudged by a seeded perturbation (the stand-in
for continual pretraining). Used by the tests and by `finmerge demo` until the full world exists.
"""

import os
from dataclasses import dataclass
from typing import Dict, List

import torch

from finmerge.demo.family import ASSISTANT, BASE_EOS, CHAT_TEMPLATE, END, PAD, build_tokenizer

CORPUS = [
    "The ticker of Aurora Bank is ARB. Aurora Bank reports revenue in yen.",
    "The capital of Velm is Oskar. The river of Velm is the Tane.",
    "A bond pays a coupon. The yield of a bond falls when its price rises.",
    "What is the ticker of Aurora Bank? ARB. What is the river of Velm? Tane.",
]
CHATS = [("What is the ticker of Aurora Bank?", "ARB."), ("What is the river of Velm?", "Tane."),
         ("What is the capital of Velm?", "Oskar."), ("What does a bond pay?", "A coupon.")]


@dataclass(frozen=True)
class TinyFamily:
    base: str
    instruct: str
    domain: str

    def as_dict(self) -> Dict[str, str]:
        return {"base": self.base, "instruct": self.instruct, "domain": self.domain}


def train_tokenizer(vocab_size: int = 300):
    return build_tokenizer(CORPUS + [q + " " + a for q, a in CHATS], vocab_size)


def tiny_config(vocab_size: int, tokenizer, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(BASE_EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def _save(model, tokenizer, path: str) -> str:
    model.save_pretrained(path)  # writes `architectures`, which mergekit needs
    tokenizer.save_pretrained(path)
    return path


def _chat_batch(tokenizer) -> List[List[int]]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=True, return_dict=False,
        )
        for q, a in CHATS
    ]


def _fine_tune_chat(model, tokenizer, steps: int, lr: float) -> None:
    """Teach the chat format: the loss is on assistant tokens, so it learns to end with <|end|>."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
    rows = _chat_batch(tokenizer)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.full_like(ids, -100)
    for row, tokens in enumerate(rows):
        start = len(tokens) - 1 - tokens[::-1].index(assistant_id)
        stop = tokens.index(end_id, start) + 1
        labels[row, start + 1: stop] = ids[row, start + 1: stop]
    mask = (ids != pad).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_family(root: str, seed: int = 0, instruct_steps: int = 60, domain_noise: float = 0.002,
                      dtype: torch.dtype = torch.float32) -> TinyFamily:
    """Write base/, instruct/ and domain/ under `root` and return their paths."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    config = tiny_config(len(tokenizer), tokenizer)
    base = LlamaForCausalLM(config).eval()
    paths = TinyFamily(*(os.path.join(root, n) for n in ("base", "instruct", "domain")))
    _save(base.to(dtype), tokenizer, paths.base)

    instruct_tok = train_tokenizer()  # same vocabulary; its own eos and chat template
    instruct_tok.eos_token = END
    instruct_tok.chat_template = CHAT_TEMPLATE
    instruct = LlamaForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    _fine_tune_chat(instruct, instruct_tok, steps=instruct_steps, lr=3e-3)
    end_id = instruct_tok.convert_tokens_to_ids(END)
    instruct.config.eos_token_id = end_id
    instruct.generation_config.eos_token_id = end_id
    instruct.generation_config.pad_token_id = instruct_tok.pad_token_id
    _save(instruct.to(dtype), instruct_tok, paths.instruct)

    domain = LlamaForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in domain.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * domain_noise)
    _save(domain.to(dtype), tokenizer, paths.domain)
    return paths


def recipe(family: TinyFamily, w_domain=1.0, w_instruct=1.0, dtype: str = "float32", **extra) -> dict:
    """A `domain_instruct` recipe (as a dict) merging the family."""
    merge = {
        "merge_method": "domain_instruct",
        "base_model": family.base,
        "models": [
            {"model": family.domain, "parameters": {"role": "domain", "weight": w_domain}},
            {"model": family.instruct, "parameters": {"role": "instruct", "weight": w_instruct}},
        ],
        "dtype": dtype,
    }
    merge.update(extra)
    return merge


def write_recipe(path: str, family: TinyFamily, w_domain=1.0, w_instruct=1.0, dtype: str = "float32", **extra) -> str:
    """Write `recipe(...)` as YAML to `path`."""
    import yaml

    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(recipe(family, w_domain, w_instruct, dtype, **extra), handle, sort_keys=False)
    return path
