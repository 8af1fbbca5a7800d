"""A merge rule from the diagnostics, measured on finished demo worlds: where τ_d and τ_i align, remove
τ_d's component along τ_i so the shared direction is not added twice.

For a tensor with cos(τ_d, τ_i) above `--threshold`, base + w_d·(τ_d − c·τ_i) + w_i·τ_i with
c = ⟨τ_d, τ_i⟩ / ‖τ_i‖² is base + w_d·τ_d + (w_i − w_d·c)·τ_i: a plain mergekit recipe whose instruct
weight has one filter per aligned tensor. c comes from the per-tensor sums the (1, 1) merge already
wrote into its diagnostics.json, so the rule needs no data and no second read of the models.

    .venv/bin/python benchmarks/projection_rule.py demo-out [more demo folders...] --threshold 0.1

For each folder: merges the projected recipe with plain mergekit-yaml at the (1, 1) weights and at the
data-free choice's weights and variant, evaluates both on the demo's reported data, and prints them
beside the rows they modify. Results go to FOLDER/projection/.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
from typing import Dict, List

import yaml


def aligned_tensors(diagnostics: Dict, threshold: float) -> Dict[str, float]:
    """{tensor name: c = ⟨τ_d, τ_i⟩ / ‖τ_i‖²} for the tensors with cos(τ_d, τ_i) > threshold."""
    out = {}
    for tensor in diagnostics["tensors"]:
        sums = tensor.get("sums") or {}
        if tensor.get("cos") is not None and tensor["cos"] > threshold and sums.get("sq_instruct"):
            out[tensor["name"]] = sums["dot"] / sums["sq_instruct"]
    return out


def projected(recipe: Dict, coefficients: Dict[str, float]) -> Dict:
    """The recipe with the instruct weight lowered by w_d·c on each aligned tensor (exact names as filters)."""
    merged = copy.deepcopy(recipe)
    merged.pop("finmerge", None)
    weights = {(m.get("parameters") or {}).get("role"): m for m in merged["models"]}
    w_d = weights["domain"]["parameters"]["weight"]
    if isinstance(w_d, list):  # a variant's filtered domain weight: its default (last) value
        w_d = w_d[-1]["value"]
    w_i = weights["instruct"]["parameters"]["weight"]
    weights["instruct"]["parameters"]["weight"] = [
        {"filter": name, "value": round(w_i - w_d * c, 6)} for name, c in sorted(coefficients.items())] + [{"value": w_i}]
    return merged


def _run(command: List[str], cwd: str) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def measure(folder: str, threshold: float) -> Dict:
    folder = os.path.abspath(folder)
    with open(os.path.join(folder, "merged", "diagnostics.json"), encoding="utf-8") as handle:
        coefficients = aligned_tensors(json.load(handle), threshold)
    with open(os.path.join(folder, "report.json"), encoding="utf-8") as handle:
        report = json.load(handle)
    with open(os.path.join(folder, "sweep", "sweep.json"), encoding="utf-8") as handle:
        choice = json.load(handle)["data_free"]
    with open(os.path.join(folder, "recipe.yml"), encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    out = os.path.join(folder, "projection")
    os.makedirs(out, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    with open(os.path.join(folder, ".stages", "merge-recipe.yml"), encoding="utf-8") as handle:
        paper = yaml.safe_load(handle)  # the (1, 1) merge as the merge stage ran it (absolute paths)
    points = {"(1, 1) projected": paper,
              f"data-free choice projected ({choice['variant']}, {choice['w_domain']}, {choice['w_instruct']})": choice["recipe"]}
    models = {}
    for index, (label, point) in enumerate(points.items()):
        path = os.path.join(out, f"recipe-{index}.yml")
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(projected(point, coefficients), handle, sort_keys=False)
        target = os.path.join(out, f"merge-{index}")
        _run([os.path.join(bin_dir, "mergekit-yaml"), path, target, "--quiet"], cwd=folder)
        models[label] = target
    evaluation = recipe["finmerge"]["eval"]
    command = [os.path.join(bin_dir, "finmerge"), "eval", *models.values(), "--text", evaluation["text"],
               "--max-new-tokens", str(evaluation["max_new_tokens"]), "--turn-end", evaluation["turn_end"],
               "--out", os.path.join(out, "eval.json")]
    for name, qa in evaluation["qa"].items():
        command += ["--qa", f"{name}={qa}"]
    _run(command, cwd=folder)
    with open(os.path.join(out, "eval.json"), encoding="utf-8") as handle:
        results = dict(zip(points, json.load(handle).values()))
    rows = {label: report["results"][label] for label in report["results"]
            if label == "merged" or label.startswith("data-free choice")}
    return {"folder": folder, "aligned": coefficients, "rows": {**rows, **results}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="finished `finmerge demo` folders")
    parser.add_argument("--threshold", type=float, default=0.1, help="cos(τ_d, τ_i) above which a tensor is projected")
    args = parser.parse_args(argv)
    print("| world | row | finance strict | finance MC acc | finance turn end | general strict | plain bits/byte |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.folders:
        found = measure(folder, args.threshold)
        with open(os.path.join(folder, "projection", "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(found, handle, indent=2)
        for label, row in found["rows"].items():
            f, g = row["finance"], row.get("general") or {}
            print(f"| {os.path.basename(folder)} | {label} | {f['strict']:.3f} | {f['choice_accuracy']:.3f} | "
                  f"{f['ends_with_eos']:.3f} | {g.get('strict', float('nan')):.3f} | "
                  f"{row['domain'].get('plain_bits_per_byte', float('nan')):.4f} |")
        print(f"<!-- {folder}: {len(found['aligned'])} tensors projected -->")


if __name__ == "__main__":
    main()
