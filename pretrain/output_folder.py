"""The output folder OUT: what run it holds (run.json), whether to start, resume or stop, and its layout.

    .finmerge-output         marker: finmerge created this folder (finmerge.safety.outputs)
    run.json                 what this run is: fingerprint of settings + data contents + base model contents
    pretrain_data/           packed blocks (train.arrow, eval.arrow), report.json, ppl_before.json
    checkpoints/checkpoint-N resumable Trainer checkpoints (save_total_limit of them)
    model.safetensors, config.json, generation_config.json, tokenizer files   <- the domain checkpoint
    training_summary.json, loss_curve.png                                     <- written last

A non-empty OUT that finmerge did not create (no marker, no run.json) is refused and never cleared.
"""

import contextlib
import glob
import json
import os
import shutil
from typing import Any, Dict, Iterator, List, Optional

from finmerge.safety.disk import DiskFullError, disk_full_message, is_disk_full
from finmerge.safety.outputs import atomic_write_json, claim, is_owned, remove_owned

from .config import PretrainError, in_fingerprint

RUN_FILE = "run.json"
SUMMARY_FILE = "training_summary.json"
CHECKPOINTS = "checkpoints"
DATA_DIR = "pretrain_data"
PPL_BEFORE = "ppl_before.json"


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def stored_run(output: str) -> Optional[Dict[str, Any]]:
    """The run.json in OUT, if any (an unreadable one is refused: OUT is not touched)."""
    path = os.path.join(output, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        raise PretrainError(f"{path} is unreadable ({error}); refusing to touch {output}.") from None


def inspect_output(output: str, run: Dict[str, Any]) -> str:
    """'fresh', 'resume' or 'complete'; raises PretrainError for a folder holding something else."""
    if not os.path.exists(output):
        return "fresh"
    if not os.path.isdir(output):
        raise PretrainError(f"--output {output} exists and is not a folder.")
    stored = stored_run(output)
    if stored is None:
        if is_owned(output) or not os.listdir(output):
            return "fresh"
        raise PretrainError(f"--output {output} is not empty and holds no finmerge pretrain run (no {RUN_FILE}, "
                            f"no finmerge marker); refusing to write into it or clear it. Choose a new folder.")
    if stored.get("fingerprint") != run["fingerprint"]:
        difference = describe_difference(stored, run)
        resume = (" To resume it, put the corpus back as it was when the run started."
                  if "data contents differ" in difference else "")
        raise PretrainError(f"--output {output} holds a different run ({difference}).{resume} "
                            f"Refusing to overwrite it: use a new --output, or delete that folder to start over.")
    return "complete" if os.path.isfile(os.path.join(output, SUMMARY_FILE)) else "resume"


def describe_difference(stored: Dict[str, Any], run: Dict[str, Any]) -> str:
    old, new = stored.get("settings", {}), run["settings"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if in_fingerprint(k) and old.get(k) != new.get(k)]
    if stored.get("data") != run["data"] or stored.get("replay") != run["replay"]:
        files = (changed_sources(stored.get("data") or [], run["data"], new.get("data") or [], "data")
                 + changed_sources(stored.get("replay") or [], run["replay"], new.get("replay_data") or [], "replay-data"))
        changed.append("data contents differ" + (": " + "; ".join(files) if files else ""))
    if stored.get("model") != run["model"]:
        changed.append(f"base model contents differ ({old.get('model')} -> {new.get('model')}: the weight files' "
                       f"sha256 are not the same)")
    return "; ".join(changed) or "written by another finmerge version"


def _source_name(entry: Dict[str, Any]) -> str:
    return str(entry.get("file") or entry.get("saved_dataset") or entry.get("dataset"))


def _full_path(name: str, specs: List[str], option: str) -> str:
    """The corpus file the user has under that name (run.json keeps names only, so a moved corpus still resumes)."""
    from .sources import resolve_sources

    try:
        paths = [s.path for s in resolve_sources(list(specs), option) if os.path.basename(os.path.normpath(s.path)) == name]
    except Exception:  # the sources were resolved moments ago; a failure here must not hide the real message
        paths = []
    return paths[0] if len(paths) == 1 else name


def changed_sources(old: List[Dict[str, Any]], new: List[Dict[str, Any]], specs: List[str], option: str) -> List[str]:
    """Which corpus files differ between the run in OUT and this one: changed, added, removed."""
    before = {_source_name(e): e for e in old}
    after = {_source_name(e): e for e in new}
    found = []
    for name in sorted(set(before) | set(after)):
        if name not in before:
            found.append(f"--{option} {_full_path(name, specs, option)} was not in the run")
        elif name not in after:
            found.append(f"--{option} {name} was in the run and is gone")
        elif before[name] != after[name]:
            found.append(f"--{option} {_full_path(name, specs, option)} changed since the run started (its sha256 differs)")
    if not found and old != new:
        found.append(f"--{option} files are the same but in another order")
    return found


def start(output: str, run: Dict[str, Any]) -> None:
    """Claim OUT (marker) and record the run. Process 0 only."""
    claim(output, "pretrain output")
    atomic_write_json(os.path.join(output, RUN_FILE), run)


def forget_failed_start(output: str, created: bool) -> None:
    """A fresh run failed before training: remove what it wrote, so the corrected rerun is not refused."""
    if created and is_owned(output):
        remove_owned(output, "pretrain output")
        return
    for name in (RUN_FILE, DATA_DIR):
        path = os.path.join(output, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


def discard_unfinished(output: str) -> None:
    """After a failed write: remove what would look complete and is not (OUT without its summary).

    Incomplete checkpoints newer than the last complete one, unfinished weights of the final save, and
    its config.json go; complete checkpoints, run.json and the packed corpus stay, so a rerun resumes.
    """
    from .checkpoint import last_checkpoint

    if not is_owned(output) or os.path.isfile(os.path.join(output, SUMMARY_FILE)):
        return
    last_checkpoint(os.path.join(output, CHECKPOINTS), remove_incomplete=True)
    for pattern in ("*.safetensors", "*.safetensors.tmp", "model.safetensors.index.json", "config.json"):
        for path in glob.glob(os.path.join(output, pattern)):
            with contextlib.suppress(FileNotFoundError):  # another process of the run may remove it first
                os.remove(path)


@contextlib.contextmanager
def disk_full_stops_cleanly(output: str) -> Iterator[None]:
    """A full disk while a run writes OUT: unfinished files removed, one error naming OUT."""
    try:
        yield
    except Exception as error:
        if not (isinstance(error, DiskFullError) or is_disk_full(error, output)):
            raise
        if os.path.isdir(output):
            discard_unfinished(output)
        kept = ("its complete checkpoints are kept, and the same command resumes from the newest"
                if os.path.isdir(os.path.join(output, CHECKPOINTS)) else "no checkpoint had been written yet")
        raise DiskFullError(disk_full_message(
            output, f"the pretrain output {os.path.abspath(output)}",
            f"the run stopped, its unfinished files were removed and {kept}")) from error
