"""Data preparation cost: time and peak RSS of cleaning + tokenizing + packing, one measurement per process.

    python benchmarks/bench_data.py long-document --mb 10 --seq-len 2048 [--tree OLD_CHECKOUT]
    python benchmarks/bench_data.py near-dedup --documents 10000 [--tree OLD_CHECKOUT]
    python benchmarks/bench_data.py single-file --mb 100 250 500

Each measurement runs in a child process (peak RSS from os.wait4, so measurements do not mix); the
corpus is generated in a temporary folder and deleted afterwards. `--tree` runs the pretrain package of
another checkout (e.g. `git worktree add /tmp/old d2e68ce`) for before/after comparisons. The tokenizer
is the tiny byte-level BPE of finmerge.demo (300 tokens, about 0.5 tokens per character, so packing
sees more tokens than with a real tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

PACKAGES = ("plugins", "pretrain", "cli", "demo", "evaluation", "sweep", "reproduce", "safety")
WORDS = ["bank", "yield", "bond", "coupon", "equity", "revenue", "yen", "rate", "price", "market", "profit", "loss",
         "asset", "credit", "risk", "share", "index", "fund", "debt", "cash", "利回り", "株式", "決算", "配当"]


def paragraph(rng: random.Random) -> str:
    lines = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(rng.randint(6, 14)))
             for _ in range(rng.randint(1, 6))]
    return "\n".join(lines)


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """A .txt of `megabytes` MB: paragraphs separated by blank lines, drawn from a pool of 5000."""
    rng = random.Random(seed)
    pool = [(paragraph(rng) + "\n\n").encode() for _ in range(5000)]
    target, written = int(megabytes * 1e6), 0
    with open(path, "wb") as handle:
        while written < target:
            block = b"".join(rng.choice(pool) for _ in range(2000))
            handle.write(block)
            written += len(block)
    return written


def documents(count: int, seed: int = 0):
    """`count` ~1 KB documents; one in five is a light edit (2% of words) of an earlier one."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if out and rng.random() < 0.2:
            words = rng.choice(out).split(" ")
            for j in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[j] = "edited" + str(rng.randint(0, 99))
            out.append(" ".join(words))
        else:
            out.append(" ".join(rng.choice(WORDS) + str(rng.randint(0, 999)) for _ in range(150)))
    return out


def corpus_config(**overrides) -> SimpleNamespace:
    values = dict(data=["x"], text_field="text", txt_document="file", dataset_config=None, dataset_split="train",
                  streaming=False, nfkc=False, normalize_whitespace=True, min_chars=20, dedup=True, near_dedup=True,
                  near_dedup_threshold=0.85, shingle_chars=5, eval_fraction=0.02, max_eval_blocks=256, seq_len=2048,
                  document_isolation=False, replay_data=[], replay_ratio=0.0)
    values.update(overrides)
    return SimpleNamespace(**values)


# --- child: one measurement ------------------------------------------------------------------------

def use_tree(tree: str) -> None:
    """Import finmerge.* from the checkout `tree` instead of the installed package."""
    import atexit

    root = tempfile.mkdtemp(prefix="bench-tree-")
    atexit.register(shutil.rmtree, root, True)
    os.makedirs(os.path.join(root, "finmerge"))
    for name in PACKAGES:
        if os.path.isdir(os.path.join(tree, name)):
            os.symlink(os.path.join(os.path.abspath(tree), name), os.path.join(root, "finmerge", name))
    sys.path.insert(0, root)


def child(args) -> None:
    if args.tree:
        use_tree(args.tree)
    from finmerge.pretrain.corpus import resolve_sources

    result = {}
    if args.job == "blocks":
        from transformers import AutoTokenizer

        from finmerge.pretrain.data import build_blocks

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        config = corpus_config(seq_len=args.seq_len, txt_document=args.txt_document, data=[args.path])
        out = tempfile.mkdtemp(prefix="bench-blocks-")
        started = time.perf_counter()
        try:
            report = build_blocks(config, tokenizer, resolve_sources([args.path]), [], out)
            result = {"seconds": time.perf_counter() - started, "train_blocks": report["blocks"]["train"],
                      "eval_blocks": report["blocks"]["eval"], "documents_kept": report["domain"]["documents_kept"]}
        except Exception as error:  # e.g. the only document was held out: say so, with the time it took
            result = {"seconds": time.perf_counter() - started, "error": " ".join(str(error).split())[:300]}
        finally:
            shutil.rmtree(out, ignore_errors=True)
    else:
        import finmerge.pretrain.corpus as corpus

        texts = documents(args.documents)
        config = corpus_config(min_chars=1, dedup=True)
        report = corpus.SourceReport()
        cleaner = corpus.Cleaner(config, report)
        if hasattr(corpus, "Document"):  # streaming readers: documents are pieces
            def source():
                for i, text in enumerate(texts):
                    document = corpus.Document(str(i))
                    document.pieces = iter([text])
                    yield document
        else:
            def source():
                yield from ((text, str(i)) for i, text in enumerate(texts))
        started = time.perf_counter()
        kept = sum(1 for _ in cleaner(source()))
        seconds = time.perf_counter() - started
        result = {"seconds": seconds, "documents_per_s": len(texts) / seconds, "kept": kept,
                  "near_duplicates": report.dropped.get("near_duplicate", 0)}
    print("RESULT " + json.dumps(result), flush=True)


# --- parent ------------------------------------------------------------------------------------------

def run_child(extra, tree, timeout):
    """Run one child and add its peak RSS (ru_maxrss of that process alone, via os.wait4)."""
    command = [sys.executable, os.path.abspath(__file__), "child"] + extra + (["--tree", tree] if tree else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    out = tempfile.TemporaryFile("w+")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            os.wait4(process.pid, 0)
            return {"timeout_s": timeout}
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    lines = [row for row in out.read().splitlines() if row.startswith("RESULT ")]
    result = json.loads(lines[-1][7:]) if lines else {"failed": process.returncode}
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["process_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def tokenizer_folder(folder: str) -> str:
    from finmerge.demo.tiny_models import train_tokenizer

    path = os.path.join(folder, "tokenizer")
    train_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["long-document", "near-dedup", "single-file", "child"])
    parser.add_argument("--mb", type=float, nargs="+", default=[10.0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[2048, 32])
    parser.add_argument("--documents", type=int, default=10000)
    parser.add_argument("--tree", default="", help="run the pretrain package of this checkout")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--txt-document", default="file")
    # child-only
    parser.add_argument("--job", default="blocks")
    parser.add_argument("--path", default="")
    parser.add_argument("--tokenizer", default="")
    args = parser.parse_args()
    if args.mode == "child":
        if isinstance(args.seq_len, list):
            args.seq_len = args.seq_len[0]
        child(args)
        return
    work = tempfile.mkdtemp(prefix="bench-data-", dir="/tmp")
    try:
        label = f"tree={args.tree or 'installed'}"
        if args.mode == "near-dedup":
            result = run_child(["--job", "dedup", "--documents", str(args.documents)], args.tree, args.timeout)
            print(json.dumps({"mode": args.mode, "documents": args.documents, "code": label, **result}), flush=True)
            return
        tokenizer = tokenizer_folder(work)
        for megabytes in args.mb:
            path = os.path.join(work, "corpus.txt")
            size = write_corpus(path, megabytes)
            for seq_len in (args.seq_len if args.mode == "long-document" else args.seq_len[:1]):
                result = run_child(["--job", "blocks", "--path", path, "--tokenizer", tokenizer, "--seq-len",
                                    str(seq_len), "--txt-document", args.txt_document], args.tree, args.timeout)
                print(json.dumps({"mode": args.mode, "mb": round(size / 1e6, 1), "seq_len": seq_len,
                                  "txt_document": args.txt_document, "code": label, **result}), flush=True)
            os.remove(path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
