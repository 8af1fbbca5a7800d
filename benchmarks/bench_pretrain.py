"""Real (non-padding) tokens per second: finmerge's packed training vs per-document padding.

Same model, same corpus of mixed-length documents, same rows per batch, same optimizer:
  packed  finmerge.pretrain: documents + EOS concatenated and cut into seq_len blocks (no padding),
          transformers Trainer with finmerge's BlockCollator.
  padded  plain transformers Trainer, one document (+EOS, truncated to seq_len) per row,
          DataCollatorForLanguageModeling(mlm=False) padding each batch to its longest row
          (dynamic padding: the stronger baseline; padding every row to seq_len would be slower).
Runs alternate (packed, padded, packed, padded, ...) in one process and the median of each is
reported, so load from other processes affects both alike. Packing efficiency = share of
non-padding tokens among the tokens the model processes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_pretrain.py --threads 1 --steps 30 --repeats 3
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("bank revenue yield bond coupon equity price market profit loss asset credit risk share index fund debt cash "
         "rate yen merger ticker quarter filing dividend").split()


def corpus(count: int, seed: int):
    """Documents whose lengths are log-normal (median ~14 words ~ 60 tokens here, a long tail past seq_len),
    about the shape of web text against a 2048-token context."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        words = max(3, int(rng.lognormvariate(2.6, 1.0)))
        body = " ".join(rng.choice(WORDS) + (str(rng.randint(0, 99)) if rng.random() < 0.2 else "") for _ in range(words))
        documents.append(f"Report {index}: {body}.")
    return documents


class CountingCollator:
    """Wraps a collator and counts real (attention) and processed tokens of every batch it makes."""

    def __init__(self, inner):
        self.inner, self.real, self.total = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.total += batch["input_ids"].numel()
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def build_model(tokenizer, args):
    from transformers import LlamaForCausalLM

    from finmerge.demo.tiny_models import tiny_config

    config = tiny_config(len(tokenizer), tokenizer, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(512, args.seq_len))
    import torch

    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def run_trainer(model_dir, dataset, collator, args, workdir):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    training = TrainingArguments(output_dir=workdir, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                 learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, save_strategy="no",
                                 report_to="none", disable_tqdm=True, logging_steps=10 ** 6, seed=0, use_cpu=True,
                                 dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator)
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="rows per step, both setups")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import datasets
    import torch
    from transformers import DataCollatorForLanguageModeling

    from finmerge.demo.tiny_models import train_tokenizer
    from finmerge.pretrain.config import PretrainConfig
    from finmerge.pretrain.corpus import resolve_sources
    from finmerge.pretrain.data import build_blocks
    from finmerge.pretrain.packing import BlockCollator, load_blocks

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    workdir = tempfile.mkdtemp(prefix="bench-pretrain-")
    tokenizer = train_tokenizer()
    model_dir = os.path.join(workdir, "model")
    build_model(tokenizer, args).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    documents = corpus(args.documents, seed=0)
    corpus_path = os.path.join(workdir, "corpus.jsonl")
    with open(corpus_path, "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}) + "\n")

    # packed: finmerge's own pipeline (no cleaning filter fires on this corpus)
    config = PretrainConfig(model=model_dir, output_dir=workdir, data=[corpus_path], seq_len=args.seq_len, eval_fraction=0.0,
                            min_chars=1, near_dedup=False).validate()
    report = build_blocks(config, tokenizer, resolve_sources(config.data), [], os.path.join(workdir, "packed"))
    packed = load_blocks(os.path.join(workdir, "packed", "train.arrow"))

    # padded: one document per row, EOS appended, truncated to seq_len
    encoded = tokenizer(documents, split_special_tokens=True)["input_ids"]
    rows = [(ids + [tokenizer.eos_token_id])[: args.seq_len] for ids in encoded]
    padded = datasets.Dataset.from_dict({"input_ids": rows})
    lengths = sorted(len(r) for r in rows)

    results = {"packed": [], "padded": []}
    efficiency = {}
    for repeat in range(args.repeats):
        for name in ("packed", "padded"):
            if name == "packed":
                collator = CountingCollator(BlockCollator())
                seconds = run_trainer(model_dir, packed, collator, args, os.path.join(workdir, f"t{repeat}{name}"))
            else:
                collator = CountingCollator(DataCollatorForLanguageModeling(tokenizer, mlm=False))
                seconds = run_trainer(model_dir, padded, collator, args, os.path.join(workdir, f"t{repeat}{name}"))
            results[name].append(collator.real / seconds)
            efficiency[name] = collator.real / collator.total
            print(f"repeat {repeat} {name}: {collator.real} real tokens / {collator.total} processed in {seconds:.2f} s "
                  f"= {collator.real / seconds:,.0f} real tokens/s", file=sys.stderr)

    packed_rate, padded_rate = statistics.median(results["packed"]), statistics.median(results["padded"])
    summary = {
        "command": " ".join(["python"] + sys.argv),
        "threads": args.threads, "steps": args.steps, "batch_rows": args.batch, "seq_len": args.seq_len,
        "model": f"Llama hidden={args.hidden} layers={args.layers} vocab={len(tokenizer)} "
                 f"({sum(p.numel() for p in build_model(tokenizer, args).parameters()):,} parameters)",
        "documents": args.documents,
        "document_tokens": {"median": lengths[len(lengths) // 2], "p10": lengths[len(lengths) // 10],
                            "p90": lengths[9 * len(lengths) // 10], "max_after_truncation": lengths[-1]},
        "packed_real_tokens_per_s": round(packed_rate), "padded_real_tokens_per_s": round(padded_rate),
        "speedup": round(packed_rate / padded_rate, 2),
        "packing_efficiency": {"packed": round(efficiency["packed"], 4), "padded": round(efficiency["padded"], 4)},
        "packed_corpus_tokens_lost_to_last_partial_block": report["tokens"]["dropped_tail"],
        "runs_real_tokens_per_s": {k: [round(v) for v in vs] for k, vs in results.items()},
    }
    print(json.dumps(summary, indent=2))
    print(f"\n| setup | real tokens/s (median of {args.repeats}) | non-padding share |\n|---|---|---|\n"
          f"| packed (finmerge) | {packed_rate:,.0f} | {efficiency['packed']:.1%} |\n"
          f"| per-document padding | {padded_rate:,.0f} | {efficiency['padded']:.1%} |\n"
          f"speed-up: {packed_rate / padded_rate:.2f}x")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
