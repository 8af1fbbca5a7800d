"""`finmerge demo --quick`: the embedded default's whole path on a smaller world; every number in
the report was computed by the run, and a rerun skips every stage."""

import json
import os

import pytest

from finmerge.demo.world import QUICK, build_world

REQUIRED = {  # the columns: where each lives in a row of the report
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


@pytest.mark.slow
def test_quick_demo_report(tmp_path):
    from finmerge.demo.pipeline import run_demo

    result = run_demo(str(tmp_path / "demo"), quick=True, threads=1, log=lambda m: None)
    report = json.load(open(result["paths"]["json"]))
    rows = report["results"]
    assert {"base", "instruct", "domain", "merged"} <= set(rows)
    assert any(label.startswith("sweep best") for label in rows)
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
    again = run_demo(str(tmp_path / "demo"), quick=True, threads=1, log=messages.append)
    assert json.load(open(again["paths"]["json"]))["results"] == report["results"]
    skipped = {m.split("]")[0].strip("[") for m in messages if m.endswith("up to date, skipped")}
    assert skipped == {"world", "init", "base", "instruct", "pretrain", "merge", "eval", "sweep"}
