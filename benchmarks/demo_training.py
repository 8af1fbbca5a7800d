"""What less training does to the demo's table: the whole demo (one world, seed 0) with smaller training
budgets, to see whether `make demo` could be made shorter without changing what it shows.

    .venv/bin/python benchmarks/demo_training.py --out demo-training --threads 1 --jobs 2
    .venv/bin/python benchmarks/demo_training.py --out demo-training --only fewer-steps

Each budget runs in OUT/NAME (a rerun skips the stages already done) and the script prints, per budget,
the seconds the demo took and the rows that carry its claims. The shipped budget is `make demo` itself
(compare with its demo-out/report.json; it is not rerun here).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict

from finmerge.demo.family import FamilySettings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo_seeds import METRICS, PREFIXES, _value  # noqa: E402  (the columns and chosen-row labels of the seeds table)

# name: (family settings changed, the recipe's pretrain fields changed (the domain model's CPT))
BUDGETS = {
    "fewer-steps": ({"base_steps": 400, "instruct_steps": 100}, {"max_steps": 200}),
    "shorter-blocks": ({"seq_len": 64, "base_steps": 600, "instruct_steps": 100}, {"seq_len": 64, "max_steps": 300}),
}
ROWS = ("domain", "merged")


def run_budget(name: str, out: str, threads: int) -> None:
    """One budget's demo, in this process (the demo's merges hold a process-wide context: one at a time)."""
    from finmerge.demo.pipeline import run_demo

    family, pretrain = BUDGETS[name]
    pretrain = {**pretrain, "save_steps": max(pretrain["max_steps"] // 2, 1)}
    with open(os.path.join(out, f"{name}.log"), "w", encoding="utf-8") as log:
        run_demo(os.path.join(out, name), threads=threads, family=dataclasses.replace(FamilySettings(), **family),
                 pretrain=pretrain, log=lambda line: print(line, file=log, flush=True))


def run_child(name: str, out: str, threads: int) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--out", out, "--threads", str(threads), "--run-one", name]
    if subprocess.run(command).returncode != 0:
        raise RuntimeError(f"budget {name} failed; see {os.path.join(out, name + '.log')}")
    with open(os.path.join(out, name, "report.json"), encoding="utf-8") as handle:
        return json.load(handle)


def rows_of(report: Dict) -> Dict[str, Dict]:
    """domain, merged, the two chosen merges and the best of mergekit's methods (by finance strict)."""
    from finmerge.demo.pipeline import demo_recipe

    results = report["results"]
    values = {label: {metric: _value(row, path) for metric, path in METRICS} for label, row in results.items()}
    baselines = [label for label in demo_recipe(False)["finmerge"]["baselines"] if label in values]
    best = max(baselines, key=lambda label: values[label]["finance strict"])
    rows = {label: values[label] for label in results if label in ROWS or label.startswith(PREFIXES)}
    rows[f"best mergekit method ({best})"] = values[best]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", help="comma-separated budget names (default: all): " + ", ".join(BUDGETS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per demo")
    parser.add_argument("--jobs", type=int, default=1, help="budgets run at once (each in its own process)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        return run_budget(args.run_one, args.out, args.threads)
    names = args.only.split(",") if args.only else list(BUDGETS)
    unknown = sorted(set(names) - set(BUDGETS))
    if unknown:
        parser.error(f"unknown budget(s) {', '.join(unknown)}; known: {', '.join(BUDGETS)}")
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        reports = dict(zip(names, pool.map(lambda n: run_child(n, args.out, args.threads), names)))
    summary = {name: {"family": BUDGETS[name][0], "pretrain": BUDGETS[name][1],
                      "seconds": report["demo"]["seconds"], "rows": rows_of(report)} for name, report in reports.items()}
    with open(os.path.join(args.out, "training.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    for name, entry in summary.items():
        print(f"## {name}: {entry['family']} / domain CPT {entry['pretrain']} ({entry['seconds']} s)")
        print("| row | " + " | ".join(m for m, _ in METRICS) + " |")
        print("|---" * (len(METRICS) + 1) + "|")
        for label, values in entry["rows"].items():
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values.values()) + " |")


if __name__ == "__main__":
    main()
