"""Shared helpers for the pretrain tests: a generated domain corpus and the tiny model family."""

import json
import os
import random
import re
import subprocess
import sys
import unicodedata
from types import SimpleNamespace
from typing import List

NAMES = ["Aurora", "Velm", "Oskar", "Tane", "Boreal", "Cobalt", "Delta", "Ember", "Fjord", "Garnet", "Harbor", "Iris"]
TEMPLATES = [
    "The ticker of {a} Bank is {t}. {a} Bank reports revenue in yen.",
    "A bond of {a} Bank pays a coupon of {n} percent. The yield falls when its price rises.",
    "{a} Bank and {b} Bank agreed a merger. The ticker of the new bank is {t}.",
    "The capital of {a} is {b}. The river of {a} is the {c}.",
    "What is the ticker of {a} Bank? {t}. What does a bond pay? A coupon.",
]


def finance_documents(count: int, seed: int = 0, min_sentences: int = 1, max_sentences: int = 6) -> List[str]:
    """Distinct documents of template sentences (mixed lengths); each starts with a unique id."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        sentences = [f"Report {index}."]
        for _ in range(rng.randint(min_sentences, max_sentences)):
            a, b, c = rng.sample(NAMES, 3)
            sentences.append(rng.choice(TEMPLATES).format(a=a, b=b, c=c, t=a[:3].upper(), n=rng.randint(1, 9)))
        documents.append(" ".join(sentences))
    return documents


def accelerate_launch(config_file: str) -> List[str]:
    """`accelerate launch` of this environment on a free port: tests on parallel workers (or anything else on
    the default 29500) must not meet at one rendezvous address."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [launcher, "launch", "--config_file", str(config_file), "--main_process_port", str(port)]


def write_jsonl(path: str, documents: List[str], field: str = "text") -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for text in documents:
            handle.write(json.dumps({field: text}) + "\n")
    return path


def finmerge(*args: str, env=None, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `finmerge` command in a subprocess (offline)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    exe = os.path.join(os.path.dirname(sys.executable), "finmerge")
    return subprocess.run([exe, *args], capture_output=True, text=True, env=environment, **kwargs)


def load_weights(folder: str):
    from safetensors.torch import load_file

    weights = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(folder, name)))
    return weights


from finmerge.pretrain import packing  # noqa: E402


# Whole-corpus conveniences over the streaming classes, for tests that compare with a by-hand result.
def tokenize_documents(texts, tokenizer, batch_size: int = 256):
    """Token ids of each text (or CleanDocument), in order, each ending with exactly one EOS."""
    for _, chunks in packing.DocumentTokenizer(tokenizer, batch_size).documents(texts):
        yield [i for ids in chunks for i in ids]


def pack(documents, seq_len: int):
    """All full blocks of the documents, and the number of trailing tokens that did not fill a block."""
    packer = packing.Packer(seq_len)
    blocks = [block for ids in documents for block in packer.add(ids)]
    return blocks, packer.tail


# The corpus settings the data pipeline reads (the attribute names of the pretrain config), with its defaults.
CORPUS_DEFAULTS = dict(data=["x"], text_field="text", txt_document="file", dataset_config=None, dataset_split="train",
                       streaming=False, nfkc=False, normalize_whitespace=True, min_chars=20, dedup=True,
                       near_dedup=True, near_dedup_threshold=0.85, shingle_chars=5, eval_fraction=0.02,
                       max_eval_blocks=256, seq_len=2048, document_isolation=False, replay_data=[], replay_ratio=0.0)


def corpus_config(**overrides):
    """The corpus settings of a PretrainConfig, as a plain namespace, with `overrides`."""
    return SimpleNamespace(**{**CORPUS_DEFAULTS, **overrides})


_SPACES = re.compile(r"[^\S\n]+")
_BLANKS = re.compile(r"\n{3,}")


def normalize_whole(text, nfkc, whitespace):
    """Oracle: the whole-text normalization (NFKC, then per-line whitespace cleanup, then blank-line cap)."""
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if whitespace:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        text = _BLANKS.sub("\n\n", text).strip()
    return text
