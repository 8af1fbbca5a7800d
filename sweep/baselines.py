"""The merges a practitioner tries first: mergekit's own methods on the same base, domain and instruct.

Each baseline is a plain mergekit recipe (no finmerge method, no finmerge parameter), so
`mergekit-yaml` runs it as it is, at the settings mergekit's documentation and the methods' papers
suggest; task arithmetic at weights 1/1 is the paper's own merge through mergekit. A randomized
method (DARE) is seeded with mergekit's `--random-seed` by whoever runs it.
"""

import copy
from typing import Any, Dict, Optional

from finmerge.safety.errors import InputError

# method -> (parameters of each of the two models beside `weight: 1.0`, top-level parameters)
BASELINES: Dict[str, Dict[str, Dict[str, Any]]] = {
    "task_arithmetic": {"model": {}, "top": {}},
    "ties": {"model": {"density": 0.5}, "top": {}},
    "dare_ties": {"model": {"density": 0.5}, "top": {}},
    "della": {"model": {"density": 0.5, "epsilon": 0.1}, "top": {}},
    "breadcrumbs": {"model": {"density": 0.9, "gamma": 0.01}, "top": {}},
    "model_stock": {"model": None, "top": {}},  # no per-model weights: the ratio comes from the angle
    "sce": {"model": None, "top": {"select_topk": 0.1}},
}


class BaselineError(InputError):
    """A baseline that cannot be built from the recipe."""


def baseline_recipe(recipe: Dict[str, Any], method: str, dtype: Optional[str] = None) -> Dict[str, Any]:
    """The `domain_instruct` recipe's three models merged by mergekit's `method` instead."""
    if method not in BASELINES:
        raise BaselineError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    roles = {}
    for entry in recipe.get("models") or []:
        role = (entry.get("parameters") or {}).get("role")
        if role in ("domain", "instruct"):
            roles[role] = entry["model"]
    if set(roles) != {"domain", "instruct"} or not recipe.get("base_model"):
        raise BaselineError("a baseline needs the recipe's base_model and its two models with role: domain and "
                            "role: instruct")
    settings = BASELINES[method]
    per_model = None if settings["model"] is None else {"weight": 1.0, **settings["model"]}
    merged: Dict[str, Any] = {
        "merge_method": method,
        "base_model": recipe["base_model"],
        "models": [{"model": roles[r], **({"parameters": dict(per_model)} if per_model else {})}
                   for r in ("domain", "instruct")],
        "dtype": dtype or recipe.get("dtype") or "float32",
    }
    if settings["top"]:
        merged["parameters"] = copy.deepcopy(settings["top"])
    for key in ("tokenizer_source", "tokenizer", "chat_template", "out_dtype"):
        if key in recipe:
            merged[key] = copy.deepcopy(recipe[key])
    if "tokenizer_source" not in merged and "tokenizer" not in merged:
        # a chat model needs the instruct model's tokenizer and chat template (mergekit's default is the base's,
        # which has none), as domain_instruct writes them
        merged["tokenizer_source"] = roles["instruct"]
    return merged
