"""Corpus -> packed blocks on disk: read, clean, hold out, tokenize, replay, pack (one streaming pass).

Output in `data_dir`: train.arrow, eval.arrow (Arrow streams of fixed-length blocks) and
report.json, written last, which marks the folder complete. A rerun of the same run reuses them, so
a resumed run trains on exactly the same blocks in the same order.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Dict, Iterator, List, Tuple

from .config import PretrainConfig, PretrainError
from .corpus import Cleaner, Source, SourceReport, holdout_fraction, read_source
from .packing import BlockWriter, Packer, tokenize_documents

REPORT = "report.json"


def _texts(sources: List[Source], config: PretrainConfig, report: SourceReport) -> Iterator[Tuple[str, bytes]]:
    cleaner = Cleaner(config, report)
    for source in sources:
        yield from cleaner(read_source(source, config, report))


def interleave_replay(domain: Iterator[List[int]], replay: Iterator[List[int]], ratio: float,
                      counts: Dict[str, int]) -> Iterator[List[int]]:
    """Mix replay documents in so that replay tokens / all tokens stays at `ratio` (stops early if the
    replay corpus runs out; `counts` records what was achieved)."""
    target = ratio / (1.0 - ratio) if ratio > 0 else 0.0
    exhausted = ratio <= 0
    for ids in domain:
        counts["domain"] += len(ids)
        while not exhausted and counts["replay"] < target * counts["domain"]:
            extra = next(replay, None)
            if extra is None:
                exhausted = True
                break
            counts["replay"] += len(extra)
            counts["replay_documents"] += 1
            yield extra
        yield ids


def build_blocks(config: PretrainConfig, tokenizer, domain: List[Source], replay: List[Source], data_dir: str) -> Dict:
    """Write the packed train/eval blocks and return the data report (also saved as report.json)."""
    os.makedirs(data_dir, exist_ok=True)
    domain_report, replay_report = SourceReport(), SourceReport()
    seq_len = config.seq_len
    eos = tokenizer.eos_token_id
    isolation_eos = eos if config.document_isolation else None
    eval_cap = config.max_eval_blocks * seq_len
    eval_docs: List[List[int]] = []
    eval_tokens = 0
    counts = {"domain": 0, "replay": 0, "replay_documents": 0, "eval": 0, "eval_documents": 0}

    domain_texts = _texts(domain, config, domain_report)
    # Hold-out is decided by a hash of the text, so it does not depend on file order.
    held_out = deque()  # flags of texts handed to the tokenizer, in order, not yet seen back as ids

    def route() -> Iterator[str]:
        from tqdm.auto import tqdm

        for text, digest in tqdm(domain_texts, desc="cleaning and packing", unit=" docs", mininterval=2.0):
            held_out.append(holdout_fraction(digest) < config.eval_fraction)
            yield text

    def domain_train_ids() -> Iterator[List[int]]:
        nonlocal eval_tokens
        for ids in tokenize_documents(route(), tokenizer):
            if held_out.popleft() and eval_tokens < eval_cap:
                eval_docs.append(ids)
                eval_tokens += len(ids)
                continue
            yield ids

    replay_ids = tokenize_documents((t for t, _ in _texts(replay, config, replay_report)), tokenizer) if replay else iter(())
    train_writer = BlockWriter(os.path.join(data_dir, "train.arrow"), seq_len, isolation_eos)
    packer = Packer(seq_len)
    try:
        for ids in interleave_replay(domain_train_ids(), replay_ids, config.replay_ratio if replay else 0.0, counts):
            for block in packer.add(ids):
                train_writer.write(block)
    finally:
        train_writer.close()

    eval_writer = BlockWriter(os.path.join(data_dir, "eval.arrow"), seq_len, isolation_eos)
    eval_packer = Packer(seq_len)
    for ids in eval_docs:
        for block in eval_packer.add(ids):
            if eval_writer.count < config.max_eval_blocks:
                eval_writer.write(block)
    eval_writer.close()
    counts["eval"] = eval_tokens
    counts["eval_documents"] = len(eval_docs)

    train_tokens = train_writer.count * seq_len
    report = {
        "domain": domain_report.as_dict(),
        "replay": replay_report.as_dict() if replay else None,
        "tokens": {
            "domain_train": counts["domain"], "replay_train": counts["replay"],
            "replay_share": round(counts["replay"] / max(1, counts["domain"] + counts["replay"]), 4),
            "held_out": eval_tokens, "in_train_blocks": train_tokens,
            "dropped_tail": packer.tail, "held_out_dropped_tail": eval_packer.tail,
        },
        "documents": {"held_out": len(eval_docs), "replay_used": counts["replay_documents"]},
        "blocks": {"train": train_writer.count, "eval": eval_writer.count, "seq_len": seq_len},
        "replay_exhausted": bool(replay) and config.replay_ratio > 0 and
        counts["replay"] < config.replay_ratio / (1 - config.replay_ratio) * counts["domain"] * 0.999,
    }
    if train_writer.count == 0:
        raise PretrainError(_empty_message(config, domain_report, report))
    tmp = os.path.join(data_dir, REPORT + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    os.replace(tmp, os.path.join(data_dir, REPORT))
    return report


def _empty_message(config: PretrainConfig, domain_report: SourceReport, report: Dict) -> str:
    sources = ", ".join(config.data)
    if domain_report.kept == 0:
        return (f"no training text left in {sources}: {domain_report.seen} documents seen in {domain_report.files} "
                f"file(s)/dataset(s), none kept. Dropped: {domain_report.describe_drops(config)}.")
    tokens = report["tokens"]
    return (f"not enough training text in {sources} for one block of seq_len={config.seq_len} tokens: "
            f"{domain_report.kept} documents kept, {tokens['domain_train']} tokens for training "
            f"(+{tokens['held_out']} held out by eval_fraction={config.eval_fraction}). "
            f"Dropped: {domain_report.describe_drops(config)}. Add text, lower --seq-len or --eval-fraction.")


def load_report(data_dir: str):
    path = os.path.join(data_dir, REPORT)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
