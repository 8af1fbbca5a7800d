"""Per-question greedy answers and the per-relation breakdown of strict accuracy.

`finmerge eval` reports only totals (and a few samples). The demo wants to know *which* relation
types transfer through the merge, so it asks each question on its own through the evaluation's own
scoring (`metrics.chat_generation` on a one-question list: same prompt, same greedy decoding, same
"contains the value" and "ended the turn" rules) and keeps every answer. The totals of these records
may differ from the batched evaluation by a near-tie now and then (padding changes float rounding).
"""

from typing import Dict, List, Optional, Sequence

from tqdm import tqdm


def answer_each(model_path: str, qa_path: str, turn_end: Optional[str], max_new_tokens: int,
                chat_template_from: Optional[str] = None, keep=lambda item: True, label: str = "") -> List[Dict]:
    """One record per question: relation, entity, value, the greedy answer, hit, ended, strict."""
    from finmerge.evaluation import metrics
    from finmerge.evaluation.data import load_qa
    from finmerge.evaluation.run import load_model

    from transformers import AutoTokenizer

    model, tokenizer = load_model(model_path)
    template = None
    if not tokenizer.chat_template and chat_template_from:  # a model without a chat template is asked in another's
        template = AutoTokenizer.from_pretrained(chat_template_from).chat_template
    records = []
    items = [item for item in load_qa(qa_path) if keep(item)]
    for item in tqdm(items, desc=f"per-question answers {label}".strip(), leave=False):
        scores = metrics.chat_generation(model, tokenizer, [item], template, max_new_tokens, 1, turn_end)
        records.append({"relation": item.extra.get("relation"), "entity": item.extra.get("entity"),
                        "value": item.expected, "answer": scores["samples"][0]["answer"].strip(),
                        "hit": scores["accuracy"] == 1.0, "ended": scores["ends_with_eos"] == 1.0,
                        "strict": scores["strict"] == 1.0})
    return records


def by_relation(records: Sequence[Dict]) -> Dict[str, Dict]:
    """{relation: {questions, strict, accuracy, ends_with_eos}}, relations sorted, plus "all"."""
    groups: Dict[str, List[Dict]] = {}
    for record in records:
        groups.setdefault(record["relation"], []).append(record)
    out = {name: _shares(groups[name]) for name in sorted(groups)}
    out["all"] = _shares(records)
    return out


def _shares(records: Sequence[Dict]) -> Dict:
    n = len(records)
    return {"questions": n, "strict": sum(r["strict"] for r in records) / n if n else None,
            "accuracy": sum(r["hit"] for r in records) / n if n else None,
            "ends_with_eos": sum(r["ended"] for r in records) / n if n else None}
