"""The demo's own report sections, added to the reproduction report: the per-relation breakdown,
every sweep variant on the validation questions, and the demo's targets checked against the table."""

from typing import Dict, List, Optional

FINANCE_KEYS = ("strict", "accuracy", "ends_with_eos", "choice_accuracy", "answer_nll")


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def sweep_points(sweep: Optional[Dict], qa_set: str = "finance") -> List[Dict]:
    """Each grid point's numbers on the sweep's (validation) QA set."""
    rows = []
    for point in (sweep or {}).get("points", []):
        scores = point["result"].get(qa_set) or {}
        rows.append({"variant": point["variant"], "w_domain": point["w_domain"], "w_instruct": point["w_instruct"],
                     **{k: scores.get(k) for k in FINANCE_KEYS}})
    return rows


def targets(results: Dict[str, Dict], label: str) -> Dict[str, Dict]:
    """The demo's targets for the row `label` (the sweep's best, or the (1,1) merge), from the table's numbers."""
    row, domain, instruct = results[label]["finance"], results["domain"]["finance"], results["instruct"]["finance"]
    return {
        "finance strict >= 0.30": {"value": row["strict"], "met": row["strict"] >= 0.30},
        "finance strict above both parents": {"value": row["strict"],
                                              "met": row["strict"] > max(domain["strict"], instruct["strict"])},
        "keeps >= 90% of the domain model's MC accuracy": {
            "value": row["choice_accuracy"] / domain["choice_accuracy"] if domain["choice_accuracy"] else None,
            "met": row["choice_accuracy"] >= 0.9 * domain["choice_accuracy"]},
        "ends >= 90% of financial answers with the turn end": {"value": row["ends_with_eos"], "met": row["ends_with_eos"] >= 0.9},
    }


def all_targets(results: Dict[str, Dict]) -> Dict[str, Dict]:
    """The targets of the (1, 1) merge, the label-chosen sweep best and the data-free choice; the data-free
    choice is also held against the label-chosen best, the (1, 1) merge and every mergekit baseline."""
    from finmerge.sweep.baselines import BASELINES

    labels = ["merged"] + [label for label in results if label.startswith(("sweep best", "data-free choice"))]
    out = {label: targets(results, label) for label in labels}
    free = next((label for label in labels if label.startswith("data-free choice")), None)
    best = next((label for label in labels if label.startswith("sweep best")), None)
    if free:
        strict = results[free]["finance"]["strict"]
        checks = out[free]
        if best:
            reference = results[best]["finance"]["strict"]
            checks["finance strict >= 90% of the label-chosen best's"] = {
                "value": strict / reference if reference else None, "met": strict >= 0.9 * reference}
        checks["finance strict above the (1, 1) merge"] = {"value": strict, "met": strict > results["merged"]["finance"]["strict"]}
        baselines = [label for label in results if label in BASELINES]
        if baselines:
            top = max(results[label]["finance"]["strict"] for label in baselines)
            checks["finance strict above every mergekit baseline"] = {"value": top, "met": strict > top}
    return out


def render(demo: Dict) -> str:
    lines = []
    breakdown = demo["breakdown"]
    finance = breakdown["finance_test"]
    labels = list(finance)
    relations = [r for r in next(iter(finance.values()))["by_relation"] if r != "all"]
    general = breakdown.get("general_same_relations") or {}
    lines += ["## Per-relation strict accuracy (finance test questions, greedy chat answers)", "",
              "The evaluation's own greedy answers, split by relation; strict = contains the right value and ended the turn. "
              "The last column: the instruct model on the same relation types about general-world entities it never "
              "chatted about (the base knows their facts), i.e. how well the question type itself transfers.", "",
              "| relation | questions | " + " | ".join(labels) + " | instruct, general entities (questions) |",
              "|---" * (3 + len(labels)) + "|"]
    for relation in relations + ["all"]:
        cells = [_fmt(finance[label]["by_relation"][relation]["strict"]) for label in labels]
        bound = general.get("by_relation", {}).get(relation)
        bound_cell = f"{_fmt(bound['strict'])} ({bound['questions']})" if bound else "n/a"
        name = "**all**" if relation == "all" else relation
        lines.append(f"| {name} | {finance[labels[0]]['by_relation'][relation]['questions']} | "
                     + " | ".join(cells) + f" | {bound_cell} |")
    lines.append("")
    points = demo.get("sweep_points") or []
    if points:
        lines += ["## Sweep variants (validation questions)", "",
                  "| variant | w_domain | w_instruct | strict | greedy acc | ends with turn end | MC acc | answer NLL |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in points:
            lines.append(f"| {p['variant']} | {p['w_domain']} | {p['w_instruct']} | {_fmt(p['strict'])} | {_fmt(p['accuracy'])} | "
                         f"{_fmt(p['ends_with_eos'])} | {_fmt(p['choice_accuracy'])} | {_fmt(p['answer_nll'])} |")
        lines.append("")
    for label, checks in demo.get("targets", {}).items():
        lines += [f"## Targets for `{label}` (test questions)", "", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(c['value'])} | {'yes' if c['met'] else 'no'} |" for name, c in checks.items()]
        lines.append("")
    return "\n".join(lines)
