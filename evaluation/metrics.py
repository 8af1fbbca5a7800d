"""The numbers `finmerge eval` reports for one model.

- perplexity: token-weighted over held-out documents, from token ids computed ONCE for all models;
- chat generation: greedy answer contains the reference, and the answer ends with the model's eos;
- chat likelihood: mean NLL of the reference answer after the chat prompt, and multiple-choice
  accuracy by the summed log-likelihood of each choice (how japanese-lm-fin-harness scores).
"""

import math
import re
from typing import Dict, List, Optional, Sequence

import torch

from finmerge.evaluation.data import QAItem


def _batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _right_padded(rows: List[List[int]], pad_id: int):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


@torch.no_grad()
def _token_logprobs(model, rows: List[List[int]], batch_size: int) -> List[torch.Tensor]:
    """log p(token_t | tokens_<t) for t >= 1, per row (fp32)."""
    out = []
    for batch in _batches(rows, batch_size):
        ids, mask = _right_padded(batch, pad_id=0)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out += [logprobs[i, :len(row) - 1] for i, row in enumerate(batch)]
    return out


def encode_documents(tokenizer, texts: Sequence[str], max_len: int) -> List[List[int]]:
    """Token ids of each document, cut into windows of at most `max_len` tokens (BOS if the tokenizer has one)."""
    rows = []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        step = max_len - len(bos)
        rows += [bos + ids[i:i + step] for i in range(0, len(ids), step) if len(bos + ids[i:i + step]) > 1]
    return rows


def perplexity(model, rows: List[List[int]], batch_size: int = 16) -> Dict[str, float]:
    nll, tokens = 0.0, 0
    for logprobs in _token_logprobs(model, rows, batch_size):
        nll -= logprobs.double().sum().item()
        tokens += logprobs.numel()
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens}


def chat_prompt_ids(tokenizer, question: str, chat_template: Optional[str] = None) -> List[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False,
        chat_template=chat_template,
    )


def _continuation_ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_likelihood(model, tokenizer, items: Sequence[QAItem], chat_template: Optional[str] = None,
                    batch_size: int = 16) -> Dict[str, Optional[float]]:
    """Mean per-token NLL of the reference answers; accuracy on the multiple-choice items."""
    rows, owners = [], []  # owners: (item index, choice index or None for the reference)
    for index, item in enumerate(items):
        prompt = chat_prompt_ids(tokenizer, item.question, chat_template)
        rows.append(prompt + _continuation_ids(tokenizer, item.answer))
        owners.append((index, None, len(prompt)))
        for c, choice in enumerate(item.choices or ()):
            rows.append(prompt + _continuation_ids(tokenizer, choice))
            owners.append((index, c, len(prompt)))
    answer_nll, answer_tokens = 0.0, 0
    choice_scores: Dict[int, List[float]] = {}
    for logprobs, (index, choice, prompt_len) in zip(_token_logprobs(model, rows, batch_size), owners):
        continuation = logprobs[prompt_len - 1:].double()
        if choice is None:
            answer_nll -= continuation.sum().item()
            answer_tokens += continuation.numel()
        else:
            choice_scores.setdefault(index, []).append(continuation.sum().item())
    scored = [items[i].answer_index == max(range(len(s)), key=s.__getitem__) for i, s in choice_scores.items()]
    return {
        "answer_nll": answer_nll / answer_tokens,
        "choice_accuracy": sum(scored) / len(scored) if scored else None,
        "choice_questions": len(scored),
    }


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _eos_ids(model, tokenizer) -> List[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


@torch.no_grad()
def chat_generation(model, tokenizer, items: Sequence[QAItem], chat_template: Optional[str] = None,
                    max_new_tokens: int = 32, batch_size: int = 32, turn_end: Optional[str] = None) -> Dict[str, object]:
    """Greedy answers: share containing the reference, share ending the turn properly, both.

    The turn ends properly with `turn_end` (a token, e.g. the instruct model's end-of-turn) when
    given, else with the model's own eos. Generation stops at either.
    """
    own_eos = _eos_ids(model, tokenizer)
    turn_ids = [tokenizer.convert_tokens_to_ids(turn_end)] if turn_end else own_eos
    eos = list(dict.fromkeys(own_eos + turn_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    correct = ended = strict = 0
    samples = []
    for batch in _batches(list(items), batch_size):
        prompts = [chat_prompt_ids(tokenizer, item.question, chat_template) for item in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # left padding for generation
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos or None, pad_token_id=pad)[:, width:].tolist()
        for item, tokens in zip(batch, generated):
            stop = next((i for i, t in enumerate(tokens) if t in eos), None)
            answer = tokenizer.decode(tokens[:stop] if stop is not None else tokens, skip_special_tokens=True)
            hit = _normalize(item.expected) in _normalize(answer)
            proper_end = stop is not None and tokens[stop] in turn_ids
            correct += hit
            ended += proper_end
            strict += hit and proper_end
            if len(samples) < 5:
                samples.append({"question": item.question, "reference": item.expected, "answer": answer, "ended": proper_end})
    n = len(items)
    return {"accuracy": correct / n, "ends_with_eos": ended / n, "strict": strict / n, "questions": n, "samples": samples}
