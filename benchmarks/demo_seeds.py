"""The demo's table over several worlds: mean and range per row, so that no claim rests on one seed.

Each seed is a whole `finmerge demo --seed N` (its own world, base, instruct, domain model, merges,
baselines and sweep), run as the command a user runs; reruns skip the stages already done.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0,1,2 --jobs 2 --out demo-seeds
    .venv/bin/python benchmarks/demo_seeds.py --quick --seeds 0,1,2 --out /tmp/seeds   # the small world (tests)

Writes OUT/seeds.json, OUT/seeds.md (the table) and OUT/seeds.png (rows × metrics with ranges).
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

# (column, where it is in a row of report.json's results)
METRICS = [("finance strict", ("finance", "strict")), ("finance MC acc", ("finance", "choice_accuracy")),
           ("finance turn end", ("finance", "ends_with_eos"))]
PREFIXES = ("sweep best", "data-free choice")  # rows whose label names the point chosen in that world


def row_name(label: str) -> str:
    """One name per row across worlds: the chosen point's weights go to the `chosen` column."""
    return next((prefix for prefix in PREFIXES if label.startswith(prefix)), label)


def _value(row: Dict, path) -> Optional[float]:
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def run_seed(seed: int, out: str, quick: bool, threads: int, folder: Optional[str] = None) -> str:
    folder = folder or os.path.join(out, f"seed-{seed}")
    command = [os.path.join(os.path.dirname(sys.executable), "finmerge"), "demo", "--out", folder, "--seed", str(seed),
               "--threads", str(threads)] + (["--quick"] if quick else [])
    with open(os.path.join(out, f"seed-{seed}.log"), "w", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise RuntimeError(f"finmerge demo --seed {seed} failed (exit {code}); see {log.name}")
    return os.path.join(folder, "report.json")


def summarize(reports: Dict[int, Dict]) -> Dict:
    """{"seeds": [...], "rows": {name: {metric: {"mean", "min", "max", "values"}, "chosen": [...]}}}, rows in
    the order of the first world's table."""
    rows: Dict[str, Dict] = {}
    for seed, report in sorted(reports.items()):
        for label, result in report["results"].items():
            row = rows.setdefault(row_name(label), {"chosen": [], **{m: {"values": []} for m, _ in METRICS}})
            if label != row_name(label):
                row["chosen"].append(label[len(row_name(label)):].strip(" ()"))
            for metric, path in METRICS:
                value = _value(result, path)
                if value is not None:
                    row[metric]["values"].append(value)
    for row in rows.values():
        for metric, _ in METRICS:
            values = row[metric]["values"]
            if values:
                row[metric].update(mean=sum(values) / len(values), min=min(values), max=max(values))
    return {"seeds": sorted(reports), "rows": rows}


def markdown(summary: Dict) -> str:
    lines = [f"Worlds (seeds): {', '.join(map(str, summary['seeds']))}. Mean [min, max] over the worlds; finance test "
             "questions.", "", "| row | " + " | ".join(m for m, _ in METRICS) + " | chosen per world |",
             "|---" * (len(METRICS) + 2) + "|"]
    for name, row in summary["rows"].items():
        cells = [f"{row[m]['mean']:.3f} [{row[m]['min']:.3f}, {row[m]['max']:.3f}]" if row[m]["values"] else "n/a"
                 for m, _ in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'; '.join(row['chosen'])} |")
    return "\n".join(lines)


def plot(summary: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["rows"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.5 * len(METRICS), 0.38 * len(names) + 1.6), sharey=True)
    for ax, (metric, _) in zip(axes, METRICS):
        for y, name in enumerate(names):
            cell = summary["rows"][name][metric]
            if not cell["values"]:
                continue
            ax.plot([cell["min"], cell["max"]], [y, y], color="0.6", linewidth=3)
            ax.scatter(cell["values"], [y] * len(cell["values"]), s=12, color="0.3", zorder=3)
            ax.scatter([cell["mean"]], [y], marker="D", color="C3", zorder=4)
        ax.set_title(metric)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"demo over {len(summary['seeds'])} worlds: each dot a world, diamond the mean, bar the range")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated world seeds (at least 3 for the README's table)")
    parser.add_argument("--out", default="demo-seeds")
    parser.add_argument("--quick", action="store_true", help="the small world (what the test suite runs)")
    parser.add_argument("--jobs", type=int, default=1, help="worlds run at once (each with --threads threads)")
    parser.add_argument("--folder", action="append", default=[], metavar="SEED=PATH",
                        help="run that seed's demo in PATH instead of OUT/seed-SEED, e.g. 0=demo-out to reuse `make demo`'s "
                             "finished stages (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per world (default: 2 // jobs, at least 1)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    threads = args.threads or max(1, 2 // args.jobs)
    folders = {int(seed): path for seed, path in (item.split("=", 1) for item in args.folder)}
    os.makedirs(args.out, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        paths = dict(zip(seeds, pool.map(lambda s: run_seed(s, args.out, args.quick, threads, folders.get(s)), seeds)))
    reports = {}
    for seed, path in paths.items():
        with open(path, encoding="utf-8") as handle:
            reports[seed] = json.load(handle)
    summary = summarize(reports)
    with open(os.path.join(args.out, "seeds.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    table = markdown(summary)
    with open(os.path.join(args.out, "seeds.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    plot(summary, os.path.join(args.out, "seeds.png"))
    print(table)
    return summary


if __name__ == "__main__":
    main()
