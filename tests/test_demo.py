"""`finmerge demo --quick`: the embedded default's whole path on a smaller world; every number in
the report was computed by the run, and a rerun skips every stage."""

import json
import os
import re

import pytest

from finmerge.demo.pipeline import QUICK_SWEEP
from finmerge.demo.world import QUICK, build_world


def _script(name):
    """A benchmarks/ script (not part of the package), loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo_seeds = _script("demo_seeds")
demo_training = _script("demo_training")

REQUIRED = {  # the report's columns: where each lives in a row of the report
    "finance perplexity": ("domain", "perplexity"),
    "finance MC accuracy (loglik, chat format)": ("finance", "choice_accuracy"),
    "finance chat accuracy (greedy)": ("finance", "accuracy"),
    "chat-format compliance": ("finance", "ends_with_eos"),
    "general chat accuracy": ("general", "accuracy"),
}


def test_world_is_seeded_and_keeps_finance_facts_out_of_general_text():
    a, b = build_world(QUICK, seed=3), build_world(QUICK, seed=3)
    assert a == b and build_world(QUICK, seed=4) != a
    finance_entities = {f["entity"] for f in a["facts"] if f["domain"] == "finance" and f["relation"] != "meaning"}
    general_text = " ".join(a["general_text"])
    assert finance_entities and not any(entity in general_text for entity in finance_entities)
    assert len({f["relation"] for f in a["facts"] if f["domain"] == "general"}) >= 30
    chats = {c["entity"] for c in a["instruct_chats"]}
    assert not chats & {q["entity"] for q in a["general_questions"]}  # held-out general questions are about other entities
    # The split: every financial relation type is also stated about general-world entities, chatted about
    # for some of them and held out for others; the financial entities are never in a chat.
    finance_relations = {f["relation"] for f in a["facts"] if f["domain"] == "finance"}
    general_relations = {f["relation"] for f in a["facts"] if f["domain"] == "general"}
    assert finance_relations <= general_relations
    assert finance_relations <= {c["relation"] for c in a["instruct_chats"]}
    assert finance_relations <= {q["relation"] for q in a["general_questions"]}
    assert not chats & {f["entity"] for f in a["facts"] if f["domain"] == "finance"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    from finmerge.demo.pipeline import run_demo

    folder = tmp_path_factory.mktemp("quick") / "demo"
    return folder, run_demo(str(folder), quick=True, threads=1, log=lambda m: None)


@pytest.mark.slow
def test_quick_demo_report(quick_demo):
    from finmerge.demo.pipeline import run_demo

    folder, result = quick_demo
    report = json.load(open(result["paths"]["json"]))
    rows = report["results"]
    assert {"base", "instruct", "domain", "merged"} <= set(rows)
    assert any(label.startswith("sweep best") for label in rows)
    assert any(label.startswith("data-free choice") for label in rows)
    assert {"task_arithmetic", "ties"} <= set(rows)  # mergekit's own methods, named by method
    for metric in ("choice_accuracy", "answer_nll", "strict"):  # task arithmetic at 1/1 is the paper's merge
        assert rows["task_arithmetic"]["finance"][metric] == pytest.approx(rows["merged"]["finance"][metric], abs=1e-4)
    for label, row in rows.items():
        for column, (group, key) in REQUIRED.items():
            value = row[group][key]
            assert isinstance(value, float) and value == value, (label, column, value)
    overall = report["diagnostics"]["overall"]
    assert -1 <= overall["cos"] <= 1 and {m["module"] for m in report["diagnostics"]["by_module"]} >= {"q", "lm_head"}
    assert set(report["plots"]) == {"pretrain loss", "diagnostics heatmap", "sweep"}
    assert all(os.path.isfile(p) for p in report["plots"].values())
    markdown = open(result["paths"]["md"]).read()
    assert "| merged |" in markdown and "global cos" in markdown
    # The continual pretraining learned the financial text: held-out perplexity far below the base's.
    assert rows["domain"]["domain"]["perplexity"] < rows["base"]["domain"]["perplexity"] / 5

    messages = []
    again = run_demo(str(folder), quick=True, threads=1, log=messages.append)
    assert json.load(open(again["paths"]["json"]))["results"] == report["results"]
    skipped = {m.split("]")[0].strip("[") for m in messages if m.endswith("up to date, skipped")}
    assert skipped == {"world", "init", "base", "instruct", "split", "pretrain", "merge", "eval", "baselines", "sweep"}
    _check_demo_sections(report, markdown)


def _normalized(text):
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _check_demo_sections(report, markdown):
    """The per-relation breakdown, the variants and the targets: recomputed here from what the report holds."""
    demo, rows = report["demo"], report["results"]
    finance = demo["breakdown"]["finance_test"]
    chosen = {label for label in rows if label.startswith(("sweep best", "data-free choice"))}
    assert set(finance) == {"merged (1, 1)"} | chosen
    questions = sum(1 for _ in open(os.path.join(report["workdir"], "world", "finance_test.jsonl")))
    for label, part in finance.items():
        records = part["records"]
        assert len(records) == questions
        for r in records:  # each record's verdicts follow from its own answer
            assert r["hit"] == (_normalized(r["value"]) in _normalized(r["answer"]))
            assert r["strict"] == (r["hit"] and r["ended"])
        relations = {r["relation"] for r in records}
        assert set(part["by_relation"]) == relations | {"all"}
        for relation in relations:
            mine = [r for r in records if r["relation"] == relation]
            assert part["by_relation"][relation]["questions"] == len(mine)
            assert part["by_relation"][relation]["strict"] == pytest.approx(sum(r["strict"] for r in mine) / len(mine))
            line = next(line for line in markdown.splitlines() if line.startswith(f"| {relation} |"))
            assert f"{part['by_relation'][relation]['strict']:.3f}" in line
        # the breakdown is made of the evaluation's own answers: its totals are the table's
        row = rows["merged" if label == "merged (1, 1)" else label]["finance"]
        for key in ("strict", "accuracy", "ends_with_eos"):
            assert part["by_relation"]["all"][key] == pytest.approx(row[key]), (label, key)
    general = demo["breakdown"]["general_same_relations"]
    assert {r["relation"] for r in general["records"]} <= {r["relation"] for r in finance["merged (1, 1)"]["records"]}
    assert general["records"]

    points = demo["sweep_points"]
    assert len(points) == len(QUICK_SWEEP["variants"]) * len(QUICK_SWEEP["w_domain"]) * len(QUICK_SWEEP["w_instruct"])
    assert {p["variant"] for p in points} == set(QUICK_SWEEP["variants"])
    assert all(isinstance(p[k], float) for p in points for k in ("strict", "choice_accuracy", "ends_with_eos", "answer_nll"))
    assert "## Sweep variants (validation questions)" in markdown and markdown.count("| instruct_tokens |") == len(points) // len(QUICK_SWEEP["variants"])

    checks = demo["targets"]["merged"]
    merged, domain = rows["merged"]["finance"], rows["domain"]["finance"]
    assert checks["finance strict >= 0.30"] == {"value": merged["strict"], "met": merged["strict"] >= 0.30}
    assert checks["keeps >= 90% of the domain model's MC accuracy"]["value"] == pytest.approx(
        merged["choice_accuracy"] / domain["choice_accuracy"])
    assert checks["ends >= 90% of financial answers with the turn end"]["value"] == merged["ends_with_eos"]
    free = next(label for label in rows if label.startswith("data-free choice"))
    best = next(label for label in rows if label.startswith("sweep best"))
    against = demo["targets"][free]
    top = max(rows[m]["finance"]["strict"] for m in ("task_arithmetic", "ties"))
    assert against["finance strict above every mergekit baseline"] == {"value": top, "met": rows[free]["finance"]["strict"] > top}
    assert against["finance strict >= 90% of the label-chosen best's"]["met"] == (
        rows[free]["finance"]["strict"] >= 0.9 * rows[best]["finance"]["strict"])
    assert "## Targets for `data-free choice" in markdown


def _report(rows):
    return {"results": {label: {"finance": {"strict": v[0], "choice_accuracy": v[1], "ends_with_eos": v[2]}}
                        for label, v in rows.items()}}


def test_seeds_summary_is_mean_and_range_per_row():
    reports = {0: _report({"merged": (0.2, 0.9, 1.0), "sweep best (paper, w_d=1.0, w_i=1.5)": (0.3, 0.8, 1.0)}),
               1: _report({"merged": (0.4, 0.7, 0.5), "sweep best (instruct_head, w_d=1.5, w_i=1.0)": (0.1, 0.6, 0.9)})}
    summary = demo_seeds.summarize(reports)
    assert list(summary["rows"]) == ["merged", "sweep best"]
    merged = summary["rows"]["merged"]["finance strict"]
    assert merged["values"] == [0.2, 0.4] and merged["mean"] == pytest.approx(0.3) and (merged["min"], merged["max"]) == (0.2, 0.4)
    assert summary["rows"]["sweep best"]["chosen"] == ["paper, w_d=1.0, w_i=1.5", "instruct_head, w_d=1.5, w_i=1.0"]
    assert "| merged | 0.300 [0.200, 0.400] | 0.800 [0.700, 0.900] | 0.750 [0.500, 1.000] |" in demo_seeds.markdown(summary)


def test_training_budgets_report_the_claim_rows_and_the_best_mergekit_method(tmp_path):
    report = _report({"base": (0.0, 0.3, 0.0), "domain": (0.0, 0.74, 0.0), "merged": (0.05, 0.73, 1.0),
                      "task_arithmetic": (0.05, 0.73, 1.0), "ties": (0.0, 0.7, 0.0), "breadcrumbs": (0.06, 0.72, 1.0),
                      "sweep best (paper, w_d=1.0, w_i=1.0)": (0.05, 0.73, 1.0),
                      "data-free choice (instruct_tokens, w_d=1.5, w_i=1.0)": (0.02, 0.66, 1.0)})
    rows = demo_training.rows_of(report)
    assert list(rows) == ["domain", "merged", "sweep best (paper, w_d=1.0, w_i=1.0)",
                          "data-free choice (instruct_tokens, w_d=1.5, w_i=1.0)", "best mergekit method (breadcrumbs)"]
    assert rows["best mergekit method (breadcrumbs)"] == {"finance strict": 0.06, "finance MC acc": 0.72, "finance turn end": 1.0}
    with pytest.raises(SystemExit):  # an unknown budget is refused before anything runs
        demo_training.main(["--out", str(tmp_path / "out"), "--only", "no-such-budget"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_seeds_script_runs_the_real_command(quick_demo, tmp_path):
    """--quick, one world reused from the demo above (every stage skipped): the script's whole path."""
    folder, result = quick_demo
    summary = demo_seeds.main(["--quick", "--seeds", "0", "--folder", f"0={folder}", "--out", str(tmp_path)])
    report = json.load(open(result["paths"]["json"]))
    for label, row in report["results"].items():
        name = demo_seeds.row_name(label)
        assert summary["rows"][name]["finance strict"]["values"] == [row["finance"]["strict"]]
    with open(tmp_path / "seeds.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "seeds.json")) == json.loads(json.dumps(summary))
