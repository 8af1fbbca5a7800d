"""Run the early-error paths of the merge commands many times and count how each process ended.

An input with a NaN in one tensor makes `mergekit-yaml`, `finmerge merge` and `finmerge diagnose`
stop mid-run with a clean error (exit status 1). A process that ends any other way (SIGABRT from a
thread torn down at exit, a traceback, status 0) is counted and its stderr kept. Not part of
`make test`: each run is a fresh interpreter (~5-8 s here), so 200 runs per command take a while.

    .venv/bin/python benchmarks/stress_early_errors.py [--runs 200] [--jobs 2] [--commands mergekit-yaml,merge,diagnose]

Prints one line per command (`mergekit-yaml: 200 runs, exit 1: 200`) and a total; exits 1 if any
run ended otherwise, with the first few unexpected outputs saved beside the JSON summary.
"""

import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile

from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
BAD_TENSOR = "model.layers.1.self_attn.o_proj.weight"


def build_inputs(root: str) -> dict:
    """A tiny base/domain/instruct triplet whose domain model has one NaN, and the recipe merging it."""
    from safetensors.torch import load_file, save_file

    from finmerge.demo.tiny_models import build_tiny_family, recipe

    family = build_tiny_family(os.path.join(root, "family"))
    nan_domain = os.path.join(root, "nan-domain")
    shutil.copytree(family.domain, nan_domain)
    weights = os.path.join(nan_domain, "model.safetensors")
    state = load_file(weights)
    state[BAD_TENSOR][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    merge = recipe(family)
    merge["models"][0]["model"] = nan_domain
    recipe_path = os.path.join(root, "recipe.yml")
    with open(recipe_path, "w", encoding="utf-8") as handle:
        json.dump(merge, handle)
    return {"recipe": recipe_path, "base": family.base, "domain": nan_domain, "instruct": family.instruct}


def command_line(name: str, inputs: dict, out: str) -> list:
    if name == "mergekit-yaml":
        return [os.path.join(BIN, "mergekit-yaml"), inputs["recipe"], out]
    if name == "merge":
        return [os.path.join(BIN, "finmerge"), "merge", inputs["recipe"], out]
    if name == "diagnose":
        return [os.path.join(BIN, "finmerge"), "diagnose", "--base", inputs["base"], "--domain", inputs["domain"],
                "--instruct", inputs["instruct"], "--out", out, "--quiet"]
    raise SystemExit(f"unknown command {name!r}: choose mergekit-yaml, merge or diagnose")


def one_run(name: str, inputs: dict, root: str, index: int):
    out = os.path.join(root, f"out-{name}-{index}")
    result = subprocess.run(command_line(name, inputs, out), capture_output=True, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    clean = result.returncode == 1 and "NaN or Inf" in result.stderr and "Traceback" not in result.stderr \
        and not os.path.exists(out)
    shutil.rmtree(out, ignore_errors=True)
    return name, result.returncode, clean, result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs per command")
    parser.add_argument("--jobs", type=int, default=2, help="processes at a time")
    parser.add_argument("--commands", default="mergekit-yaml,merge,diagnose")
    parser.add_argument("--json", default=None, help="where to write the summary (default: print only)")
    args = parser.parse_args()
    names = [n.strip() for n in args.commands.split(",") if n.strip()]
    root = tempfile.mkdtemp(prefix="finmerge-stress-")
    try:
        inputs = build_inputs(root)
        for name in names:
            command_line(name, inputs, "check")  # unknown names fail before any run
        statuses = {name: collections.Counter() for name in names}
        unexpected = []
        jobs = [(name, i) for i in range(args.runs) for name in names]  # interleaved: load hits all alike
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="runs") as bar:
            for name, status, clean, stderr in pool.map(lambda job: one_run(job[0], inputs, root, job[1]), jobs):
                statuses[name][status if clean or status != 1 else "1 (unclean)"] += 1
                if not clean:
                    unexpected.append({"command": name, "status": status, "stderr": stderr[-4000:]})
                bar.update()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = {name: dict(sorted((str(k), v) for k, v in counts.items())) for name, counts in statuses.items()}
    for name, counts in summary.items():
        print(f"{name}: {args.runs} runs, " + ", ".join(f"exit {k}: {v}" for k, v in counts.items()))
    aborts = sum(v for counts in statuses.values() for k, v in counts.items() if k in (-6, 134))
    print(f"total: {len(names) * args.runs} runs, {aborts} aborts, {len(unexpected)} not a clean exit 1")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"runs_per_command": args.runs, "statuses": summary, "aborts": aborts,
                       "unexpected": unexpected[:5]}, handle, indent=2)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
