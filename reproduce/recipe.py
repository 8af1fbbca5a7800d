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

Checked when the recipe is loaded: it must be UTF-8 YAML, every key known and of the right type,
every input present; `trust_remote_code`/`allow_pickle` are refused anywhere in the recipe (they
come from the command line only). Checked before any stage runs (check_locations): the outputs
(merged model, the pretrain stage's domain model, sweep/ and best-merge/) may not be the workdir or
an ancestor of it, may not overlap an input or each other, and may not be an existing folder
finmerge did not create.
"""

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple


from finmerge.safety.errors import InputError
from finmerge.safety.flags import CommandLineOnlyError, refuse_cli_only
from finmerge.safety.hub import is_hub_id
from finmerge.safety.yaml_files import load_yaml
from finmerge.safety.outputs import MARKER, OutputError, check_output_location, is_owned

STAGES = ("pretrain", "merge", "eval", "sweep")
SECTION_KEYS = {"workdir", "output", "stages", "pretrain", "eval", "sweep"}
# field -> expected kind; see _typed
EVAL_FIELDS = {"text": "path", "qa": "qa", "max_len": "count", "max_new_tokens": "count", "batch_size": "count",
               "generate": "bool", "turn_end": "str"}
SWEEP_FIELDS = {"w_domain": "numbers", "w_instruct": "numbers", "variants": "strings", "metric": "str",
                "text": "path", "qa": "qa"}
EVAL_KEYS, SWEEP_KEYS = set(EVAL_FIELDS), set(SWEEP_FIELDS)
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
    pretrain: Optional[Dict[str, Any]] = None
    eval: Dict[str, Any] = field(default_factory=dict)
    sweep: Optional[Dict[str, Any]] = None

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
        return named

    def inputs(self) -> List[str]:
        """Local files and folders the stages read (never written)."""
        models = [self.model(r) for r in ("base", "instruct")]
        files = models + ([] if "pretrain" in self.stages else [self.model("domain")])
        if "merge" not in self.stages:
            files.append(self.output)  # eval reads an existing merged model
        for section in (self.eval, self.sweep or {}):
            files += [section.get("text"), *(section.get("qa") or {}).values()]
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


KINDS = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "path": ("a file path (string)", lambda v: isinstance(v, str) and v != ""),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "count": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "numbers": ("a non-empty list of numbers", lambda v: isinstance(v, list) and v != [] and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)),
    "strings": ("a non-empty list of strings", lambda v: isinstance(v, list) and v != [] and all(isinstance(x, str) for x in v)),
    "qa": ("a mapping of set name to JSONL file path", lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(p, str) and p for k, p in v.items())),
}


def _typed(section: Any, fields: Dict[str, str], where: str) -> Dict[str, Any]:
    if not isinstance(section, dict):
        raise ReproductionError(f"{where} must be a mapping of field: value, not {type(section).__name__}")
    unknown = set(map(str, section)) - set(fields)
    if unknown:
        raise ReproductionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(fields))})")
    for key, value in section.items():
        want, ok = KINDS[fields[key]]
        if value is not None and not ok(value):  # null: not given
            raise ReproductionError(f"{where}.{key} must be {want}; got {value!r}")
    return dict(section)


def load_reproduction(path: str, workdir: Optional[str] = None) -> Reproduction:
    data = _read(path)
    section = data.pop("finmerge", None)
    section = {} if section is None else section
    where = f"recipe {path}: finmerge"
    if not isinstance(section, dict):
        raise ReproductionError(f"{where} must be a mapping (workdir, output, stages, pretrain, eval, sweep), "
                                f"not {type(section).__name__}")
    unknown = set(map(str, section)) - SECTION_KEYS
    if unknown:
        raise ReproductionError(f"{path}: unknown key(s) in `finmerge:`: {', '.join(sorted(unknown))} "
                                f"(known: {', '.join(sorted(SECTION_KEYS))})")
    for key in ("workdir", "output"):
        if key in section and not (isinstance(section[key], str) and section[key]):
            raise ReproductionError(f"{where}.{key} must be a folder path (string); got {section[key]!r}")
    workdir = os.path.abspath(workdir or _absolute(section.get("workdir", "."), os.path.dirname(os.path.abspath(path))))
    stages = section.get("stages")
    if stages is None:
        stages = [s for s in STAGES if s in ("merge", "eval") or s in section]
    elif not KINDS["strings"][1](stages):
        raise ReproductionError(f"{where}.stages must be a non-empty list of stage names ({', '.join(STAGES)}); got {stages!r}")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ReproductionError(f"{path}: unknown stage(s) {', '.join(map(repr, bad))}; stages are {', '.join(STAGES)}")
    merge = _resolve_models(copy.deepcopy(data), workdir, path)
    repro = Reproduction(
        path=os.path.abspath(path), workdir=workdir, merge=merge,
        output=_absolute(section.get("output", "merged"), workdir), stages=[s for s in STAGES if s in stages],
        pretrain=_pretrain_section(section.get("pretrain"), workdir, f"{where}.pretrain"),
        eval=_files(_typed(section.get("eval") or {}, EVAL_FIELDS, f"{where}.eval"), workdir),
        sweep=_files(_typed(section["sweep"], SWEEP_FIELDS, f"{where}.sweep"), workdir) if section.get("sweep") else None,
    )
    _check(repro, path)
    _check_sweep(repro, path)
    _check_pretrain(repro, f"{where}.pretrain")
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


def _pretrain_section(section: Any, workdir: str, where: str) -> Optional[Dict[str, Any]]:
    """The pretrain fields with local data paths made absolute once (`dataset:` sources kept)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ReproductionError(f"{where} must be a mapping of `finmerge pretrain` fields, not {type(section).__name__}")
    section = {str(k).replace("-", "_"): v for k, v in section.items()}
    for key in PRODUCED_BY_REPRODUCE:
        if key in section:
            raise ReproductionError(f"{where}.{key} cannot be set: the pretrain stage trains the recipe's `base_model` "
                                    "and writes the recipe's domain model; remove the key")
    for key in ("data", "replay_data"):
        if key in section:
            if not KINDS["strings"][1](section[key]):
                raise ReproductionError(f"{where}.{key} must be a non-empty list of files, folders or dataset: sources; "
                                        f"got {section[key]!r}")
            section[key] = [_absolute(d, workdir) if _local_data(d) else d for d in section[key]]
    return section


def _files(section: Dict[str, Any], workdir: str) -> Dict[str, Any]:
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
            state = "is not a folder" if os.path.lexists(model) else "does not exist"
            raise ReproductionError(f"{path}: {role} model {model} {state}"
                                    + (" (add the `pretrain` stage to train it)" if role == "domain" else ""))
    if "eval" in repro.stages and not (repro.eval.get("text") or repro.eval.get("qa")):
        raise ReproductionError(f"{path}: stage `eval` needs `finmerge.eval:` with `text` and/or `qa`")
    if "eval" in repro.stages and "merge" not in repro.stages and not os.path.isdir(repro.output):
        raise ReproductionError(f"{path}: stage `eval` evaluates the merged model {repro.output}, which does not exist; "
                                "add the `merge` stage")
    if "sweep" in repro.stages and not repro.sweep:
        raise ReproductionError(f"{path}: stage `sweep` needs a `finmerge.sweep:` section")
    if "sweep" in repro.stages and not repro.sweep.get("metric"):
        raise ReproductionError(f"{path}: `finmerge.sweep.metric` is required: the metric that picks the best point, "
                                "SET.KEY such as finance.strict (more, comma-separated, break ties)")
    files = [repro.eval.get("text"), *(repro.eval.get("qa") or {}).values()]
    if repro.sweep:
        files += [repro.sweep.get("text"), *(repro.sweep.get("qa") or {}).values()]
    for file in filter(None, files):
        if not os.path.exists(file):
            raise ReproductionError(f"{path}: file {file} does not exist")
        if not os.path.isfile(file):
            raise ReproductionError(f"{path}: {file} is not a file; eval and sweep read text/JSONL files")
    for data in (repro.pretrain or {}).get("data", []) + (repro.pretrain or {}).get("replay_data", []):
        if _local_data(data) and not os.path.exists(data):
            raise ReproductionError(f"{path}: pretrain data {data} does not exist")


def _check_sweep(repro: Reproduction, path: str) -> None:
    if not repro.sweep:
        return
    from finmerge.sweep.run import VARIANTS

    unknown = [v for v in repro.sweep.get("variants", []) if v not in VARIANTS]
    if unknown:
        raise ReproductionError(f"{path}: finmerge.sweep.variants: unknown variant(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(VARIANTS)}")
    if not (repro.sweep.get("text") or repro.sweep.get("qa")):
        raise ReproductionError(f"{path}: finmerge.sweep needs validation data: `qa` and/or `text`")


def _check_pretrain(repro: Reproduction, where: str) -> None:
    """Unknown fields and bad values of the pretrain section, before anything runs."""
    if "pretrain" not in repro.stages or not repro.pretrain:
        return
    from finmerge.pretrain.config import PretrainConfig

    from finmerge.reproduce.run import build_pretrain_config

    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in repro.pretrain:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ReproductionError(f"{where}: unknown field `{key}`{hint}; see `finmerge pretrain --help` for the fields")
    try:
        build_pretrain_config(repro, threads=None, trust_remote_code=False, allow_pickle=False)
    except Exception as error:  # a wrong type or value, named by the pretrain config itself
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ReproductionError(f"{where}: {text.replace('command line: ', '')}") from None


def _real(path: str) -> str:
    return os.path.realpath(path)


def _overlap(a: str, b: str) -> bool:
    a, b = _real(a), _real(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


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
            elif output in (repro.sweep_dir, repro.best_merge):
                hint = " (The sweep writes into the workdir: or give another one with --workdir.)"
            raise ReproductionError(
                f"{path}: the {what} {output} already exists and was not created by finmerge (no {MARKER} marker); "
                f"finmerge never deletes or replaces it: point the recipe at a new folder, or move that one away.{hint}")
