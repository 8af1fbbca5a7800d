"""Tokenizing documents and packing them into fixed-length blocks ("wrapped" packing).

Every document is tokenized on its own (the tokenizer's usual special tokens, e.g. a BOS, and
special-token strings *inside* the text split as plain text, so a corpus containing "</s>" cannot
forge an EOS) and ends with the tokenizer's EOS. Documents are concatenated in order and cut into
blocks of exactly `seq_len` tokens; a document may continue from one block into the next. Blocks
carry no padding and are trained with an ordinary causal mask (attention_mask=None).

Why not TRL's default packing: TRL's `bfd` strategy makes padding-free rows and relies on the
attention backend to separate documents; without FlashAttention (CPU, sdpa, eager) a document then
silently attends to the previous one (shared/notes/toolchain.md). Here the choice is explicit: plain
causal blocks (the GPT-style standard), or with `document_isolation` position_ids that restart after
each EOS, which transformers turns into a block-diagonal mask for sdpa/eager/flash alike, verified
on the actual model before training (`check_isolation`).
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, List, Optional, Tuple

from .config import PretrainError


def tokenize_documents(texts: Iterable[str], tokenizer, batch_size: int = 256) -> Iterator[List[int]]:
    """Token ids of each text, in order, each ending with exactly one EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise PretrainError("the tokenizer has no eos_token: documents could not be separated in packed blocks.")
    batch: List[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            yield from _encode(batch, tokenizer, eos)
            batch = []
    if batch:
        yield from _encode(batch, tokenizer, eos)


def _encode(batch: List[str], tokenizer, eos: int) -> Iterator[List[int]]:
    encoded = tokenizer(batch, add_special_tokens=True, split_special_tokens=True, verbose=False)["input_ids"]
    for ids in encoded:
        ids = list(ids)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        yield ids


class Packer:
    """Concatenate token lists and emit full blocks of `seq_len`; `tail` holds what is left over."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.buffer: List[int] = []
        self.tokens_in = 0

    def add(self, ids: List[int]) -> Iterator[List[int]]:
        self.tokens_in += len(ids)
        self.buffer.extend(ids)
        while len(self.buffer) >= self.seq_len:
            block, self.buffer = self.buffer[:self.seq_len], self.buffer[self.seq_len:]
            yield block

    @property
    def tail(self) -> int:
        return len(self.buffer)


def pack(documents: Iterable[List[int]], seq_len: int) -> Tuple[List[List[int]], int]:
    """All full blocks of the documents, and the number of trailing tokens that did not fill a block."""
    packer = Packer(seq_len)
    blocks = [block for ids in documents for block in packer.add(ids)]
    return blocks, packer.tail


def document_position_ids(block: List[int], eos_id: int) -> List[int]:
    """Positions that restart at 0 after every EOS (a document cut at a block start starts at 0 too)."""
    positions, position = [], 0
    for token in block:
        positions.append(position)
        position = 0 if token == eos_id else position + 1
    return positions


class BlockWriter:
    """Append blocks to an Arrow stream file that `datasets.Dataset.from_file` memory-maps."""

    def __init__(self, path: str, seq_len: int, eos_id: Optional[int] = None, batch: int = 1024):
        import pyarrow as pa

        self.pa = pa
        self.path = path
        self.eos_id = eos_id  # set: also write position_ids (document isolation)
        self.batch = batch
        self.pending: List[List[int]] = []
        self.count = 0
        columns = [pa.field("input_ids", pa.list_(pa.int32()))]
        if eos_id is not None:
            columns.append(pa.field("position_ids", pa.list_(pa.int32())))
        self.schema = pa.schema(columns)
        self.tmp = path + ".tmp"
        self.sink = pa.OSFile(self.tmp, "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def write(self, block: List[int]) -> None:
        self.pending.append(block)
        self.count += 1
        if len(self.pending) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        pa = self.pa
        arrays = [pa.array(self.pending, type=pa.list_(pa.int32()))]
        if self.eos_id is not None:
            arrays.append(pa.array([document_position_ids(b, self.eos_id) for b in self.pending], type=pa.list_(pa.int32())))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        self.pending = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
        self.sink.close()
        os.replace(self.tmp, self.path)


def load_blocks(path: str):
    import datasets

    dataset = datasets.Dataset.from_file(path)
    return dataset.with_format("torch")


class BlockCollator:
    """Stack equal-length blocks; labels are the input ids (the model shifts them).

    Not DataCollatorForLanguageModeling: that one sets labels to -100 wherever input_ids equal the
    pad id, and many tokenizers use EOS as pad, so the model would never learn to end a document.
    """

    def __call__(self, features):
        import torch

        input_ids = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if "position_ids" in features[0]:
            batch["position_ids"] = torch.stack([torch.as_tensor(f["position_ids"], dtype=torch.long) for f in features])
        return batch


def check_isolation(model, eos_id: int, vocab_size: int, atol: float = 1e-4) -> float:
    """Largest logit difference between a document run alone and the same document packed after
    another one with restarting position_ids. Near 0 only if the model honours packed positions."""
    import torch

    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab_size, (7,), generator=generator)
    second = torch.randint(0, vocab_size, (6,), generator=generator)
    first[-1] = eos_id
    second[second == eos_id] = (eos_id + 1) % vocab_size
    packed = torch.cat([first, second])[None]
    positions = torch.tensor(document_position_ids(packed[0].tolist(), eos_id))[None]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
        together = model(input_ids=packed.to(device), position_ids=positions.to(device),
                         use_cache=False).logits[0, len(first):].float()
    model.train(was_training)
    return float((alone - together).abs().max())
