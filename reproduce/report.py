"""One report for a reproduction: the evaluation table (with the sweep's best merge), the
independence diagnostics and the pretraining summary, as report.md + report.json, linking the plots."""

import json
import os
from typing import Any, Dict, List, Optional

from finmerge.evaluation.run import markdown_table, without_answers
from finmerge.reproduce.recipe import Reproduction
from finmerge.safety.outputs import atomic_write_files, json_text


def _load(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def collect(repro: Reproduction, flags: Optional[Dict[str, bool]] = None) -> Dict[str, Any]:
    """Everything the stages left in the workdir, as one dictionary (what report.json holds).

    `flags`: the command-line flags the run was given (trust_remote_code, allow_pickle)."""
    rows = _load(os.path.join(repro.workdir, "eval.json")) or {}
    sweep = _load(os.path.join(repro.workdir, "sweep", "sweep.json"))
    best_eval = _load(os.path.join(repro.workdir, "sweep", "best_eval.json"))
    rows.update(_load(os.path.join(repro.baselines_dir, "baselines.json")) or {})
    for name, label in (("best", "sweep best"), ("data_free", "data-free choice")):
        point = (sweep or {}).get(name)
        if point and name in (best_eval or {}):
            rows[f"{label} ({point['variant']}, w_d={point['w_domain']}, w_i={point['w_instruct']})"] = best_eval[name]
    diagnostics = _load(os.path.join(repro.output, "diagnostics.json"))
    pretrain = _load(os.path.join(repro.model("domain"), "training_summary.json")) if "pretrain" in repro.stages else None
    plots = {name: path for name, path in {
        "pretrain loss": os.path.join(repro.model("domain"), "loss_curve.png"),
        "diagnostics heatmap": os.path.join(repro.output, (diagnostics or {}).get("heatmap") or "diagnostics.svg"),
        "sweep": os.path.join(repro.workdir, "sweep", "sweep.png"),
    }.items() if os.path.isfile(path)}
    rows = {label: without_answers(result) for label, result in rows.items()}  # eval.json keeps every answer
    return {
        "recipe": repro.path, "workdir": repro.workdir, "merged": repro.output, "stages": repro.stages,
        "flags": {"trust_remote_code": False, "allow_pickle": False, **(flags or {})},
        "models": {r: repro.model(r) for r in ("base", "domain", "instruct")},
        "results": rows,
        "sweep": {k: sweep.get(k) for k in ("metric", "best", "data_free")} if sweep else None,
        "baselines": repro.baselines,
        "diagnostics": {k: diagnostics.get(k) for k in ("verdict", "overall", "by_module")} if diagnostics else None,
        "pretrain": {k: pretrain.get(k) for k in ("steps", "tokens_seen", "train_loss", "heldout_before", "heldout_after", "data")
                     if k in pretrain} if pretrain else None,
        "plots": plots,
    }


def _samples(results: Dict[str, Any], per_set: int = 2) -> List[str]:
    rows = []
    for label, result in results.items():
        for name, scores in result.items():
            if isinstance(scores, dict) and scores.get("samples"):
                for sample in scores["samples"][:per_set]:
                    cells = [label, name, sample["question"], sample["reference"], sample["answer"].strip() or "(empty)",
                             "yes" if sample["ended"] else "no"]
                    rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return rows


def _cos_column(report: Dict[str, Any]):
    cos = (report.get("diagnostics") or {}).get("overall", {}).get("cos")
    # τ_d and τ_i do not depend on the merge weights: every merged row has the same cosine.
    return [(("__cos__",), "global cos(τ_d, τ_i)", "{:.3f}")], cos


def render(report: Dict[str, Any], title: str = "finmerge reproduction") -> str:
    columns, cos = _cos_column(report)
    rows = {label: {**r, "__cos__": cos if label not in ("base", "domain", "instruct") else None}
            for label, r in report["results"].items()}
    flags = report.get("flags") or {}
    given = [f"--{name.replace('_', '-')}" for name, on in flags.items() if on]
    lines = [f"# {title}", "", f"Recipe: `{report['recipe']}`  ", f"Merged model: `{report['merged']}`  ",
             "Command-line flags: " + (", ".join(f"`{g}`" for g in given) if given else
                                       "none (no model code run, no pickled weights read)"), ""]
    if rows:
        lines += ["## Evaluation", "", markdown_table(rows, columns), ""]
    diagnostics = report.get("diagnostics")
    if diagnostics:
        lines += ["## Independence of the task vectors", "", f"**{diagnostics['verdict']}**", "",
                  "| module | cos(τ_d, τ_i) | random ±1σ | ‖τ_d‖/‖θ‖ | ‖τ_i‖/‖θ‖ |", "|---|---|---|---|---|"]
        for m in diagnostics["by_module"]:
            lines.append(f"| {m['module']} | {_fmt(m['cos'])} | {_fmt(m['random_cos_std'], '.4f')} | "
                         f"{_fmt(m['rel_domain'], '.4f')} | {_fmt(m['rel_instruct'], '.4f')} |")
        lines.append("")
    sweep = report.get("sweep") or {}
    if sweep.get("best") or sweep.get("data_free"):
        lines += ["## Weight sweep", ""]
        best, free = sweep.get("best"), sweep.get("data_free")
        if best:
            lines += [f"Best by `{sweep['metric']}` on the sweep's own labelled (validation) data: variant "
                      f"`{best['variant']}`, w_domain={best['w_domain']}, w_instruct={best['w_instruct']} "
                      f"({_fmt(best['metric'])}). Its numbers on the reported data are the `sweep best` row above.", ""]
        if free:
            lines += [f"Data-free choice (no labelled answer read): variant `{free['variant']}`, "
                      f"w_domain={free['w_domain']}, w_instruct={free['w_instruct']}, by the rule: {free['rule']}. "
                      f"The instruct model ends {_fmt(free['instruct']['turn_end'])} of its answers to the "
                      f"{free['instruct']['prompts']} prompts. Its numbers are the `data-free choice` row above.", ""]
    if report.get("baselines"):
        lines += [f"Baselines: mergekit's own methods ({', '.join(report['baselines'])}) on the same three models at "
                  "their documented defaults, by plain `mergekit-multi`; each row is named by its method.", ""]
    samples = _samples(report["results"])
    if samples:
        lines += ["## Sample greedy answers", "", "| model | set | question | expected | answer | ended the turn |", "|---|---|---|---|---|---|"]
        lines += samples + [""]
    if report.get("pretrain"):
        p = report["pretrain"]
        before, after = (p.get(k) or {} for k in ("heldout_before", "heldout_after"))
        lines += ["## Continual pretraining", "",
                  f"{p.get('steps')} steps, {p.get('tokens_seen')} tokens seen; held-out perplexity of the domain text "
                  f"{_fmt(before.get('perplexity'), '.2f')} (base) -> {_fmt(after.get('perplexity'), '.2f')} (domain). "
                  "Data report: report.json, `pretrain.data`.", ""]
    if report["plots"]:
        lines += ["## Plots", ""]
        for name, path in report["plots"].items():
            lines.append(f"![{name}]({os.path.relpath(path, report['workdir'])})")
        lines.append("")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], title: str = "finmerge reproduction") -> Dict[str, str]:
    paths = {"md": os.path.join(report["workdir"], "report.md"), "json": os.path.join(report["workdir"], "report.json")}
    atomic_write_files({paths["md"]: render(report, title), paths["json"]: json_text(report, sort_keys=False)})
    return paths
