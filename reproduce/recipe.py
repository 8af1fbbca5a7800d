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

Checked when the recipe is loaded: it must be UTF-8 YAML; the body must pass mergekit's own
`MergeConfiguration`, the section the schema of finmerge.reproduce.settings (every key known and of
its type; docs/reproduce.md lists them), the pretrain fields `PretrainConfig`; every input must be
present; `trust_remote_code`/`allow_pickle` are refused anywhere in the recipe (they come from the
command line only). Checked before any stage runs (check_locations): the outputs
(merged model, the pretrain stage's domain model, sweep/ and best-merge/) may not be the workdir or
an ancestor of it, may not overlap an input or each other, and may not be an existing folder
finmerge did not create.
"""

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from pydantic import ValidationError

from finmerge.reproduce.settings import EvalSection, FinmergeSection, SweepSection, describe
from finmerge.safety.errors import InputError
from finmerge.safety.flags import CommandLineOnlyError, refuse_cli_only
from finmerge.safety.hub import is_hub_id
from finmerge.safety.yaml_files import load_yaml, position
from finmerge.safety.outputs import MARKER, OutputError, check_output_location, is_owned

PRODUCED_BY_REPRODUCE = ("model", "output")  # pretrain fields reproduce sets itself


class ReproductionError(InputError):
    """The reproduction recipe cannot run as written; the message names the recipe and field."""


@dataclass
class Reproduction:
    path: str
    workdir: str
    merge: Dict[str, Any]  # the mergekit recipe with absolute paths
    output: str
    stages: List[str]
    pretrain: Optional[Dict[str, Any]] = None  # `finmerge pretrain` fields, checked by PretrainConfig
    eval: EvalSection = field(default_factory=EvalSection)
    sweep: Optional[SweepSection] = None
    baselines: List[str] = field(default_factory=list)  # mergekit methods (finmerge.sweep.baselines)

    def model(self, role: str) -> str:
        if role == "base":
            return self.merge["base_model"]
        return next(m["model"] for m in self.merge["models"] if (m.get("parameters") or {}).get("role") == role)

    @property
    def sweep_dir(self) -> str:
        return os.path.join(self.workdir, "sweep")

    @property
    def best_merge(self) -> str:
        return os.path.join(self.workdir, "best-merge")

    @property
    def data_free_merge(self) -> str:
        return os.path.join(self.workdir, "data-free-merge")

    @property
    def baselines_dir(self) -> str:
        return os.path.join(self.workdir, "baselines")

    def outputs(self) -> Dict[str, str]:
        """The folders this reproduction creates (and may later delete), by what they are."""
        named = {}
        if "pretrain" in self.stages:
            named["pretrain output (the recipe's domain model)"] = self.model("domain")
        if "merge" in self.stages:
            named["merged output (`finmerge.output`)"] = self.output
        if "sweep" in self.stages:
            named["sweep folder"] = self.sweep_dir
            named["sweep's best merge"] = self.best_merge
            named["sweep's data-free choice"] = self.data_free_merge
        if "baselines" in self.stages:
            named["baselines folder"] = self.baselines_dir
        return named

    def inputs(self) -> List[str]:
        """Local files and folders the stages read (never written)."""
        models = [self.model(r) for r in ("base", "instruct")]
        files = models + ([] if "pretrain" in self.stages else [self.model("domain")])
        if "merge" not in self.stages:
            files.append(self.output)  # eval reads an existing merged model
        for section in filter(None, (self.eval, self.sweep)):
            files += [section.text, getattr(section, "prompts", None), *section.qa.values()]
        for key in ("data", "replay_data"):
            files += [d for d in (self.pretrain or {}).get(key, []) if _local_data(d)]
        return [f for f in files if f and os.path.isabs(f)] + [self.path]


def _absolute(path: str, workdir: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(workdir, path))


def _model_path(value: Any, workdir: str) -> Any:
    """A model reference: a folder (relative to the workdir) if it exists or looks like a path, else a hub id."""
    if not isinstance(value, str):
        return value
    local = _absolute(value, workdir)
    if os.path.exists(local) or value.startswith((".", "/", "~")) or not is_hub_id(value):
        return local
    return value


def _read(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ReproductionError(f"recipe {path} does not exist; give the path of a mergekit recipe YAML file")
    if not os.path.isfile(path):
        raise ReproductionError(f"recipe {path} is not a file; give the path of a mergekit recipe YAML file")
    data = load_yaml(path, "recipe", ReproductionError)
    if data is None:
        raise ReproductionError(f"recipe {path} is empty; write a mergekit recipe (`merge_method:`, `models:`, ...)")
    if not isinstance(data, dict):
        raise ReproductionError(f"recipe {path} must be a mapping (a mergekit recipe with `merge_method:`), "
                                f"not {type(data).__name__}")
    # Code from a model repository runs, and pickles are read, only with a command-line flag.
    try:
        refuse_cli_only(data, f"recipe {path}")
    except CommandLineOnlyError as error:
        raise ReproductionError(str(error)) from None
    if "merge_method" not in data:
        raise ReproductionError(f"recipe {path}: not a mergekit recipe (no `merge_method`)")
    return data


def _where(path: str, keys: Sequence[Union[str, int]]) -> str:
    """`recipe PATH, line L, column C: ` for the value at `keys`, as far as the file has it."""
    found = position(path, keys)
    return f"recipe {path}, line {found[0]}, column {found[1]}: " if found else f"recipe {path}: "


def load_reproduction(path: str, workdir: Optional[str] = None) -> Reproduction:
    data = _read(path)
    raw = data.pop("finmerge", None)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ReproductionError(f"{_where(path, ['finmerge'])}finmerge must be a mapping (workdir, output, stages, "
                                f"pretrain, eval, baselines, sweep), not {type(raw).__name__}")
    try:
        section = FinmergeSection.model_validate(raw)
    except ValidationError as error:
        raise ReproductionError(describe(error, FinmergeSection, "finmerge", raw,
                                         lambda loc: _where(path, ["finmerge", *loc]))) from None
    workdir = os.path.abspath(workdir or _absolute(section.workdir or ".", os.path.dirname(os.path.abspath(path))))
    merge = _resolve_models(copy.deepcopy(data), workdir, path)
    repro = Reproduction(
        path=os.path.abspath(path), workdir=workdir, merge=merge,
        output=_absolute(section.output or "merged", workdir), stages=section.stage_list(),
        pretrain=_pretrain_section(raw.get("pretrain"), workdir, path),
        eval=_files(section.eval or EvalSection(), workdir),
        sweep=_files(section.sweep, workdir) if section.sweep else None,
        baselines=list(section.baselines or []),
    )
    _check_inputs(repro, path)
    _check_pretrain(repro, path, raw.get("pretrain"))
    return repro


def _resolve_models(merge: Dict[str, Any], workdir: str, path: str) -> Dict[str, Any]:
    if "base_model" in merge:
        merge["base_model"] = _model_path(merge["base_model"], workdir)
    models = merge.get("models") or []
    if not isinstance(models, list):
        raise ReproductionError(f"recipe {path}: `models` must be a list of {{model: ..., parameters: ...}} entries")
    for entry in models:
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = _model_path(entry["model"], workdir)
    return merge


def _local_data(spec: str) -> bool:
    return not spec.startswith("dataset:")


def _pretrain_section(section: Any, workdir: str, path: str) -> Optional[Dict[str, Any]]:
    """The pretrain fields with local data paths made absolute once (`dataset:` sources kept)."""
    if section is None:
        return None
    where = "finmerge.pretrain"
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    for key in PRODUCED_BY_REPRODUCE:
        if key in section:
            raise ReproductionError(f"{_where(path, ['finmerge', 'pretrain', key])}{where}.{key} cannot be set: the "
                                    "pretrain stage trains the recipe's `base_model` and writes the recipe's domain "
                                    "model; remove the key")
    for key in ("data", "replay_data"):
        if key in section:
            value = section[key]
            if not (isinstance(value, list) and value and all(isinstance(d, str) and d for d in value)):
                raise ReproductionError(f"{_where(path, ['finmerge', 'pretrain', key])}{where}.{key} must be a non-empty "
                                        f"list of files, folders or dataset: sources; got {value!r}")
            section[key] = [_absolute(d, workdir) if _local_data(d) else d for d in value]
    return section


def _files(section, workdir: str):
    """The section with its data files read from the workdir."""
    update: Dict[str, Any] = {}
    if section.text:
        update["text"] = _absolute(section.text, workdir)
    if section.qa:
        update["qa"] = {name: _absolute(p, workdir) for name, p in section.qa.items()}
    if getattr(section, "prompts", None):
        update["prompts"] = _absolute(section.prompts, workdir)
    return section.model_copy(update=update)


def _check_inputs(repro: Reproduction, path: str) -> None:
    """What the section's schema cannot tell: the body is a mergekit recipe with the roles, and the models and
    files the stages read are there."""
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
    for role in ("base", "domain", "instruct"):
        model = repro.model(role)
        if model not in produced and os.path.isabs(model) and not os.path.isdir(model):
            state = "is not a folder" if os.path.lexists(model) else "does not exist"
            raise ReproductionError(f"{path}: {role} model {model} {state}"
                                    + (" (add the `pretrain` stage to train it)" if role == "domain" else ""))
    if "eval" in repro.stages and "merge" not in repro.stages and not os.path.isdir(repro.output):
        raise ReproductionError(f"{path}: stage `eval` evaluates the merged model {repro.output}, which does not exist; "
                                "add the `merge` stage")
    files = [repro.eval.text, *repro.eval.qa.values()]
    if repro.sweep:
        files += [repro.sweep.text, repro.sweep.prompts, *repro.sweep.qa.values()]
    for file in filter(None, files):
        if not os.path.exists(file):
            raise ReproductionError(f"{path}: file {file} does not exist")
        if not os.path.isfile(file):
            raise ReproductionError(f"{path}: {file} is not a file; eval and sweep read text/JSONL files")
    for data in (repro.pretrain or {}).get("data", []) + (repro.pretrain or {}).get("replay_data", []):
        if _local_data(data) and not os.path.exists(data):
            raise ReproductionError(f"{path}: pretrain data {data} does not exist")


def build_pretrain_config(repro: Reproduction, threads: Optional[int], trust_remote_code: bool, allow_pickle: bool):
    """The pretrain stage's config: the recipe's fields, its base model in, its domain model out, the flags."""
    from finmerge.pretrain.config import build_config

    overrides = {**repro.pretrain, "model": repro.model("base"), "output": repro.model("domain")}
    if threads:
        overrides["num_threads"] = threads
    return build_config(None, overrides, trust_remote_code=bool(trust_remote_code), allow_pickle=bool(allow_pickle))


def _check_pretrain(repro: Reproduction, path: str, raw: Optional[Dict[str, Any]]) -> None:
    """The pretrain section's fields and values, checked by PretrainConfig itself before anything runs."""
    if "pretrain" not in repro.stages or not repro.pretrain:
        return
    try:
        build_pretrain_config(repro, threads=None, trust_remote_code=False, allow_pickle=False)
    except Exception as error:  # a wrong type or value, named by the pretrain config itself
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        text = text.replace("command line: ", "").replace("pretrain settings: ", "")
        named = re.search(r"`([^`]+)`", text)
        keys = {str(k).replace("-", "_"): k for k in raw or {}}
        key = keys.get(named.group(1)) if named else None
        where = _where(path, ["finmerge", "pretrain", *([key] if key is not None else [])])
        raise ReproductionError(f"{where}finmerge.pretrain: {text}") from None


def _overlap(a: str, b: str) -> bool:
    a, b = Path(a).resolve(), Path(b).resolve()
    return a.is_relative_to(b) or b.is_relative_to(a)


def check_locations(repro: Reproduction) -> None:
    """Outputs: not the workdir or above it, not an input, not each other, not a folder of the user's.

    run_reproduction calls this before any stage runs (`finmerge sweep` reads the same recipes but
    writes none of these folders)."""
    path = repro.path
    outputs: List[Tuple[str, str]] = list(repro.outputs().items())
    inputs = repro.inputs()
    for what, output in outputs:
        if os.path.islink(output):
            raise ReproductionError(f"{path}: {what} {output} is a symbolic link; finmerge writes and deletes only real "
                                    "folders it created: name a new folder")
        try:
            check_output_location(output, inputs, workdir=repro.workdir, what=what)
        except OutputError as error:
            raise ReproductionError(f"{path}: {error}") from None
    for index, (what, output) in enumerate(outputs):
        for other_what, other in outputs[index + 1:]:
            if _overlap(output, other):
                raise ReproductionError(f"{path}: the {what} {output} and the {other_what} {other} overlap; "
                                        "give each its own folder")
    for what, output in outputs:
        if os.path.lexists(output) and not (os.path.isdir(output) and (is_owned(output) or not os.listdir(output))):
            hint = ""
            if output == repro.model("domain") and "pretrain" in repro.stages:
                hint = " To use an existing domain model instead of training one, remove `pretrain` from `finmerge.stages`."
            elif output in (repro.sweep_dir, repro.best_merge, repro.data_free_merge, repro.baselines_dir):
                hint = " (The sweep writes into the workdir: or give another one with --workdir.)"
            raise ReproductionError(
                f"{path}: the {what} {output} already exists and was not created by finmerge (no {MARKER} marker); "
                f"finmerge never deletes or replaces it: point the recipe at a new folder, or move that one away.{hint}")
