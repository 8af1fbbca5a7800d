"""Near-duplicate detection with datasketch: MinHash signatures over character shingles, MinHashLSH buckets.

A document is a near-duplicate when an earlier kept document shares an LSH band with it and the two
MinHash signatures estimate a Jaccard similarity of at least `threshold` (LSH only proposes
candidates; the estimate decides).

Memory per document is its signature: shingles are hashed as the text streams by (`ShingleSketch`),
SHINGLE_BATCH at a time, and never kept.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

NUM_PERM = 128  # MinHash permutations: standard error of the Jaccard estimate <= 0.045
SEED = 1
SHINGLE_BATCH = 1 << 13  # shingles per MinHash.update_batch call: its temporaries are SHINGLE_BATCH x NUM_PERM
_BASE = np.uint64(0x100000001B3)  # polynomial rolling hash over code points (FNV prime as the base)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def lsh_bands(threshold: float, num_perm: int = NUM_PERM) -> Tuple[int, int]:
    """(bands, rows): the most rows per band whose S-curve midpoint (1/b)^(1/r) lies at or below
    threshold - 0.1, so that pairs at the threshold become candidates with high probability; the
    candidates are then confirmed by their estimated Jaccard, so a low midpoint costs time, not accuracy."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        if num_perm % rows:
            continue
        bands = num_perm // rows
        if (1.0 / bands) ** (1.0 / rows) <= threshold - 0.1:
            best = (bands, rows)
    return best


def _identity(value: int) -> int:
    return value


def shingle_hashes(text: str, size: int) -> np.ndarray:
    """32-bit hashes of every `size`-character window of `text` (vectorized: a polynomial hash of the
    code points, finished with the splitmix64 mixer so that the kept high bits depend on every character)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = len(codes) - size + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as intended
        h = np.zeros(count, dtype=np.uint64)
        for offset in range(size):
            h = h * _BASE + codes[offset:offset + count]
        h = (h ^ (h >> np.uint64(30))) * _MIX1
        h = (h ^ (h >> np.uint64(27))) * _MIX2
        h = h ^ (h >> np.uint64(31))
    return h >> np.uint64(32)


class ShingleSketch:
    """A document's MinHash, fed piece by piece: windows that span two pieces are hashed too, because
    the last `size - 1` characters are carried over. A text shorter than `size` is one shingle."""

    def __init__(self, size: int, num_perm: int = NUM_PERM):
        from datasketch import MinHash

        self.size = size
        self.minhash = MinHash(num_perm=num_perm, seed=SEED, hashfunc=_identity)
        self.carry = ""
        self.windows = 0

    def update(self, text: str) -> None:
        text = self.carry + text
        step = SHINGLE_BATCH
        for start in range(0, max(0, len(text) - self.size + 1), step):  # bounded numpy temporaries
            hashes = shingle_hashes(text[start:start + step + self.size - 1], self.size)
            self.windows += len(hashes)
            self.minhash.update_batch(np.unique(hashes).tolist())
        self.carry = text[max(0, len(text) - self.size + 1):] if self.size > 1 else ""

    def finish(self):
        if self.windows == 0 and self.carry:  # shorter than one shingle: the whole text is the shingle
            hashes = shingle_hashes(self.carry, len(self.carry))
            self.minhash.update_batch(hashes.tolist())
        return self.minhash


class NearDuplicateIndex:
    """MinHashLSH over the kept documents' signatures (uint32, NUM_PERM x 4 bytes per document)."""

    def __init__(self, threshold: float, shingle_size: int = 5, num_perm: int = NUM_PERM):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.shingle_size = shingle_size
        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=lsh_bands(threshold, num_perm))
        self.signatures: list = []

    def sketch(self) -> ShingleSketch:
        return ShingleSketch(self.shingle_size, self.num_perm)

    def signature(self, text: str):
        sketch = self.sketch()
        sketch.update(text)
        return sketch.finish()

    @staticmethod
    def similarity(first, second) -> float:
        return float(first.jaccard(second))

    def is_duplicate_then_add(self, minhash) -> bool:
        values = np.asarray(minhash.hashvalues)
        for key in self.lsh.query(minhash):
            if float((self.signatures[key] == values).mean()) >= self.threshold:
                return True
        key = len(self.signatures)
        self.signatures.append(values.astype(np.uint32))
        self.lsh.insert(key, minhash, check_duplication=False)
        return False
