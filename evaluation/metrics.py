"""The numbers `finmerge eval` reports for one model.

- held-out text: each model reads it through ITS OWN tokenizer. Perplexity per token is therefore
  not comparable across vocabularies; bits per byte (summed NLL in bits / UTF-8 bytes of the
  scored text) is, and is the number to compare;
- chat generation: greedy answer contains the reference, and the answer ends with the model's eos;
- chat likelihood: mean NLL of the reference answer after the chat prompt, and multiple-choice
  accuracy by the summed log-likelihood of each choice (how japanese-lm-fin-harness scores).
"""

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from finmerge.evaluation.data import QAItem
from finmerge.evaluation.devices import input_device
from finmerge.pretrain.remote_code import generation_cache_kwargs

Progress = Optional[Callable[[int], None]]  # called with the number of sequences just processed


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
def _token_logprobs(model, rows: List[List[int]], batch_size: int, progress: Progress = None,
                    leave_out: Sequence[int] = ()) -> List[torch.Tensor]:
    """log p(token_t | tokens_<t) for t >= 1, per row (fp32, on the CPU), in the order of `rows`.

    With `leave_out` (token ids), each row's tensor has a second line: the same log-probabilities with
    those tokens left out of every prediction (their logits removed from the softmax).
    Rows are batched longest first so a batch pads little; padding is on the right and masked,
    so causal attention never lets a real token see it.
    """
    device = input_device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out: List[Optional[torch.Tensor]] = [None] * len(rows)
    for batch_order in _batches(order, batch_size):
        batch = [rows[i] for i in batch_order]
        ids, mask = _right_padded(batch, pad_id=0)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # math in fp32 whatever the model's dtype
        picked = logits.gather(-1, ids[:, 1:, None]).squeeze(-1)
        lines = [picked - torch.logsumexp(logits, dim=-1)]
        if leave_out:
            logits[..., list(leave_out)] = float("-inf")
            lines.append(picked - torch.logsumexp(logits, dim=-1))
        logprobs = torch.stack(lines, dim=1).cpu() if leave_out else lines[0].cpu()
        for position, (i, row) in enumerate(zip(batch_order, batch)):
            out[i] = logprobs[position, ..., :len(row) - 1]
        if progress:
            progress(len(batch))
    return out


def _start_token(tokenizer) -> List[int]:
    """The token every window starts from, so that every text token is scored: BOS, else the
    document separator EOS (Qwen-style tokenizers have no BOS), else none."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return [token]
    return []


def encode_documents(tokenizer, texts: Sequence[str], max_len: int) -> List[List[int]]:
    """Token ids of each document, cut into windows of at most `max_len` tokens, each after the start token."""
    rows = []
    bos = _start_token(tokenizer)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        step = max_len - len(bos)
        rows += [bos + ids[i:i + step] for i in range(0, len(ids), step) if len(bos + ids[i:i + step]) > 1]
    return rows


def perplexity(model, rows: List[List[int]], batch_size: int = 16, text_bytes: Optional[int] = None,
               progress: Progress = None, chat_tokens: Sequence[int] = ()) -> Dict[str, Optional[float]]:
    """Perplexity per token of this model's own tokenization, and bits per byte of the text.

    `text_bytes` is the UTF-8 length of the documents; bits per byte is reported only when every
    text token was scored (the windows start from a BOS/EOS token), else it would undercount.
    `chat_tokens` (the chat template's control tokens, which plain text never contains): also
    `plain_bits_per_byte`, the same with those tokens left out of every prediction, so a chat model is
    not charged for keeping its turn markers likely.
    """
    predicted = set().union(*(set(r[1:]) for r in rows)) if rows else set()
    leave_out = [t for t in chat_tokens if t not in predicted]  # never a token the text holds (the start token is not predicted)
    nll, plain, tokens = 0.0, 0.0, 0
    for logprobs in _token_logprobs(model, rows, batch_size, progress, leave_out):
        lines = logprobs.double() if leave_out else logprobs.double()[None]
        nll -= lines[0].sum().item()
        plain -= lines[-1].sum().item()
        tokens += lines.shape[-1]
    result: Dict[str, Optional[float]] = {"perplexity": math.exp(nll / tokens), "tokens": tokens}
    if text_bytes:
        result.update(bits_per_byte=nll / math.log(2) / text_bytes, bytes=text_bytes)
        if chat_tokens:
            result.update(plain_bits_per_byte=plain / math.log(2) / text_bytes, chat_tokens_left_out=leave_out)
    return result


def chat_control_token_ids(tokenizer, chat_template: Optional[str] = None) -> List[int]:
    """The special tokens the chat template writes around a user and an assistant turn (e.g. `<|user|>`,
    `<|assistant|>`, `<|end|>`); [] without a template."""
    template = chat_template or tokenizer.chat_template
    if not template:
        return []
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                                             tokenize=False, chat_template=template)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special.intersection(tokenizer(rendered, add_special_tokens=False)["input_ids"]))


def chat_prompt_ids(tokenizer, question: str, chat_template: Optional[str] = None) -> List[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False,
        chat_template=chat_template,
    )


def _continuation_ids(tokenizer, text: str) -> List[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_likelihood(model, tokenizer, items: Sequence[QAItem], chat_template: Optional[str] = None,
                    batch_size: int = 16, progress: Progress = None) -> Dict[str, Optional[float]]:
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
    for logprobs, (index, choice, prompt_len) in zip(_token_logprobs(model, rows, batch_size, progress), owners):
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


def _turn_tokens(model, tokenizer, turn_end: Optional[str]):
    """(ids that end the turn properly, ids that stop generation): `turn_end` when given, else the model's eos."""
    own_eos = _eos_ids(model, tokenizer)
    turn_ids = [tokenizer.convert_tokens_to_ids(turn_end)] if turn_end else own_eos
    return turn_ids, list(dict.fromkeys(own_eos + turn_ids))


@torch.no_grad()
def greedy_answers(model, tokenizer, questions: Sequence[str], chat_template: Optional[str] = None,
                   max_new_tokens: int = 32, batch_size: int = 32, turn_end: Optional[str] = None,
                   progress: Progress = None) -> List[Tuple[str, bool]]:
    """(answer text, whether it ended the turn properly) per question, greedy, in the order given.

    The turn ends properly with `turn_end` (a token, e.g. the instruct model's end-of-turn) when
    given, else with the model's own eos. Generation stops at either.
    """
    turn_ids, eos = _turn_tokens(model, tokenizer, turn_end)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = input_device(model)
    cache = generation_cache_kwargs(model)
    prompts = [chat_prompt_ids(tokenizer, question, chat_template) for question in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    answers: Dict[int, List[int]] = {}
    for batch_order in _batches(order, batch_size):
        batch_prompts = [prompts[i] for i in batch_order]
        width = max(len(p) for p in batch_prompts)
        # Left padding (whatever the tokenizer's padding_side): new tokens follow every prompt directly.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch_prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch_prompts], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=eos or None, pad_token_id=pad, **cache)[:, width:].tolist()
        answers.update(zip(batch_order, generated))
        if progress:
            progress(len(batch_order))
    out = []
    for index in range(len(prompts)):
        tokens = answers[index]
        stop = next((i for i, t in enumerate(tokens) if t in eos), None)
        text = tokenizer.decode(tokens[:stop] if stop is not None else tokens, skip_special_tokens=True)
        out.append((text, stop is not None and tokens[stop] in turn_ids))
    return out


def chat_generation(model, tokenizer, items: Sequence[QAItem], chat_template: Optional[str] = None,
                    max_new_tokens: int = 32, batch_size: int = 32, turn_end: Optional[str] = None,
                    progress: Progress = None) -> Dict[str, object]:
    """Greedy answers: share containing the reference, share ending the turn properly, both; and every
    answer in the order of `items` ("answers": answer, hit, ended), for breakdowns without asking again."""
    correct = ended = strict = 0
    samples, records = [], []
    answers = greedy_answers(model, tokenizer, [item.question for item in items], chat_template, max_new_tokens,
                             batch_size, turn_end, progress)
    for item, (answer, proper_end) in zip(items, answers):
        hit = _normalize(item.expected) in _normalize(answer)
        correct += hit
        ended += proper_end
        strict += hit and proper_end
        records.append({"answer": answer.strip(), "hit": hit, "ended": proper_end})
        if len(samples) < 5:
            samples.append({"question": item.question, "reference": item.expected, "answer": answer, "ended": proper_end})
    n = len(items)
    return {"accuracy": correct / n, "ends_with_eos": ended / n, "strict": strict / n, "questions": n, "samples": samples,
            "answers": records}
