"""Packing: EOS per document, concatenate-and-chunk blocks, and the trainer's loss equals a by-hand loss."""

import os
import random

import numpy as np
import pytest
import torch

from finmerge.pretrain import cleaning, readers
from finmerge.pretrain.cleaning import safe_chunks
from finmerge.pretrain.config import PretrainConfig
from finmerge.pretrain.corpus import resolve_sources
from finmerge.pretrain.data import build_blocks
from finmerge.pretrain.packing import (BlockCollator, BlockWriter, DocumentTokenizer, Packer, check_isolation,
                                       document_position_ids, load_blocks)
from pretrain_fixtures import corpus_config as _config, finance_documents, normalize_whole as _normalize_whole, pack, tokenize_documents, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_family.base)


def _oracle_blocks(texts, tokenizer, seq_len):
    """Independent reference: each text tokenized alone + EOS, all concatenated, cut with numpy."""
    flat = []
    for text in texts:
        flat += tokenizer(text, split_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    count = len(flat) // seq_len
    return np.array(flat[: count * seq_len]).reshape(count, seq_len), len(flat) % seq_len


def test_each_document_ends_with_one_eos_and_text_cannot_forge_one(tokenizer):
    eos = tokenizer.eos_token_id
    texts = ["The ticker of Aurora Bank is ARB.", "forged <|endoftext|> inside", "x" * 700]
    encoded = list(tokenize_documents(texts, tokenizer, batch_size=2))
    assert encoded == DocumentTokenizer(tokenizer).encode(texts)
    assert len(encoded) == 3
    for text, ids in zip(texts, encoded):
        assert ids[-1] == eos and ids.count(eos) == 1
        assert tokenizer.decode(ids[:-1]) == text


def test_pack_is_concatenate_and_chunk(tokenizer):
    rng = random.Random(0)
    documents = [[rng.randint(2, 299) for _ in range(rng.randint(1, 90))] for _ in range(200)]
    blocks, tail = pack(documents, 64)
    flat = np.concatenate([np.array(d) for d in documents])
    count = len(flat) // 64
    assert np.array_equal(np.array(blocks), flat[: count * 64].reshape(count, 64))
    assert tail == len(flat) - count * 64
    # the same documents handed over in random pieces (how long documents arrive) give the same blocks
    packer, pieces = Packer(64), []
    for document in documents:
        cuts = sorted(set(rng.sample(range(1, len(document) + 1), min(3, len(document)))) | {len(document)})
        pieces += [document[a:b] for a, b in zip([0] + cuts, cuts) if b > a]
    assert [b for piece in pieces for b in packer.add(piece)] == blocks and packer.tail == tail


def test_chunked_tokenization_equals_whole_text_tokenization(tokenizer):
    encoder = DocumentTokenizer(tokenizer)
    assert encoder.chunked  # the probe found chunking exact for this byte-level BPE
    rng = random.Random(4)
    for text in finance_documents(20, seed=5):
        text = "\n".join(text for _ in range(rng.randint(1, 6))) + " tail  words\n\nend"
        whole = encoder.encode([text])[0]
        for size in (1, 7, 40):
            chunked = [i for ids in encoder.encode_chunks(c for c, _ in safe_chunks([text], size)) for i in ids]
            assert chunked == whole


def test_a_long_document_is_packed_in_chunks_exactly_as_whole(tmp_path, tokenizer, monkeypatch):
    """build_blocks on a 0.5 MB document (plus short ones) with tiny pieces, chunks and spool: the train
    blocks equal the oracle's (each normalized text tokenized whole + EOS, concatenated, cut)."""
    monkeypatch.setattr(readers, "PIECE_BYTES", 1 << 12)
    monkeypatch.setattr(cleaning, "CHUNK_CHARS", 1 << 12)
    monkeypatch.setattr(cleaning, "SPOOL_CHARS", 1 << 14)
    rng = random.Random(6)
    short = finance_documents(30, seed=7)
    long_text = "\n\n".join(" ".join(rng.choice(short).split()[:rng.randint(3, 30)]) + "  " for _ in range(6000))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a_long.txt").write_text(long_text)
    for i, text in enumerate(short):
        (tmp_path / "c" / f"b{i:02d}.txt").write_text(text)
    assert len(long_text) > 4e5
    config = _config(data=[str(tmp_path / "c")], seq_len=32, eval_fraction=0.0, near_dedup=False, min_chars=1)
    report = build_blocks(config, tokenizer, resolve_sources(config.data), [], str(tmp_path / "data"))
    texts = [_normalize_whole(t, False, True) for t in [long_text] + short]
    blocks, tail = _oracle_blocks(texts, tokenizer, 32)
    packed = load_blocks(str(tmp_path / "data" / "train.arrow"))[:]["input_ids"]
    assert torch.equal(packed, torch.as_tensor(blocks)) and report["tokens"]["dropped_tail"] == tail


def test_position_ids_restart_after_eos():
    assert document_position_ids([5, 6, 1, 7, 8, 9, 1, 4], eos_id=1) == [0, 1, 2, 0, 1, 2, 3, 0]
    assert document_position_ids([5, 6, 7], eos_id=1) == [0, 1, 2]


def test_block_file_round_trip(tmp_path):
    rng = random.Random(1)
    blocks = [[rng.choice([1, 2, 3, 4]) for _ in range(16)] for _ in range(2500)]
    writer = BlockWriter(str(tmp_path / "b.arrow"), 16, eos_id=1, batch=1000)
    for block in blocks:
        writer.write(block)
    writer.close()
    loaded = load_blocks(str(tmp_path / "b.arrow"))
    assert len(loaded) == 2500 and not os.path.exists(str(tmp_path / "b.arrow.tmp"))
    assert torch.equal(loaded[:]["input_ids"], torch.tensor(blocks))
    assert loaded[7]["position_ids"].tolist() == document_position_ids(blocks[7], 1)


def test_collator_keeps_eos_in_the_labels_even_when_pad_is_eos():
    batch = BlockCollator()([{"input_ids": torch.tensor([5, 1, 6, 1])}, {"input_ids": torch.tensor([1, 7, 8, 9])}])
    assert torch.equal(batch["labels"], batch["input_ids"]) and (batch["labels"] == 1).sum() == 3
    assert set(batch) == {"input_ids", "labels"}  # no attention_mask: a plain causal mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_restarted_positions_isolate_documents_and_plain_blocks_do_not(tiny_family, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family.base, attn_implementation=attention)
    assert check_isolation(model, eos_id=1, vocab_size=300) < 1e-5
    # Plain causal block (what TRL's padding-free rows do without FlashAttention): the second document
    # sees the first one, and its logits change.
    ids = torch.tensor([[5, 9, 23, 40, 1, 7, 8, 99]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 5:]).logits[0]
        packed_positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
        leaky = model(input_ids=ids, position_ids=packed_positions, attention_mask=torch.ones_like(ids)).logits[0, 5:]
    assert (alone - leaky).abs().max() > 1e-3


def _reference_loss(model, blocks, eos_id=None):
    """Mean next-token cross-entropy over the blocks, computed by hand from logits. With eos_id, each
    document segment of a block is run alone (positions from 0), the definition of isolation."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in torch.as_tensor(blocks):
            if eos_id is None:
                logits = model(input_ids=block[None]).logits[0]
            else:
                ends = [i + 1 for i, t in enumerate(block.tolist()) if t == eos_id]
                bounds = [0] + [e for e in ends if e < len(block)] + [len(block)]
                logits = torch.cat([model(input_ids=block[None, a:b]).logits[0] for a, b in zip(bounds, bounds[1:])])
            log_probs = torch.log_softmax(logits[:-1].double(), dim=-1)
            total -= log_probs.gather(1, block[1:, None]).sum().item()
            count += len(block) - 1
    return total / count


@pytest.mark.parametrize("micro_batch_split, isolation", [(1, False), (2, False), (1, True)])
def test_trainer_loss_equals_reference_on_the_same_blocks(tmp_path, tiny_family, tokenizer, micro_batch_split, isolation):
    from transformers import AutoModelForCausalLM

    from finmerge.pretrain.train import run_pretraining

    seq_len = 32
    for count in range(24, 40):  # a corpus whose block count splits evenly into the micro-batches
        texts = finance_documents(count, seed=3)
        blocks, _ = _oracle_blocks(texts, tokenizer, seq_len)
        if len(blocks) % micro_batch_split == 0:
            break
    write_jsonl(str(tmp_path / "corpus.jsonl"), texts)
    config = PretrainConfig(
        model=tiny_family.base, data=[str(tmp_path / "corpus.jsonl")], output_dir=str(tmp_path / "out"), seq_len=seq_len,
        max_steps=1, per_device_train_batch_size=len(blocks) // micro_batch_split,
        gradient_accumulation_steps=micro_batch_split, logging_steps=1, eval_fraction=0.0, min_chars=1,
        near_dedup=False, dedup=False, document_isolation=isolation, num_threads=1, learning_rate=1e-3)
    summary = run_pretraining(config)
    packed = load_blocks(str(tmp_path / "out" / "pretrain_data" / "train.arrow"))[:]["input_ids"]
    assert torch.equal(packed, torch.as_tensor(blocks))  # our packer wrote exactly the oracle's blocks
    model = AutoModelForCausalLM.from_pretrained(tiny_family.base)
    reference = _reference_loss(model, blocks, eos_id=tokenizer.eos_token_id if isolation else None)
    # step 1 sees every block once (batch x accumulation = all blocks), with the initial weights
    assert summary["loss_curve"][0]["step"] == 1
    tolerance = 2e-6 * reference
    assert summary["loss_curve"][0]["loss"] == pytest.approx(reference, abs=tolerance)
    if isolation:  # the tolerance tells the two masks apart: with isolation, documents do not see their predecessors
        assert abs(_reference_loss(model, blocks) - reference) > 5 * tolerance
