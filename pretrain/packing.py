"""Tokenizing documents and packing them into fixed-length blocks ("wrapped" packing).

Every document is tokenized on its own (the tokenizer's usual special tokens, e.g. a BOS, and
special-token strings *inside* the text split as plain text, so a corpus containing "</s>" cannot
forge an EOS) and ends with the tokenizer's EOS. Documents are concatenated in order and cut into
blocks of exactly `seq_len` tokens; a document may continue from one block into the next. Blocks
carry no padding and are trained with an ordinary causal mask (attention_mask=None).

Why not TRL's default packing: TRL's `bfd` strategy makes padding-free rows and relies on the
attention backend to separate documents; without FlashAttention (CPU, sdpa, eager) a document then
silently attends to the previous one. Here the choice is explicit: plain
causal blocks (the GPT-style standard), or with `document_isolation` position_ids that restart after
each EOS, which transformers turns into a block-diagonal mask for sdpa/eager/flash alike, verified
on the actual model before training (`check_isolation`).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, List, Optional, Tuple

from .config import PretrainError

Chunks = Iterator[List[int]]  # a document's token ids, in pieces; the last one ends with EOS

# Text with every kind of safe cut (see cleaning.safe_chunks): chunked tokenization must reproduce its
# whole-text tokenization on this tokenizer before long documents are tokenized in chunks.
PROBE_TEXT = ("Aurora Bank (ARB) reported revenue of 1,234.5 million yen.\nNet profit rose 12%; the "
              "dividend is 35 yen.\n\nOutlook: 日本銀行の政策金利は0.5%です。 Risks remain\n  indented line "
              "and\ttabs.\nEnd.")


class DocumentTokenizer:
    """Token ids of documents, each with the tokenizer's usual special tokens and ending with exactly one EOS.

    Short documents are tokenized in batches, long ones (CleanDocument.long) chunk by chunk on safe cuts,
    with the special tokens of a whole-text call added around the chunks. Whether chunking is exact for
    this tokenizer is checked once on PROBE_TEXT; if it is not, long documents are tokenized whole.
    """

    def __init__(self, tokenizer, batch_size: int = 256, chunk_chars: Optional[int] = None):
        from .cleaning import CHUNK_CHARS

        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.chunk_chars = chunk_chars or CHUNK_CHARS
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise PretrainError("the tokenizer has no eos_token: documents could not be separated in packed blocks.")
        self.prefix, self.suffix = self._special_tokens()
        self.chunked = self.prefix is not None and self._chunking_is_exact()
        self.warned = False

    def _ids(self, texts: List[str], special: bool) -> List[List[int]]:
        return self.tokenizer(texts, add_special_tokens=special, split_special_tokens=True, verbose=False)["input_ids"]

    def encode(self, texts: List[str]) -> List[List[int]]:
        """Whole-text tokenization of each text (with special tokens) + EOS."""
        encoded = []
        for ids in self._ids(texts, True):
            ids = list(ids)
            if not ids or ids[-1] != self.eos:
                ids.append(self.eos)
            encoded.append(ids)
        return encoded

    def _special_tokens(self) -> Tuple[Optional[List[int]], Optional[List[int]]]:
        """The ids a whole-text call puts before and after the text's own ids (e.g. [BOS], [])."""
        with_special, plain = (list(ids) for ids in (self._ids(["Probe text."], True)[0], self._ids(["Probe text."], False)[0]))
        for start in range(len(with_special) - len(plain) + 1):
            if with_special[start:start + len(plain)] == plain:
                return with_special[:start], with_special[start + len(plain):]
        return None, None

    def _chunking_is_exact(self) -> bool:
        from .cleaning import safe_chunks

        whole = self.encode([PROBE_TEXT])[0]
        chunked = [i for ids in self.encode_chunks(c for c, _ in safe_chunks([PROBE_TEXT], size=8)) for i in ids]
        return whole == chunked

    def encode_chunks(self, chunks: Iterable[str]) -> Chunks:
        """Ids of a text given as chunks that end on safe cuts: prefix, each chunk's ids, suffix, EOS."""
        pending = list(self.prefix)
        for text in chunks:
            ids = pending + list(self._ids([text], False)[0])
            if ids:
                yield ids
            pending = []
        tail = list(self.suffix)
        if not tail or tail[-1] != self.eos:
            tail.append(self.eos)
        yield pending + tail

    def documents(self, documents: Iterable) -> Iterator[Tuple[object, Chunks]]:
        """(document, its ids in chunks) for texts or CleanDocuments, in order. Consume each document's
        chunks before asking for the next document."""
        batch: List[object] = []
        for document in documents:
            if getattr(document, "long", False):
                yield from self._flush(batch)
                batch = []
                yield document, self._long(document)
                continue
            batch.append(document)
            if len(batch) == self.batch_size:
                yield from self._flush(batch)
                batch = []
        yield from self._flush(batch)

    def _flush(self, batch: List[object]) -> Iterator[Tuple[object, Chunks]]:
        if not batch:
            return
        texts = [d if isinstance(d, str) else d.text() for d in batch]
        for document, ids in zip(batch, self.encode(texts)):
            yield document, iter([ids])

    def _long(self, document) -> Chunks:
        from .cleaning import safe_chunks

        if self.chunked:
            yield from self.encode_chunks(c for c, _ in safe_chunks(document.pieces(), self.chunk_chars))
            return
        if not self.warned:
            self.warned = True
            print(f"{document.where}: this tokenizer does not tokenize text in pieces exactly as whole, so long "
                  f"documents are tokenized whole (memory grows with the document).", file=sys.stderr)
        yield self.encode(["".join(document.pieces())])[0]


class Packer:
    """Concatenate token lists and emit full blocks of `seq_len`; `tail` holds what is left over.

    Blocks are cut at an offset into the buffer, and the consumed part is dropped once per `add`, so
    every token is copied a bounded number of times: linear in the corpus."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.buffer: List[int] = []
        self.tokens_in = 0

    def add(self, ids: List[int]) -> Iterator[List[int]]:
        self.tokens_in += len(ids)
        self.buffer.extend(ids)
        start, end = 0, len(self.buffer)
        try:
            while end - start >= self.seq_len:
                yield self.buffer[start:start + self.seq_len]
                start += self.seq_len
        finally:
            del self.buffer[:start]

    @property
    def tail(self) -> int:
        return len(self.buffer)


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
        """Finish the file and only then give it its name: a failed write never leaves a `*.arrow`."""
        try:
            self._flush()
            self.writer.close()
            self.sink.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the unfinished file (after a failed write, e.g. a full disk)."""
        try:
            self.sink.close()
        except OSError:
            pass  # its buffered bytes cannot be written either; the file goes anyway
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


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
