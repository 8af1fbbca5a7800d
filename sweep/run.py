"""`finmerge sweep`: merge a recipe over a grid of (w_domain, w_instruct) and per-module variants,
evaluate every merge on held-out data, and report the best setting for one metric.

This goes beyond the paper (which uses 1/1). Choose the metric on a validation set that is not the
one you report. Every grid point is a recipe that plain `mergekit-yaml` runs.
"""

import copy
import json
import os
import shutil
import tempfile
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from finmerge.evaluation.metrics import chat_control_token_ids
from finmerge.evaluation.run import evaluate, without_answers
from finmerge.sweep import data_free
from finmerge.evaluation.settings import EvalSettings, Want
from finmerge.safety.errors import InputError
from finmerge.safety.outputs import atomic_write_files

# Variants, each expressed in the recipe itself so plain `mergekit-yaml` merges it:
# - paper: the two weights everywhere;
# - instruct_head: lm_head and the final norm take only the instruction vector (mergekit's filter
#   syntax on the domain weight: first matching filter wins);
# - instruct_tokens: the chat-control tokens' rows of the embedding and lm_head take only the
#   instruction vector (the method's `instruct_rows`), ids read from the instruct tokenizer.
FINAL_NORMS = ("model.norm.", "transformer.ln_f.")
DOMAIN_FILTERS = {"paper": None, "instruct_head": ["lm_head", *FINAL_NORMS], "instruct_tokens": None}
VARIANTS = tuple(DOMAIN_FILTERS)


class SweepError(InputError):
    """The sweep's settings cannot be used (unknown variant, no metric, a metric no grid point computes)."""


Numbers = Annotated[List[Union[int, float]], Field(min_length=1), Want("a non-empty list of numbers")]
Variants = Annotated[List[Literal[VARIANTS]], Field(min_length=1), Want(f"a non-empty list of: {', '.join(VARIANTS)}")]


class SweepGrid(BaseModel):
    """The grid and what "best" means; also the fields of a recipe's `finmerge.sweep:` section."""

    model_config = ConfigDict(extra="forbid")

    w_domain: Numbers = Field([0.5, 1.0, 1.5], description="Domain weights to try.")
    w_instruct: Numbers = Field([0.5, 1.0, 1.5], description="Instruct weights to try.")
    variants: Variants = Field(["paper"], description="paper (the weights everywhere), instruct_head (lm_head and the "
                               "final norm from the instruction vector only), instruct_tokens (the chat-control tokens' "
                               "rows from the instruction vector only).")
    # No default: what "best" means depends on the evaluation sets (e.g. "finance.strict" for a QA set "finance").
    metric: Annotated[Optional[str], Want("a string")] = Field(
        None, description="What picks the best point from labelled data: SET.KEY, e.g. `finance.strict`; more, "
                          "comma-separated, break ties; `-SET.KEY` is minimized. This and/or `prompts` is required.")
    prompts: Annotated[Optional[str], Want("a file path (string)")] = Field(
        None, description="User prompts without answers (.txt, one per line, or JSONL with `question`; any answer in "
                          "it is never read): with the held-out domain `text`, the sweep also makes the data-free "
                          "choice (no labelled data: turn ends on these prompts, bits/byte of the text).")


class SweepSettings(SweepGrid):
    eval: EvalSettings = Field(default_factory=EvalSettings)


def metric_value(result: Dict, metric: str) -> Optional[float]:
    value = result
    for key in metric.lstrip("-").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def ranking_key(result: Dict, metric: str) -> Optional[tuple]:
    """Larger is better: the metrics in order, minimized ones negated; None if the first is missing."""
    values = []
    for name in metric.split(","):
        value = metric_value(result, name.strip())
        if value is None and not values:
            return None
        values.append(float("-inf") if value is None else (-value if name.strip().startswith("-") else value))
    return tuple(values)


def instruct_tokenizer_path(recipe: Dict) -> str:
    for entry in recipe.get("models") or []:
        if (entry.get("parameters") or {}).get("role") == "instruct":
            return entry["model"]
    raise SweepError("the recipe has no model with parameters.role: instruct; the instruct_tokens variant "
                     "reads the chat-control tokens from that model's tokenizer")


def chat_control_rows(recipe: Dict, trust_remote_code: bool = False) -> str:
    """`instruct_rows` for the recipe: the chat-control token ids of its instruct model, "3,4,5"."""
    from transformers import AutoTokenizer

    path = instruct_tokenizer_path(recipe)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:
        raise SweepError(f"instruct model {path} has no chat template, so the instruct_tokens variant cannot tell "
                         "its chat-control tokens; drop that variant or give the model a chat template")
    ids = chat_control_token_ids(tokenizer)
    if not ids:
        raise SweepError(f"the chat template of instruct model {path} writes no special tokens; the "
                         "instruct_tokens variant has no rows to protect: drop that variant")
    return ",".join(str(i) for i in ids)


def variant_recipe(recipe: Dict, w_domain: float, w_instruct: float, variant: str,
                   instruct_rows: Optional[str] = None) -> Dict:
    """The recipe with the two weights replaced and the variant written into it (see DOMAIN_FILTERS).

    `instruct_tokens` needs `instruct_rows` (from `chat_control_rows`; computed here when not given).
    """
    if variant not in DOMAIN_FILTERS:
        raise SweepError(f"unknown sweep variant {variant!r}; known: {', '.join(VARIANTS)}")
    merged = copy.deepcopy(recipe)
    merged.pop("finmerge", None)
    for entry in merged["models"]:
        params = entry.setdefault("parameters", {})
        role = params.get("role")
        if role == "domain":
            filters = DOMAIN_FILTERS[variant]
            params["weight"] = [{"filter": f, "value": 0.0} for f in filters] + [{"value": w_domain}] if filters else w_domain
        elif role == "instruct":
            params["weight"] = w_instruct
    if variant == "instruct_tokens":
        merged.setdefault("parameters", {})["instruct_rows"] = instruct_rows or chat_control_rows(recipe)
    return merged


def _merge(recipe: Dict, out: str, evaluation: EvalSettings) -> None:
    """One grid point, merged the way `finmerge merge` merges (the flags of the sweep's own command line)."""
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from finmerge.plugins.run import MergeFlags, merge

    merge(MergeConfiguration.model_validate(recipe), out, MergeOptions(quiet=True, trust_remote_code=evaluation.trust_remote_code),
          MergeFlags(allow_pickle=evaluation.allow_pickle))


def _check(settings: SweepSettings) -> None:
    if not settings.metric and not settings.prompts:
        raise SweepError("nothing picks the best point: give --metric SET.KEY (labelled data, e.g. finance.strict for a "
                         "QA set named finance) and/or --prompts FILE with --text FILE (the data-free choice), or set "
                         "them in the recipe's finmerge.sweep")
    unknown = [v for v in settings.variants if v not in DOMAIN_FILTERS]
    if unknown:
        raise SweepError(f"unknown sweep variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    data_free.check_settings(settings.prompts, settings.eval.text, settings.eval.qa)


def run_sweep(recipe: Dict, settings: SweepSettings, workdir: str, log=print, keep_best: Optional[str] = None,
              keep_data_free: Optional[str] = None) -> Dict:
    """Evaluate every grid point; returns {"points", "best" (by the metric), "data_free" (with prompts)};
    `keep_best` / `keep_data_free` keep those merges there."""
    _check(settings)
    rows = chat_control_rows(recipe, settings.eval.trust_remote_code) if "instruct_tokens" in settings.variants else None
    os.makedirs(workdir, exist_ok=True)
    points, best, best_key, best_dir = [], None, None, None
    scratch = tempfile.mkdtemp(prefix=".sweep-", dir=workdir)
    try:
        evaluation, reference = settings.eval, None
        if settings.prompts:
            instruct = instruct_tokenizer_path(recipe)
            reference = data_free.instruct_reference(instruct, settings.prompts, evaluation,
                                                     os.path.join(scratch, "instruct-answers.jsonl"))
            log(f"sweep: the instruct model ends {reference['turn_end']:.3f} of its answers to {settings.prompts} with the turn end")
            evaluation = evaluation.model_copy(update={"qa": {**evaluation.qa, data_free.PROMPTS_SET: reference["file"]}})
        for variant in settings.variants:
            for w_d in settings.w_domain:
                for w_i in settings.w_instruct:
                    out = os.path.join(scratch, f"{variant}-{w_d}-{w_i}")
                    _merge(variant_recipe(recipe, w_d, w_i, variant, rows), out, settings.eval)
                    result = without_answers(evaluate({"merged": out}, evaluation)["merged"])
                    point = {"variant": variant, "w_domain": w_d, "w_instruct": w_i, "result": result}
                    message = f"sweep {variant} w_domain={w_d} w_instruct={w_i}:"
                    key = None
                    if settings.metric:
                        key = ranking_key(result, settings.metric)
                        point.update(metric=metric_value(result, settings.metric.split(",")[0].strip()),
                                     ranking=list(key) if key else None)
                        message += f" {settings.metric}={point['ranking']}"
                    if reference:
                        point["data_free"] = data_free.signals(result)
                        message += " " + " ".join(f"{k}={_short(v)}" for k, v in point["data_free"].items())
                    points.append(point)
                    log(message)
                    if key is not None and (best_key is None or key > best_key):
                        if best_dir:
                            shutil.rmtree(best_dir)
                        best, best_key, best_dir = point, key, out
                    else:
                        shutil.rmtree(out)
        if settings.metric and best is None:
            raise SweepError(f"metric {settings.metric!r} was not computed for any grid point; check the eval sets")
        free = data_free.rank(points, reference["turn_end"])[0] if reference else None
        if keep_best and best_dir:
            shutil.rmtree(keep_best, ignore_errors=True)
            # the data-free choice may be the same point: hard links make a second copy cost no disk
            shutil.copytree(best_dir, keep_best, copy_function=_link_or_copy)
        if keep_data_free and free:
            shutil.rmtree(keep_data_free, ignore_errors=True)
            if best is free:
                shutil.copytree(best_dir, keep_data_free, copy_function=_link_or_copy)
            else:  # its folder went when a better labelled point came: merged again, the same merge
                _merge(variant_recipe(recipe, free["w_domain"], free["w_instruct"], free["variant"], rows),
                       keep_data_free, settings.eval)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"metric": settings.metric, "points": points}
    for name, point in (("best", best), ("data_free", free)):
        if point is not None:
            result[name] = {**point, "recipe": variant_recipe(recipe, point["w_domain"], point["w_instruct"], point["variant"], rows)}
    if reference:
        result["data_free"].update(rule=data_free.rule_text(), instruct={k: reference[k] for k in ("turn_end", "prompts", "answered")})
    return result


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _short(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def shown_metrics(sweep: Dict) -> List[str]:
    """What the table and the heatmap show: the labelled metric(s), then the data-free signals."""
    names = [m.strip() for m in (sweep.get("metric") or "").split(",") if m.strip()]
    if sweep.get("data_free"):
        names += [data_free.KNOWLEDGE, data_free.TURN_END, data_free.CLOSENESS]
    return names


def _label(point: Dict) -> str:
    return f"{point['variant']}, w_domain={point['w_domain']}, w_instruct={point['w_instruct']}"


def _same(a: Optional[Dict], b: Dict) -> bool:
    return bool(a) and (a["variant"], a["w_domain"], a["w_instruct"]) == (b["variant"], b["w_domain"], b["w_instruct"])


def heatmap(sweep: Dict, path: str) -> None:
    """One panel per (metric, variant): the metric over w_domain (rows) × w_instruct (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m.lstrip("-") for m in shown_metrics(sweep)]
    variants = list(dict.fromkeys(p["variant"] for p in sweep["points"]))
    rows = sorted({p["w_domain"] for p in sweep["points"]})
    cols = sorted({p["w_instruct"] for p in sweep["points"]})
    fig, axes = plt.subplots(len(metrics), len(variants), figsize=(4.2 * len(variants), 3.4 * len(metrics)), squeeze=False)
    for m, metric in enumerate(metrics):
        values = [metric_value(p["result"], metric) for p in sweep["points"]]
        known = [v for v in values if v is not None] or [0.0]
        for ax, variant in zip(axes[m], variants):
            grid = [[float("nan")] * len(cols) for _ in rows]
            for p, value in zip(sweep["points"], values):
                if p["variant"] == variant and value is not None:
                    grid[rows.index(p["w_domain"])][cols.index(p["w_instruct"])] = value
            image = ax.imshow(grid, cmap="viridis", vmin=min(known), vmax=max(max(known), min(known) + 1e-9), origin="lower")
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(j, i, "n/a" if value != value else f"{value:.2f}", ha="center", va="center", color="w", fontsize=9)
            ax.set_xticks(range(len(cols)), [str(c) for c in cols])
            ax.set_yticks(range(len(rows)), [str(r) for r in rows])
            ax.set_xlabel("w_instruct")
            ax.set_ylabel("w_domain")
            ax.set_title(f"{metric} ({variant})", fontsize=10)
            fig.colorbar(image, ax=ax, shrink=0.8)
    titles = [f"{name}: {_label(sweep[key])}" for key, name in (("best", "best by metric"), ("data_free", "data-free"))
              if sweep.get(key)]
    fig.suptitle("weight sweep (" + "; ".join(titles) + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_markdown(sweep: Dict) -> str:
    names = shown_metrics(sweep)
    lines = [f"| variant | w_domain | w_instruct | {' | '.join(names)} | chosen |", "|---" * (4 + len(names)) + "|"]
    for p in sweep["points"]:
        marks = [name for key, name in (("best", "best by metric"), ("data_free", "data-free")) if _same(sweep.get(key), p)]
        values = [metric_value(p["result"], n) for n in names]
        cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {p['variant']} | {p['w_domain']} | {p['w_instruct']} | {' | '.join(cells)} | {', '.join(marks)} |")
    return "\n".join(lines)


def write_sweep(sweep: Dict, folder: str) -> Dict[str, str]:
    """sweep.json/.md/.png and a recipe per choice: best-recipe.yml (by the metric), data-free-recipe.yml."""
    import yaml

    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, "sweep.json"), "md": os.path.join(folder, "sweep.md"),
             "png": os.path.join(folder, "sweep.png")}
    recipes = {name: os.path.join(folder, file) for name, file in (("best", "best-recipe.yml"), ("data_free", "data-free-recipe.yml"))
               if sweep.get(name)}
    paths.update({"recipe" if name == "best" else "data_free_recipe": path for name, path in recipes.items()})
    # the results all or none (a full disk leaves the previous ones); the plot first, it is not the result
    heatmap(sweep, paths["png"])
    atomic_write_files({paths["md"]: sweep_markdown(sweep) + "\n",
                        **{path: yaml.safe_dump(sweep[name]["recipe"], sort_keys=False) for name, path in recipes.items()},
                        paths["json"]: json.dumps(sweep, indent=2)})
    return paths
