"""Corpus -> packed blocks on disk: read, clean, hold out, tokenize, replay, pack (one streaming pass).

Output in `data_dir`: train.arrow, eval.arrow (Arrow streams of fixed-length blocks) and
report.json, written last, which marks the folder complete. A rerun of the same run reuses them, so
a resumed run trains on exactly the same blocks in the same order.

Memory does not grow with a document's length: documents stream through cleaning (cleaning.py),
tokenization (packing.DocumentTokenizer) and packing (packing.Packer) in bounded chunks.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, List

from .cleaning import CleanDocument, Cleaner, holdout_fraction
from .config import PretrainError
from .corpus_report import SourceReport
from .packing import BlockWriter, Chunks, DocumentTokenizer, Packer
from .readers import read_source
from .sources import Source

REPORT = "report.json"


def clean_documents(sources: List[Source], config, report: SourceReport) -> Iterator[CleanDocument]:
    cleaner = Cleaner(config, report)
    for source in sources:
        yield from cleaner(read_source(source, config, report))


def interleave_replay(domain: Iterable[Chunks], replay: Iterator[Chunks], ratio: float,
                      counts: Dict[str, int]) -> Iterator[List[int]]:
    """Token chunks of the domain documents with replay documents mixed in between documents, so that
    replay tokens / all tokens stays at `ratio` (stops early if the replay corpus runs out; `counts`
    records what was achieved). A document's first chunk counts before the replay is topped up (for
    short documents: the whole document), the rest of a long one at the next document boundary."""
    target = ratio / (1.0 - ratio) if ratio > 0 else 0.0
    exhausted = ratio <= 0

    def top_up() -> Iterator[List[int]]:
        nonlocal exhausted
        while not exhausted and counts["replay"] < target * counts["domain"]:
            extra = next(replay, None)
            if extra is None:
                exhausted = True
                return
            counts["replay_documents"] += 1
            for ids in extra:
                counts["replay"] += len(ids)
                yield ids

    for chunks in domain:
        first = next(chunks, [])
        counts["domain"] += len(first)
        yield from top_up()
        yield first
        for ids in chunks:
            counts["domain"] += len(ids)
            yield ids
    yield from top_up()


def build_blocks(config, tokenizer, domain: List[Source], replay: List[Source], data_dir: str) -> Dict:
    """Write the packed train/eval blocks and return the data report (also saved as report.json)."""
    from tqdm.auto import tqdm

    from finmerge.safety.outputs import atomic_write_text

    os.makedirs(data_dir, exist_ok=True)
    domain_report, replay_report = SourceReport(), SourceReport()
    seq_len = config.seq_len
    isolation_eos = tokenizer.eos_token_id if config.document_isolation else None
    eval_cap = config.max_eval_blocks * seq_len
    counts = {"domain": 0, "replay": 0, "replay_documents": 0, "eval": 0, "eval_documents": 0}
    encoder = DocumentTokenizer(tokenizer)

    eval_writer = BlockWriter(os.path.join(data_dir, "eval.arrow"), seq_len, isolation_eos)
    eval_packer = Packer(seq_len)

    def hold_out(chunks: Chunks) -> None:
        counts["eval_documents"] += 1
        for ids in chunks:
            counts["eval"] += len(ids)
            for block in eval_packer.add(ids):
                if eval_writer.count < config.max_eval_blocks:
                    eval_writer.write(block)

    def domain_train() -> Iterator[Chunks]:
        # Hold-out is decided by a hash of the text, so it does not depend on file order; once
        # max_eval_blocks worth of tokens are held out, further held-out documents go to training.
        documents = tqdm(clean_documents(domain, config, domain_report), desc="cleaning and packing",
                         unit=" docs", mininterval=2.0)
        for document, chunks in encoder.documents(documents):
            if holdout_fraction(document.digest) < config.eval_fraction and counts["eval"] < eval_cap:
                hold_out(chunks)
                continue
            yield chunks

    replay_docs: Iterator[Chunks] = iter(())
    if replay:
        replay_docs = (chunks for _, chunks in encoder.documents(clean_documents(replay, config, replay_report)))
    train_writer = BlockWriter(os.path.join(data_dir, "train.arrow"), seq_len, isolation_eos)
    packer = Packer(seq_len)
    try:
        for ids in interleave_replay(domain_train(), replay_docs, config.replay_ratio if replay else 0.0, counts):
            for block in packer.add(ids):
                train_writer.write(block)
    except BaseException:
        train_writer.abort()  # a half-written train.arrow must not be mistaken for the packed corpus
        eval_writer.abort()
        raise
    try:
        train_writer.close()
        eval_writer.close()
    except BaseException:
        for writer in (train_writer, eval_writer):
            writer.abort()
            if os.path.exists(writer.path):
                os.remove(writer.path)
        raise

    train_tokens = train_writer.count * seq_len
    report = {
        "domain": domain_report.as_dict(),
        "replay": replay_report.as_dict() if replay else None,
        "tokens": {
            "domain_train": counts["domain"], "replay_train": counts["replay"],
            "replay_share": round(counts["replay"] / max(1, counts["domain"] + counts["replay"]), 4),
            "held_out": counts["eval"], "in_train_blocks": train_tokens,
            "dropped_tail": packer.tail, "held_out_dropped_tail": eval_packer.tail,
        },
        "documents": {"held_out": counts["eval_documents"], "replay_used": counts["replay_documents"]},
        "blocks": {"train": train_writer.count, "eval": eval_writer.count, "seq_len": seq_len},
        "replay_exhausted": bool(replay) and config.replay_ratio > 0 and
        counts["replay"] < config.replay_ratio / (1 - config.replay_ratio) * counts["domain"] * 0.999,
    }
    if train_writer.count == 0:
        raise PretrainError(_empty_message(config, domain_report, report))
    atomic_write_text(os.path.join(data_dir, REPORT), json.dumps(report, indent=2))
    return report


def _empty_message(config, domain_report: SourceReport, report: Dict) -> str:
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
