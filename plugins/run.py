"""Runs a `domain_instruct` merge safely around mergekit's own `run_merge`.

Checks the recipe first (preflight), lets mergekit write into a scratch folder beside OUT, turns the
result into a working instruct model, and only then moves it to OUT. A crash or Ctrl-C at any point
leaves OUT as it was; the scratch folder is removed (or, after a hard kill, left with a name that
says `partial`). Other merge methods pass straight through to mergekit.
"""

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Dict, Optional

from mergekit.card import generate_card
from mergekit.config import MergeConfiguration

from finmerge.plugins.collector import collecting
from finmerge.plugins.instruct_output import card_section, finish_instruct_output
from finmerge.plugins.preflight import MergeInputs, preflight

LOG = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes")
_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _absolute_local_paths(config: MergeConfiguration) -> MergeConfiguration:
    """Make existing relative model folders absolute.

    mergekit's model-card writer asks the hub whether a short relative path such as `models/base`
    is a repo id, which fails offline after all weights were written.
    """

    def fix(value: Any, key: Optional[str] = None) -> Any:
        if isinstance(value, dict):
            return {k: fix(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v, key) for v in value]
        if key in _MODEL_KEYS and isinstance(value, str) and not os.path.isabs(value) and os.path.isdir(value):
            return os.path.abspath(value)
        return value

    return MergeConfiguration.model_validate(fix(config.model_dump(mode="json", exclude_defaults=True)))


def _scratch_path(out_path: str) -> str:
    parent, name = os.path.split(os.path.abspath(out_path))
    return os.path.join(parent, f".{name}.partial-{os.getpid()}")


def _move_into_place(scratch: str, out_path: str) -> None:
    out_path = os.path.abspath(out_path)
    old = None
    if os.path.isdir(out_path):  # empty, or the user asked to overwrite (preflight checked)
        old = f"{_scratch_path(out_path)}.old"
        os.rename(out_path, old)
    os.rename(scratch, out_path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_diagnostics(folder: str, collector: Any, inputs: MergeInputs) -> Optional[Any]:
    """The independence report into the merge's folder; a failure here must not cost the merge."""
    from finmerge.plugins.diagnostics.report import write_report

    models = {role: str(getattr(inputs, role)) for role in ("base", "domain", "instruct")}
    # per-module weight lists are plain data, but make sure they serialize
    weights: Dict[str, Any] = json.loads(json.dumps(
        {role: inputs.parameters[role].get("weight", 1.0) for role in ("domain", "instruct")}, default=str))
    try:
        return write_report(folder, collector, models, source="merge", weights=weights)
    except Exception:
        LOG.exception("the merge is complete but its diagnostics report could not be written; "
                      "`finmerge diagnose` computes it from the three checkpoints")
        return None


def run_domain_instruct(
    original_run_merge: Callable[..., Any],
    merge_config: MergeConfiguration,
    out_path: str,
    options: Any,
    config_source: Optional[str] = None,
    *,
    overwrite: Optional[bool] = None,
    allow_pickle: Optional[bool] = None,
) -> None:
    overwrite = _env_flag("FINMERGE_OVERWRITE") if overwrite is None else overwrite
    allow_pickle = _env_flag("FINMERGE_ALLOW_PICKLE") if allow_pickle is None else allow_pickle
    merge_config = _absolute_local_paths(merge_config)
    inputs = preflight(
        merge_config, out_path,
        overwrite=overwrite, allow_pickle=allow_pickle, cache_dir=options.transformers_cache,
        unsafe_truncate_embeddings=options.unsafe_truncate_embeddings,
    )
    config_source = config_source or merge_config.to_yaml()
    scratch = _scratch_path(out_path)
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    collector = None
    if not _env_flag("FINMERGE_NO_DIAGNOSTICS"):
        from finmerge.plugins.diagnostics import StatsCollector
        from finmerge.plugins.diagnostics.heatmap import preload_in_background

        collector = StatsCollector()  # fresh per merge: mergekit-multi runs several in one process
        preload_in_background()
    try:
        with collecting(collector) if collector else contextlib.nullcontext():
            original_run_merge(merge_config, scratch, options=options, config_source=config_source)
        ids = finish_instruct_output(scratch, inputs, merge_config, trust_remote_code=options.trust_remote_code)
        report = _write_diagnostics(scratch, collector, inputs) if collector else None
        if options.write_model_card:
            card = generate_card(config=merge_config, config_yaml=config_source, name=os.path.basename(os.path.abspath(out_path)))
            extra = report.card_section() if report else None
            with open(os.path.join(scratch, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card + card_section(inputs, ids, extra=extra))
        _move_into_place(scratch, out_path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if not options.quiet:
        print(f"domain_instruct: wrote {os.path.abspath(out_path)}")
        if report:
            print(f"diagnostics: {report.verdict}")
