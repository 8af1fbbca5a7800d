"""A reproduction recipe: a mergekit recipe plus an optional `finmerge:` section that mergekit ignores.

    merge_method: domain_instruct          # the merge, exactly as `mergekit-yaml RECIPE OUT` reads it
    base_model: ./models/base
    models:
      - model: ./models/domain             # produced by the pretrain stage when there is one
        parameters: {role: domain}
      - model: ./models/instruct
        parameters: {role: instruct}
    finmerge:
      workdir: .                           # relative paths in the whole recipe are read from here
      output: ./merged                     # the merged model (default: <workdir>/merged)
      stages: [pretrain, merge, eval, sweep]
      pretrain: {data: [./corpus/finance.txt], max_steps: 400, ...}   # `finmerge pretrain` fields
      eval: {text: held.txt, qa: {finance: fin.jsonl, general: gen.jsonl}, max_new_tokens: 32}
      sweep: {w_domain: [0.5, 1, 1.5], w_instruct: [0.5, 1, 1.5], variants: [paper], metric: finance.strict,
              qa: {finance: fin-val.jsonl}}

`workdir` defaults to the recipe's folder; `mergekit-yaml` reads relative paths from the current
folder, so run it from the workdir to merge the same models.
"""

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

STAGES = ("pretrain", "merge", "eval", "sweep")
SECTION_KEYS = {"workdir", "output", "stages", "pretrain", "eval", "sweep"}
EVAL_KEYS = {"text", "qa", "max_len", "max_new_tokens", "batch_size", "generate", "turn_end"}
SWEEP_KEYS = {"w_domain", "w_instruct", "variants", "metric", "text", "qa"}


class ReproductionError(ValueError):
    """The reproduction recipe cannot run as written; the message names the recipe and field."""


@dataclass
class Reproduction:
    path: str
    workdir: str
    merge: Dict[str, Any]  # the mergekit recipe with absolute paths
    output: str
    stages: List[str]
    pretrain: Optional[Dict[str, Any]] = None
    eval: Dict[str, Any] = field(default_factory=dict)
    sweep: Optional[Dict[str, Any]] = None

    def model(self, role: str) -> str:
        if role == "base":
            return self.merge["base_model"]
        return next(m["model"] for m in self.merge["models"] if (m.get("parameters") or {}).get("role") == role)


def _absolute(path: str, workdir: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(workdir, path))


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.count("/") != 1


def load_reproduction(path: str, workdir: Optional[str] = None) -> Reproduction:
    if not os.path.isfile(path):
        raise ReproductionError(f"recipe {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    if not isinstance(data, dict) or "merge_method" not in data:
        raise ReproductionError(f"{path}: not a mergekit recipe (no `merge_method`)")
    section = data.pop("finmerge", None) or {}
    unknown = set(section) - SECTION_KEYS
    if unknown:
        raise ReproductionError(f"{path}: unknown key(s) in `finmerge:`: {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(SECTION_KEYS))})")
    workdir = os.path.abspath(workdir or _absolute(section.get("workdir", "."), os.path.dirname(os.path.abspath(path))))
    stages = section.get("stages") or [s for s in STAGES if s in ("merge", "eval") or s in section]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ReproductionError(f"{path}: unknown stage(s) {', '.join(map(repr, bad))}; stages are {', '.join(STAGES)}")
    merge = _resolve_models(copy.deepcopy(data), workdir)
    repro = Reproduction(
        path=os.path.abspath(path), workdir=workdir, merge=merge,
        output=_absolute(section.get("output", "merged"), workdir), stages=list(stages),
        pretrain=_pretrain_section(section.get("pretrain"), workdir), eval=_files(section.get("eval") or {}, EVAL_KEYS, workdir, f"{path}: finmerge.eval"),
        sweep=_files(section["sweep"], SWEEP_KEYS, workdir, f"{path}: finmerge.sweep") if section.get("sweep") else None,
    )
    _check(repro, path)
    return repro


def _resolve_models(merge: Dict[str, Any], workdir: str) -> Dict[str, Any]:
    def fix(value: Any) -> Any:
        return _absolute(value, workdir) if isinstance(value, str) and _looks_like_path(value) else value

    if "base_model" in merge:
        merge["base_model"] = fix(merge["base_model"])
    for entry in merge.get("models") or []:
        entry["model"] = fix(entry["model"])
    return merge


def _local_data(spec: str) -> bool:
    return _looks_like_path(spec) and not spec.startswith("dataset:")


def _pretrain_section(section: Optional[Dict[str, Any]], workdir: str) -> Optional[Dict[str, Any]]:
    """The pretrain fields with local data paths made absolute once (hub ids and dataset: sources kept)."""
    if not section:
        return section
    section = dict(section)
    for key in ("data", "replay_data"):
        if key in section:
            section[key] = [_absolute(d, workdir) if _local_data(d) else d for d in section[key]]
    return section


def _files(section: Dict[str, Any], known: set, workdir: str, where: str) -> Dict[str, Any]:
    unknown = set(section) - known
    if unknown:
        raise ReproductionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    section = dict(section)
    if section.get("text"):
        section["text"] = _absolute(section["text"], workdir)
    if section.get("qa"):
        section["qa"] = {name: _absolute(p, workdir) for name, p in section["qa"].items()}
    return section


def _check(repro: Reproduction, path: str) -> None:
    from mergekit.config import MergeConfiguration

    from finmerge.plugins.preflight import RecipeError, check_parameters, resolve_roles

    try:
        config = MergeConfiguration.model_validate(repro.merge)
        resolve_roles(config)
        check_parameters(config)
    except RecipeError as error:
        raise ReproductionError(f"{path}: {error}") from error
    except Exception as error:
        raise ReproductionError(f"{path}: not a valid mergekit recipe: {str(error).splitlines()[0]}") from error
    produced = {repro.model("domain")} if "pretrain" in repro.stages else set()
    if "pretrain" in repro.stages and not repro.pretrain:
        raise ReproductionError(f"{path}: stage `pretrain` needs a `finmerge.pretrain:` section (finmerge pretrain fields)")
    for role in ("base", "domain", "instruct"):
        model = repro.model(role)
        if model not in produced and os.path.isabs(model) and not os.path.isdir(model):
            raise ReproductionError(f"{path}: {role} model {model} does not exist"
                                    + (" (add the `pretrain` stage to train it)" if role == "domain" else ""))
    if "eval" in repro.stages and not (repro.eval.get("text") or repro.eval.get("qa")):
        raise ReproductionError(f"{path}: stage `eval` needs `finmerge.eval:` with `text` and/or `qa`")
    if "sweep" in repro.stages and not repro.sweep:
        raise ReproductionError(f"{path}: stage `sweep` needs a `finmerge.sweep:` section")
    files = [repro.eval.get("text"), *(repro.eval.get("qa") or {}).values()]
    if repro.sweep:
        files += [repro.sweep.get("text"), *(repro.sweep.get("qa") or {}).values()]
    for data in (repro.pretrain or {}).get("data", []) + (repro.pretrain or {}).get("replay_data", []):
        files.append(data if _local_data(data) else None)
    for file in filter(None, files):
        if not os.path.exists(file):
            raise ReproductionError(f"{path}: file {file} does not exist")
