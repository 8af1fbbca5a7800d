"""The per-relation breakdown of strict accuracy, from the answers the evaluation already kept.

`evaluate` keeps every greedy answer of a QA set in order ("answers": answer, hit, ended); the
relation of each question is in its QA file. So the breakdown asks no model anything again.
"""

from typing import Callable, Dict, List, Sequence

from finmerge.evaluation.data import load_qa


def records(scores: Dict, qa_path: str, keep: Callable = lambda item: True) -> List[Dict]:
    """One record per kept question: relation, entity, value, the greedy answer, hit, ended, strict."""
    items = load_qa(qa_path)
    answers = scores["answers"]
    if len(answers) != len(items):
        raise ValueError(f"{qa_path} has {len(items)} questions but the evaluation kept {len(answers)} answers: "
                         "the file changed after the evaluation; rerun it")
    return [{"relation": item.extra.get("relation"), "entity": item.extra.get("entity"), "value": item.expected,
             "answer": answer["answer"], "hit": answer["hit"], "ended": answer["ended"],
             "strict": answer["hit"] and answer["ended"]}
            for item, answer in zip(items, answers) if keep(item)]


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
