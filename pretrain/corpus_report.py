"""Counts for one corpus: documents seen, kept, and dropped per reason, with a few examples each."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, List

EXAMPLES = 3

# Why a document was dropped, as written in reports and errors.
REASONS = {
    "unreadable": "file could not be read",
    "non_utf8": "bytes that are not UTF-8",
    "bad_json": "line is not a JSON object",
    "missing_field": "no string in the text field",
    "too_short": "shorter than min_chars after normalization",
    "exact_duplicate": "exact duplicate of an earlier document",
    "near_duplicate": "near-duplicate of an earlier document",
}


class SourceReport:
    """Counts for one corpus (domain or replay): documents seen, kept, dropped per reason, with examples."""

    def __init__(self):
        self.kept = 0
        self.chars = 0
        self.dropped: Counter = Counter()
        self.examples: Dict[str, List[str]] = defaultdict(list)
        self.files = 0
        self.txt_units: Counter = Counter()  # .txt files by how they were split into documents

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append(where)

    @property
    def seen(self) -> int:
        return self.kept + sum(self.dropped.values())

    def as_dict(self) -> Dict:
        return {
            "files": self.files, "documents_seen": self.seen, "documents_kept": self.kept, "chars_kept": self.chars,
            "dropped": dict(sorted(self.dropped.items())), "examples": {k: v for k, v in sorted(self.examples.items())},
            "txt_files_read_as": dict(sorted(self.txt_units.items())),
        }

    def describe_drops(self, config) -> str:
        if not self.dropped:
            return "nothing was dropped"
        parts = []
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            detail = REASONS.get(reason, reason)
            if reason == "too_short":
                detail = f"shorter than min_chars={config.min_chars} after normalization"
            if reason == "near_duplicate":
                detail = f"near-duplicate (Jaccard >= {config.near_dedup_threshold}) of an earlier document"
            parts.append(f"{reason}: {count} ({detail}; e.g. {', '.join(self.examples[reason])})")
        return "; ".join(parts)
