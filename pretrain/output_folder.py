"""The output folder OUT: what run it holds (run.json), whether to start, resume or stop, and its layout.

    .finmerge-output         marker: finmerge created this folder (finmerge.safety.outputs)
    run.json                 what this run is: fingerprint of settings + data contents + base model contents
    pretrain_data/           packed blocks (train.arrow, eval.arrow), report.json, ppl_before.json
    checkpoints/checkpoint-N resumable Trainer checkpoints (save_total_limit of them)
    model.safetensors, config.json, generation_config.json, tokenizer files   <- the domain checkpoint
    training_summary.json, loss_curve.png                                     <- written last

A non-empty OUT that finmerge did not create (no marker, no run.json) is refused and never cleared.
"""

import json
import os
import shutil
from typing import Any, Dict, Optional

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
        raise PretrainError(f"--output {output} holds a different run ({describe_difference(stored, run)}). "
                            f"Refusing to overwrite it: use a new --output, or delete that folder to start over.")
    return "complete" if os.path.isfile(os.path.join(output, SUMMARY_FILE)) else "resume"


def describe_difference(stored: Dict[str, Any], run: Dict[str, Any]) -> str:
    old, new = stored.get("settings", {}), run["settings"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if in_fingerprint(k) and old.get(k) != new.get(k)]
    if stored.get("data") != run["data"] or stored.get("replay") != run["replay"]:
        changed.append("data contents differ")
    if stored.get("model") != run["model"]:
        changed.append(f"base model contents differ ({old.get('model')} -> {new.get('model')}: the weight files' "
                       f"sha256 are not the same)")
    return "; ".join(changed) or "written by another finmerge version"


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
