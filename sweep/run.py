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

from finmerge.evaluation.run import evaluate
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
        None, description="What picks the best point: SET.KEY, e.g. `finance.strict`; more, comma-separated, break "
                          "ties; `-SET.KEY` is minimized. Required for the sweep.")


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


def chat_control_token_ids(tokenizer) -> List[int]:
    """The instruct tokenizer's special tokens that its chat template writes around a user and an
    assistant turn (e.g. `<|user|>`, `<|assistant|>`, `<|end|>`): the rows `instruct_tokens` protects."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=False)
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    return sorted(special.intersection(tokenizer(rendered, add_special_tokens=False)["input_ids"]))


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


def run_sweep(recipe: Dict, settings: SweepSettings, workdir: str, log=print, keep_best: Optional[str] = None) -> Dict:
    """Evaluate every grid point; returns {"points": [...], "best": {...}}; `keep_best` keeps the best merge there."""
    if not settings.metric:
        raise SweepError("no sweep metric: give --metric SET.KEY (or finmerge.sweep.metric in the recipe), "
                         "e.g. finance.strict for a QA set named finance")
    unknown = [v for v in settings.variants if v not in DOMAIN_FILTERS]
    if unknown:
        raise SweepError(f"unknown sweep variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    rows = chat_control_rows(recipe, settings.eval.trust_remote_code) if "instruct_tokens" in settings.variants else None
    os.makedirs(workdir, exist_ok=True)
    points, best, best_dir = [], None, None
    scratch = tempfile.mkdtemp(prefix=".sweep-", dir=workdir)
    try:
        for variant in settings.variants:
            for w_d in settings.w_domain:
                for w_i in settings.w_instruct:
                    out = os.path.join(scratch, f"{variant}-{w_d}-{w_i}")
                    _merge(variant_recipe(recipe, w_d, w_i, variant, rows), out, settings.eval)
                    result = evaluate({"merged": out}, settings.eval)["merged"]
                    key = ranking_key(result, settings.metric)
                    point = {"variant": variant, "w_domain": w_d, "w_instruct": w_i, "result": result,
                             "metric": metric_value(result, settings.metric.split(",")[0].strip()),
                             "ranking": list(key) if key else None}
                    points.append(point)
                    log(f"sweep {variant} w_domain={w_d} w_instruct={w_i}: {settings.metric}={point['ranking']}")
                    if key is not None and (best is None or key > tuple(best["ranking"])):
                        if best_dir:
                            shutil.rmtree(best_dir)
                        best, best_dir = point, out
                    else:
                        shutil.rmtree(out)
        if best is None:
            raise SweepError(f"metric {settings.metric!r} was not computed for any grid point; check the eval sets")
        if keep_best:
            shutil.rmtree(keep_best, ignore_errors=True)
            os.rename(best_dir, keep_best)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {**best, "recipe": variant_recipe(recipe, best["w_domain"], best["w_instruct"], best["variant"], rows)}
    return {"metric": settings.metric, "points": points, "best": best}


def heatmap(sweep: Dict, path: str) -> None:
    """One panel per (metric, variant): the metric over w_domain (rows) × w_instruct (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m.strip().lstrip("-") for m in sweep["metric"].split(",")]
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
    best = sweep["best"]
    fig.suptitle(f"weight sweep (best: {best['variant']}, w_domain={best['w_domain']}, w_instruct={best['w_instruct']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep_markdown(sweep: Dict) -> str:
    names = [m.strip() for m in sweep["metric"].split(",")]
    lines = [f"| variant | w_domain | w_instruct | {' | '.join(names)} |", "|---" * (3 + len(names)) + "|"]
    for p in sweep["points"]:
        mark = " **best**" if (p["variant"], p["w_domain"], p["w_instruct"]) == (sweep["best"]["variant"], sweep["best"]["w_domain"], sweep["best"]["w_instruct"]) else ""
        values = [metric_value(p["result"], n) for n in names]
        cells = ["n/a" if v is None else f"{v:.3f}" for v in values]
        lines.append(f"| {p['variant']} | {p['w_domain']} | {p['w_instruct']} | {' | '.join(cells)}{mark} |")
    return "\n".join(lines)


def write_sweep(sweep: Dict, folder: str) -> Dict[str, str]:
    import yaml

    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, "sweep.json"), "md": os.path.join(folder, "sweep.md"),
             "png": os.path.join(folder, "sweep.png"), "recipe": os.path.join(folder, "best-recipe.yml")}
    # the results all or none (a full disk leaves the previous ones); the plot first, it is not the result
    heatmap(sweep, paths["png"])
    atomic_write_files({paths["md"]: sweep_markdown(sweep) + "\n",
                        paths["recipe"]: yaml.safe_dump(sweep["best"]["recipe"], sort_keys=False),
                        paths["json"]: json.dumps(sweep, indent=2)})
    return paths
