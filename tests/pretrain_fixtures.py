"""Shared helpers for the pretrain tests: a generated domain corpus and the tiny model family."""

import json
import os
import random
import subprocess
import sys
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
