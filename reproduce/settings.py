"""The schema of a recipe's `finmerge:` section: one pydantic model per part, beside mergekit's own
`MergeConfiguration`, which checks the recipe's body.

The eval and sweep sections are made of the same field groups as the settings `evaluate` and
`run_sweep` take (`EvalData`, `EvalKnobs`, `SweepGrid`), so a field, its type, default and meaning
are written once. The pretrain section is a mapping of `finmerge pretrain` fields, checked by
`PretrainConfig` itself (finmerge.reproduce.recipe). The reference table in docs/reproduce.md is
written from these models:

    python -m finmerge.reproduce.settings docs/reproduce.md     # rewrite the table between the markers
"""

import sys
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from finmerge.evaluation.settings import EvalData, EvalKnobs, Want
from finmerge.safety import generated_docs
from finmerge.sweep.baselines import BASELINES
from finmerge.sweep.run import SweepGrid

STAGES = ("pretrain", "merge", "eval", "baselines", "sweep")

Folder = Annotated[Optional[Annotated[str, Field(min_length=1)]], Want("a folder path (string)")]
Stages = Annotated[Optional[Annotated[List[Literal[STAGES]], Field(min_length=1)]],
                   Want(f"a non-empty list of stage names ({', '.join(STAGES)})")]
Baselines = Annotated[Optional[Annotated[List[Literal[tuple(BASELINES)]], Field(min_length=1)]],
                      Want(f"a non-empty list of mergekit methods ({', '.join(BASELINES)})")]
PretrainFields = Annotated[Optional[Dict[str, Any]], Want("a mapping of `finmerge pretrain` fields")]


class RecipeSection(BaseModel):
    """A part of the `finmerge:` section: every key known, every value of its type as written (no
    conversion: "3" is not 3, `yes` is not true), and null meaning "not given"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def given(self) -> Dict[str, Any]:
        """The fields the recipe wrote (what a stage key hashes), without the defaults."""
        return self.model_dump(exclude_unset=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class EvalSection(RecipeSection, EvalData, EvalKnobs):
    """`finmerge.eval:`: the reported evaluation of base, domain, instruct and merged models."""

    model_config = ConfigDict(extra="forbid", strict=True)


class SweepSection(RecipeSection, EvalData, SweepGrid):
    """`finmerge.sweep:`: the weight grid, evaluated on its own (validation) data with finmerge.eval's knobs."""

    model_config = ConfigDict(extra="forbid", strict=True)


class FinmergeSection(RecipeSection):
    """`finmerge:`: where the reproduction runs, which stages, and each stage's settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    workdir: Folder = Field(None, description="Folder the recipe's relative paths are read from and the outputs "
                                              "written to (default: the recipe's folder; `--workdir` overrides).")
    output: Folder = Field(None, description="The merged model's folder (default: `merged` in the workdir).")
    stages: Stages = Field(None, description="Stages to run, in this order whatever order is written (default: "
                                             "merge, eval, and pretrain/sweep when their section is there).")
    pretrain: PretrainFields = Field(None, description="`finmerge pretrain` fields (`finmerge pretrain --help`; "
                                                       "docs/pretrain.md); `model` and `output` are the recipe's "
                                                       "base and domain models and cannot be set.")
    eval: Optional[EvalSection] = Field(None, description="The reported evaluation (fields below).")
    baselines: Baselines = Field(None, description="mergekit's own methods to merge the same three models with, at "
                                                   "their documented defaults, by plain `mergekit-multi`; each is "
                                                   "evaluated like the merge and reported under its method name.")
    sweep: Optional[SweepSection] = Field(None, description="The weight sweep (fields below).")

    @model_validator(mode="before")
    @classmethod
    def _empty_sweep_is_none(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sweep" in data and not data["sweep"] and data["sweep"] != []:
            data = {k: v for k, v in data.items() if k != "sweep"}
        return data

    def stage_list(self) -> List[str]:
        """The stages to run, in their order: those named, else merge, eval and each stage with a section."""
        named = self.stages or [s for s in STAGES if s in ("merge", "eval") or s in self.model_fields_set]
        return [s for s in STAGES if s in named]

    @model_validator(mode="after")
    def _each_stage_has_its_settings(self) -> "FinmergeSection":
        stages = self.stage_list()
        if "pretrain" in stages and not self.pretrain:
            raise ValueError("stage `pretrain` needs a `finmerge.pretrain:` section (finmerge pretrain fields)")
        if "eval" in stages and not (self.eval and (self.eval.text or self.eval.qa)):
            raise ValueError("stage `eval` needs `finmerge.eval:` with `text` and/or `qa`")
        if "sweep" in stages and not self.sweep:
            raise ValueError("stage `sweep` needs a `finmerge.sweep:` section")
        if "sweep" in stages and not (self.sweep.metric or self.sweep.prompts):
            raise ValueError("`finmerge.sweep` needs `metric` (labelled data: the metric that picks the best point, "
                             "SET.KEY such as finance.strict) and/or `prompts` with `text` (the data-free choice)")
        if self.sweep and self.sweep.prompts and not self.sweep.text:
            raise ValueError("`finmerge.sweep.prompts` needs `finmerge.sweep.text` (held-out domain text): the "
                             "data-free choice reads both")
        if "baselines" in stages and not self.baselines:
            raise ValueError("stage `baselines` needs `finmerge.baselines:`, a list of mergekit methods")
        if "baselines" in stages and "eval" not in stages:
            raise ValueError("stage `baselines` needs stage `eval`: each baseline is evaluated as the merge is")
        if self.sweep and not (self.sweep.text or self.sweep.qa):
            raise ValueError("finmerge.sweep needs validation data: `qa` and/or `text`")
        return self


# --- error messages --------------------------------------------------------------------------------

def _model_of(annotation: Any) -> Optional[Type[BaseModel]]:
    """The model class inside `Optional[Model]`, if any."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_at(model: Type[BaseModel], loc: Sequence[Union[str, int]]) -> Tuple[List[str], Optional[FieldInfo], Type[BaseModel]]:
    """(the field names along `loc`, the deepest field, the model that holds it)."""
    names: List[str] = []
    field, holder = None, model
    current: Optional[Type[BaseModel]] = model
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            break
        holder, field = current, current.model_fields[part]
        names.append(part)
        current = _model_of(field.annotation)
    return names, field, holder


def _want(field: FieldInfo) -> str:
    wants = [m for m in field.metadata if isinstance(m, Want)]
    if wants:
        return wants[-1]
    model = _model_of(field.annotation)
    return "a mapping of field: value" if model else "valid"


def _type_name(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean"}.get(type(value), type(value).__name__)


def describe(error: ValidationError, model: Type[BaseModel], prefix: str, data: Any,
             locate: Callable[[Sequence[Union[str, int]]], str] = lambda loc: "") -> str:
    """The first problem of `error` in one sentence: where (`locate(loc)` may add the file's line and
    column), which field (`prefix.field`), what it must be and what it is."""
    problems = error.errors()
    first = problems[0]
    loc = tuple(first["loc"])
    unknown = [p for p in problems if p["type"] == "extra_forbidden" and tuple(p["loc"][:-1]) == loc[:-1]]
    names, field, holder = _field_at(model, loc)
    if first["type"] == "extra_forbidden":
        owner = ".".join([prefix, *names])
        keys = ", ".join(sorted(str(p["loc"][-1]) for p in unknown))
        known = ", ".join(holder_fields(model, loc[:-1]))
        return f"{locate(loc)}{owner}: unknown key(s) {keys} (known: {known})"
    if first["type"] == "value_error":  # a rule between fields (model_validator): its own sentence
        return f"{locate(loc)}{first['ctx']['error']}"
    if first["type"] == "literal_error":
        bad = ", ".join(repr(p["input"]) for p in problems if p["type"] == "literal_error")
        allowed = first["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return f"{locate(loc)}{'.'.join([prefix, *names])}: unknown value(s) {bad} (known: {allowed})"
    if field is None:  # the section itself is not a mapping
        return f"{locate(loc)}{prefix} must be a mapping of field: value, not {_type_name(data)}"
    value = data
    for name in names:
        value = value.get(name) if isinstance(value, dict) else None
    name = ".".join([prefix, *names])
    if _model_of(field.annotation) and not isinstance(value, dict):
        return f"{locate(loc[:len(names)])}{name} must be a mapping of field: value, not {_type_name(value)}"
    return f"{locate(loc[:len(names)])}{name} must be {_want(field)}; got {value!r}"


def holder_fields(model: Type[BaseModel], loc: Sequence[Union[str, int]]) -> List[str]:
    """The known keys of the section at `loc`."""
    current = model
    for part in loc:
        inner = _model_of(current.model_fields[part].annotation) if part in current.model_fields else None
        if inner is None:
            break
        current = inner
    return sorted(current.model_fields)


# --- the reference table ---------------------------------------------------------------------------

BEGIN = "<!-- finmerge-section:begin (generated by python -m finmerge.reproduce.settings docs/reproduce.md) -->"
END = "<!-- finmerge-section:end -->"


def _default(field: FieldInfo) -> str:
    import yaml

    value = field.get_default(call_default_factory=True)
    if value in (None, [], {}, ""):
        return "–"
    return "`" + yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip() + "`"


def _rows(model: Type[BaseModel], prefix: str) -> List[str]:
    rows = []
    for name, field in model.model_fields.items():
        text = " ".join((field.description or "").split()).replace("|", "\\|")
        want = _want(field) if not _model_of(field.annotation) else "a mapping"
        rows.append(f"| `{prefix}.{name}` | {want} | {_default(field)} | {text} |")
    return rows


def section_table() -> str:
    lines = ["| key | value | default | meaning |", "|---|---|---|---|"]
    lines += _rows(FinmergeSection, "finmerge")
    lines += _rows(EvalSection, "finmerge.eval")
    lines += _rows(SweepSection, "finmerge.sweep")
    return "\n".join(lines)


def render(document: str) -> str:
    """`document` with the text between the markers replaced by the current table."""
    return generated_docs.render(document, BEGIN, END, section_table())


if __name__ == "__main__":
    generated_docs.rewrite(sys.argv[1] if len(sys.argv) > 1 else "docs/reproduce.md", render)
