"""Runs a `domain_instruct` merge safely around mergekit's own `run_merge`.

Checks the recipe first (preflight), takes a lock beside OUT (`.OUT.lock`: one merge per OUT at a
time), lets mergekit write into a scratch folder beside OUT (`.OUT.partial-PID`), turns the result
into a working instruct model, and only then swaps it into place. A crash, Ctrl-C or SIGTERM at
any point leaves OUT as it was; the scratch folder is removed. After a hard kill a scratch folder
stays; the next merge into the same OUT names it, and removes it when asked (`--remove-stale`,
FINMERGE_REMOVE_STALE=1) if the process in its name is gone. Other merge methods pass straight
through to mergekit.

`merge()` is the one entry finmerge's commands use; what they may do beyond mergekit's options is a
`MergeFlags`, which only plain `mergekit-yaml`'s adapter (the import hook) reads from FINMERGE_* variables.
"""

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from mergekit.card import generate_card
from mergekit.config import MergeConfiguration

from finmerge.plugins.chat_rows import describe, resolve_auto_rows
from finmerge.plugins.input_changes import merge_faults
from finmerge.plugins.instruct_output import card_section, finish_instruct_output
from finmerge.plugins.merge_context import MergeContext, merging
from finmerge.plugins.preflight import MergeInputs, check_output_path, input_paths, preflight
from finmerge.safety.locks import exclusive, lock_beside
from finmerge.safety.outputs import OutputError

LOG = logging.getLogger(__name__)
_TRUE = ("1", "true", "yes")
_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")


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


def _scratch_path(out_path: str, pid: Optional[int] = None) -> str:
    parent, name = os.path.split(os.path.abspath(out_path))
    return os.path.join(parent, f".{name}.partial-{os.getpid() if pid is None else pid}")


def out_lock(out_path: str):
    """Hold an exclusive lock on OUT for the whole merge; a second merge into it fails at once."""
    lock = lock_beside(out_path)
    return exclusive(lock, lambda holder: f"another merge (process {holder}) is writing {os.path.abspath(out_path)} "
                                          f"now (lock {lock}); wait for it to finish, or choose another output folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def stale_scratch(out_path: str) -> List[str]:
    """Scratch folders of earlier merges into OUT whose process is gone (`.OUT.partial-PID[.old]`).

    Only folders named exactly like ours, real folders (not links), with a PID that is not running.
    """
    parent, name = os.path.split(os.path.abspath(out_path))
    pattern = re.compile(rf"\.{re.escape(name)}\.partial-(\d+)(\.old)?")
    found = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.fullmatch(entry)
        path = os.path.join(parent, entry)
        if match and int(match.group(1)) != os.getpid() and os.path.isdir(path) and not os.path.islink(path) \
                and not _pid_alive(int(match.group(1))):
            found.append(path)
    return found


def handle_stale_scratch(out_path: str, remove: bool) -> None:
    """Report (or, when asked, remove) what killed merges into OUT left behind.

    A `.old` folder while OUT is missing is the previous OUT itself (killed between the two renames
    of the swap): never removed, and the merge stops until the user moves it back or away.
    """
    stale = stale_scratch(out_path)
    previous = [p for p in stale if p.endswith(".old")]
    if previous and not os.path.lexists(out_path):
        raise OutputError(
            f"{previous[0]} holds the previous {os.path.abspath(out_path)} (a merge was killed while replacing it); "
            f"move it back (mv {previous[0]} {os.path.abspath(out_path)}) or away, then merge again")
    if not stale:
        return
    listed = ", ".join(stale)
    if remove:
        for path in stale:
            shutil.rmtree(path)
        print(f"finmerge: removed scratch folders of killed merges into {out_path}: {listed} (their processes were gone)", file=sys.stderr)
    else:
        print(f"finmerge warning: scratch folders of killed merges into {out_path} take up space: {listed} "
              "(their processes are gone); remove them with `finmerge merge --remove-stale` or "
              "FINMERGE_REMOVE_STALE=1 (mergekit-yaml)", file=sys.stderr)


def _move_into_place(scratch: str, out_path: str) -> None:
    """Swap the finished merge into OUT; on any failure OUT is put back as it was."""
    out_path = os.path.abspath(out_path)
    old = None
    if os.path.isdir(out_path):  # empty, or the user asked to overwrite (preflight checked)
        old = f"{scratch}.old"
        os.rename(out_path, old)
    try:
        os.rename(scratch, out_path)
    except BaseException:
        if old is not None:
            try:
                os.rename(old, out_path)
            except BaseException as error:
                raise OutputError(f"the merge could not be moved into {out_path} and the previous contents could "
                                  f"not be put back: they are in {old}; move them back yourself") from error
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_diagnostics(folder: str, collector: Any, inputs: MergeInputs,
                       auto_rows: Optional[List[Tuple[int, str]]] = None) -> Optional[Any]:
    """The independence report into the merge's folder; a failure here must not cost the merge."""
    from finmerge.diagnostics.report import write_report

    models = {role: str(getattr(inputs, role)) for role in ("base", "domain", "instruct")}
    # per-module weight lists are plain data, but make sure they serialize
    weights: Dict[str, Any] = json.loads(json.dumps(
        {role: inputs.parameters[role].get("weight", 1.0) for role in ("domain", "instruct")}, default=str))
    try:
        return write_report(folder, collector, models, source="merge", weights=weights,
                            instruct_rows=[{"id": i, "token": t} for i, t in auto_rows] if auto_rows else None)
    except Exception:
        LOG.exception("the merge is complete but its diagnostics report could not be written; "
                      "`finmerge diagnose` computes it from the three checkpoints")
        return None


def _out_dtype(config: MergeConfiguration):
    """The dtype mergekit saves in (`out_dtype:`), so the kernel can refuse values that overflow it."""
    if not config.out_dtype:
        return None
    from mergekit.common import dtype_from_name

    return dtype_from_name(config.out_dtype)


@dataclass(frozen=True)
class MergeFlags:
    """What a `domain_instruct` merge may do beyond mergekit's own options.

    finmerge's commands set these from their command line; plain `mergekit-yaml` users set them with
    FINMERGE_* variables, which `from_environment` reads (the only place that reads them).
    """

    overwrite: bool = False  # replace a non-empty OUT, once the new merge is complete
    allow_pickle: bool = False  # read pickled .bin weights (unpickling can run code)
    remove_stale: bool = False  # remove scratch folders that killed merges into OUT left behind
    diagnostics: bool = True  # measure how independent τ_d and τ_i are, and write the report into OUT

    @classmethod
    def from_environment(cls, environ: Optional[Dict[str, str]] = None) -> "MergeFlags":
        environ = os.environ if environ is None else environ

        def on(name: str) -> bool:
            return environ.get(name, "").strip().lower() in _TRUE

        return cls(overwrite=on("FINMERGE_OVERWRITE"), allow_pickle=on("FINMERGE_ALLOW_PICKLE"),
                   remove_stale=on("FINMERGE_REMOVE_STALE"), diagnostics=not on("FINMERGE_NO_DIAGNOSTICS"))


def merge(merge_config: MergeConfiguration, out_path: str, options: Any, flags: MergeFlags = MergeFlags(),
          config_source: Optional[str] = None) -> None:
    """Merge in this process, the one way finmerge's commands do: `domain_instruct` checked, locked and
    all or nothing with `flags`; any other method is mergekit's own run_merge, untouched."""
    from finmerge.plugins import METHOD_NAME, register
    from finmerge.plugins.autoload import unwrapped_run_merge

    options.apply_global_options()
    if merge_config.merge_method != METHOD_NAME:
        unwrapped_run_merge()(merge_config, out_path, options=options, config_source=config_source)
        return
    register()  # says why if domain_instruct cannot be installed into this mergekit
    run_domain_instruct(unwrapped_run_merge(), merge_config, out_path, options, config_source, flags)


def run_domain_instruct(
    original_run_merge: Callable[..., Any],
    merge_config: MergeConfiguration,
    out_path: str,
    options: Any,
    config_source: Optional[str] = None,
    flags: MergeFlags = MergeFlags(),
) -> None:
    """A checked, locked, all-or-nothing `domain_instruct` merge into `out_path` (mergekit's `run_merge`
    is `original_run_merge`)."""
    overwrite, allow_pickle, remove_stale = flags.overwrite, flags.allow_pickle, flags.remove_stale
    merge_config = _absolute_local_paths(merge_config)
    inputs = preflight(
        merge_config, out_path,
        overwrite=overwrite, allow_pickle=allow_pickle, cache_dir=options.transformers_cache,
        unsafe_truncate_embeddings=options.unsafe_truncate_embeddings,
    )
    merge_config, auto_rows = resolve_auto_rows(merge_config, inputs, trust_remote_code=options.trust_remote_code)
    if auto_rows and not options.quiet:
        print(f"domain_instruct: instruct_rows: auto = {describe(auto_rows)}", file=sys.stderr)
    with out_lock(out_path):
        check_output_path(out_path, overwrite, input_paths(merge_config))  # again: another merge may have just finished
        handle_stale_scratch(out_path, remove_stale)
        with merge_faults(out_path, merge_config):  # a full disk names OUT, a shard broken mid-merge its file
            _merge_into_place(original_run_merge, merge_config, out_path, options, config_source, inputs, auto_rows,
                              flags.diagnostics)


def _merge_into_place(original_run_merge: Callable[..., Any], merge_config: MergeConfiguration, out_path: str,
                      options: Any, config_source: Optional[str], inputs: MergeInputs,
                      auto_rows: Optional[List[Tuple[int, str]]] = None, diagnostics: bool = True) -> None:
    config_source = config_source or merge_config.to_yaml()
    scratch = _scratch_path(out_path)
    shutil.rmtree(scratch, ignore_errors=True)  # ours (this PID), from an earlier merge in this process
    os.makedirs(scratch)
    report = None
    collector = None
    if diagnostics:
        from finmerge.diagnostics import StatsCollector

        collector = StatsCollector()  # fresh per merge: mergekit-multi runs several in one process
    try:
        with merging(MergeContext(saved_dtype=_out_dtype(merge_config), collector=collector)):
            original_run_merge(merge_config, scratch, options=options, config_source=config_source)
        ids = finish_instruct_output(scratch, inputs, merge_config, trust_remote_code=options.trust_remote_code)
        report = _write_diagnostics(scratch, collector, inputs, auto_rows) if collector else None
        if options.write_model_card:
            card = generate_card(config=merge_config, config_yaml=config_source, name=os.path.basename(os.path.abspath(out_path)))
            extra = report.card_section() if report else None
            with open(os.path.join(scratch, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card + card_section(inputs, ids, extra=extra, auto_rows=auto_rows))
        _move_into_place(scratch, out_path)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if not options.quiet:
        print(f"domain_instruct: wrote {os.path.abspath(out_path)}")
        if report:
            print(f"diagnostics: {report.verdict}")
