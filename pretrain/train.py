"""Continual pretraining run: output-dir bookkeeping, data, transformers Trainer, summary.

Layout of the output folder OUT:
    run.json                 what this run is (fingerprint of settings + data contents + base model)
    pretrain_data/           packed blocks (train.arrow, eval.arrow), report.json, ppl_before.json
    checkpoints/checkpoint-N resumable Trainer checkpoints (save_total_limit of them)
    model.safetensors, config.json, generation_config.json, tokenizer files   <- the domain checkpoint
    training_summary.json, loss_curve.png                                     <- written last

Run twice with the same settings and data: the second run resumes from the last complete checkpoint
(or says the run is complete). A different run in OUT, or a non-empty OUT without run.json, is refused.
Under `accelerate launch` every process runs this; process 0 writes files, the others wait for it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import time
from typing import Any, Dict, List, Optional

from .config import PretrainConfig, PretrainError, fingerprint
from .corpus import resolve_sources, source_identity

RUN_FILE = "run.json"
SUMMARY_FILE = "training_summary.json"
PLOT_FILE = "loss_curve.png"
CHECKPOINTS = "checkpoints"
DATA_DIR = "pretrain_data"
PPL_BEFORE = "ppl_before.json"
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


# --- output folder --------------------------------------------------------------------------------

def model_identity(model: str) -> Dict[str, Any]:
    if os.path.isdir(model):
        import hashlib

        identity: Dict[str, Any] = {"local": os.path.basename(os.path.normpath(model))}
        config_path = os.path.join(model, "config.json")
        if os.path.isfile(config_path):
            with open(config_path, "rb") as handle:
                identity["config_sha256"] = hashlib.sha256(handle.read()).hexdigest()
        identity["weights"] = sorted(
            (os.path.basename(p), os.path.getsize(p))
            for p in glob.glob(os.path.join(model, "*.safetensors")) + glob.glob(os.path.join(model, "*.bin")))
        return identity
    return {"hub": model}


def inspect_output(output: str, run: Dict[str, Any]) -> str:
    """'fresh', 'resume' or 'complete'; raises PretrainError for a folder holding something else."""
    if not os.path.exists(output):
        return "fresh"
    if not os.path.isdir(output):
        raise PretrainError(f"--output {output} exists and is not a folder.")
    entries = [e for e in os.listdir(output) if not e.startswith(".")]
    if not entries:
        return "fresh"
    run_path = os.path.join(output, RUN_FILE)
    if not os.path.isfile(run_path):
        raise PretrainError(f"--output {output} is not empty and holds no finmerge pretrain run (no {RUN_FILE}); "
                            f"refusing to write into it. Choose a new folder or empty this one.")
    try:
        with open(run_path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError) as error:
        raise PretrainError(f"{run_path} is unreadable ({error}); refusing to touch {output}.") from None
    if stored.get("fingerprint") != run["fingerprint"]:
        raise PretrainError(f"--output {output} holds a different run ({describe_difference(stored, run)}). "
                            f"Refusing to overwrite it: use a new --output, or delete that folder to start over.")
    return "complete" if os.path.isfile(os.path.join(output, SUMMARY_FILE)) else "resume"


def describe_difference(stored: Dict[str, Any], run: Dict[str, Any]) -> str:
    from .config import NOT_IN_FINGERPRINT

    old, new = stored.get("settings", {}), run["settings"]
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if k not in NOT_IN_FINGERPRINT and k not in ("data", "replay_data", "model") and old.get(k) != new.get(k)]
    if stored.get("data") != run["data"] or stored.get("replay") != run["replay"]:
        changed.append("data contents differ")
    if stored.get("model") != run["model"]:
        changed.append(f"base model differs ({stored.get('settings', {}).get('model')} -> {new.get('model')})")
    return "; ".join(changed) or "fingerprint differs"


def checkpoint_is_complete(path: str) -> bool:
    """trainer_state.json is written last by Trainer._save_checkpoint; a parseable one means complete."""
    state = os.path.join(path, "trainer_state.json")
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    has_weights = glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "pytorch_model*.bin"))
    return bool(has_weights) and bool(glob.glob(os.path.join(path, "scheduler.pt")) or
                                      glob.glob(os.path.join(path, "global_step*")))


def last_checkpoint(folder: str, remove_incomplete: bool) -> Optional[str]:
    """Newest complete checkpoint; incomplete ones (a run killed while saving) are removed if asked."""
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    latest = None
    for _, path in sorted(found, reverse=True):
        if checkpoint_is_complete(path):
            latest = latest or path
        elif latest is None and remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return latest


def _write_json(path: str, payload: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, default=str)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --- model checks ---------------------------------------------------------------------------------

def load_model_config(config: PretrainConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise PretrainError(f"model {config.model} ships its own code; rerun with --trust-remote-code if you trust "
                                f"it (a config file cannot turn this on).") from None
        raise PretrainError(f"model {config.model}: {error}") from None
    except OSError as error:
        raise PretrainError(f"model {config.model}: cannot load its config.json ({error}).") from None


def check_weights_format(config: PretrainConfig) -> None:
    """Refuse a local base stored only as pickles before any data is read (unpickling can run code)."""
    import glob

    if config.allow_pickle or not os.path.isdir(config.model):
        return
    if not glob.glob(os.path.join(config.model, "*.safetensors")):
        raise PretrainError(f"model {config.model} has no *.safetensors weights; pickled .bin weights are read only "
                            "with --allow-pickle (unpickling can run code). Or convert the checkpoint to safetensors.")


def check_seq_len(config: PretrainConfig, model_config) -> None:
    for name in POSITION_LIMITS:
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and limit > 0:
            if config.seq_len > limit:
                raise PretrainError(f"--seq-len {config.seq_len} is beyond the model's maximum: {config.model} has "
                                    f"{name}={limit}. Use --seq-len {limit} or less.")
            return


def resolve_precision(config: PretrainConfig) -> str:
    import torch

    if config.precision != "auto":
        return config.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def base_weight_dtype(model: str) -> Optional[str]:
    """dtype of the base checkpoint's floating tensors, read from a safetensors header (no data read)."""
    files = sorted(glob.glob(os.path.join(model, "*.safetensors"))) if os.path.isdir(model) else []
    if not files:
        return None
    from safetensors import safe_open

    with safe_open(files[0], framework="pt") as handle:
        for key in handle.keys():
            dtype = str(handle.get_slice(key).get_dtype())
            names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
            if dtype in names:
                return names[dtype]
    return None


def convert_weights(folder: str, dtype_name: str) -> None:
    """Cast the floating tensors of the safetensors files in `folder` to dtype_name, shard by shard."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype_name)
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if all(t.dtype == dtype or not t.is_floating_point() for t in tensors.values()):
            continue
        tensors = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in tensors.items()}
        save_file(tensors, path + ".tmp", metadata=metadata)
        os.replace(path + ".tmp", path)
    config_path = os.path.join(folder, "config.json")
    saved = _read_json(config_path)
    saved["dtype"] = dtype_name
    saved.pop("torch_dtype", None)
    _write_json(config_path, saved)


def finish_checkpoint(output: str, config: PretrainConfig) -> None:
    """Make OUT's config.json match the base (Trainer flips use_cache), drop pickles, set the saved dtype."""
    for name in ("training_args.bin",):
        path = os.path.join(output, name)
        if os.path.exists(path):
            os.remove(path)
    config_path = os.path.join(output, "config.json")
    saved = _read_json(config_path)
    base_config = os.path.join(config.model, "config.json")
    if os.path.isfile(base_config):
        base = _read_json(base_config)
        for key in ("use_cache",):
            if key in base:
                saved[key] = base[key]
            else:
                saved.pop(key, None)
    if not saved.get("architectures"):
        raise PretrainError(f"{config_path} has no `architectures`; mergekit could not merge it.")
    _write_json(config_path, saved)
    dtype = config.save_dtype if config.save_dtype != "auto" else base_weight_dtype(config.model)
    if dtype:
        convert_weights(output, dtype)


# --- summary --------------------------------------------------------------------------------------

def loss_curve(log_history: List[Dict[str, Any]]) -> List[Dict[str, float]]:
    return [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
            for e in log_history if "loss" in e and "step" in e]


def plot_loss(curve: List[Dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o" if len(curve) < 40 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats/token)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _perplexity(trainer, dataset) -> Optional[Dict[str, float]]:
    """exp(mean next-token loss) over the held-out blocks. All blocks have the same length and no
    padding, so Trainer.evaluate's batch-size-weighted mean of batch losses is the per-token mean."""
    if dataset is None or len(dataset) == 0:
        return None
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="heldout")
    loss = float(metrics["heldout_loss"])
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


# --- the run --------------------------------------------------------------------------------------

def run_pretraining(config: PretrainConfig, callbacks: Optional[list] = None) -> Dict[str, Any]:
    """Train (or resume, or report a finished run) and return the training summary."""
    started = time.time()
    config.validate()
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    domain = resolve_sources(config.data, "data")
    replay = resolve_sources(config.replay_data, "replay-data") if config.replay_data else []
    run = {"settings": config.to_dict(), "data": source_identity(domain, config),
           "replay": source_identity(replay, config), "model": model_identity(config.model)}
    run = json.loads(json.dumps(run))  # compare like with like: as it reads back from run.json
    run["fingerprint"] = fingerprint(config, run["data"] + [{"replay": run["replay"]}], run["model"])
    output = config.output
    state = inspect_output(output, run)
    if state == "complete":
        summary = _read_json(os.path.join(output, SUMMARY_FILE))
        summary["status"] = "already complete"
        return summary

    model_config = load_model_config(config)
    check_seq_len(config, model_config)
    check_weights_format(config)

    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise PretrainError(f"model {config.model}: cannot load its tokenizer ({error}).") from None
    if tokenizer.eos_token_id is None:
        raise PretrainError(f"the tokenizer of {config.model} has no eos_token; documents could not be separated.")

    precision = resolve_precision(config)
    checkpoints = os.path.join(output, CHECKPOINTS)
    data_dir = os.path.join(output, DATA_DIR)
    args = TrainingArguments(
        output_dir=checkpoints,
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a share of the total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=False,
        include_num_input_tokens_seen="all",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )

    from .data import build_blocks, load_report
    from .packing import BlockCollator, check_isolation, load_blocks

    with args.main_process_first(desc="packing the corpus", local=False):
        if args.process_index == 0:
            os.makedirs(output, exist_ok=True)
            _write_json(os.path.join(output, RUN_FILE), run)
            if load_report(data_dir) is None:
                shutil.rmtree(data_dir, ignore_errors=True)
                try:
                    build_blocks(config, tokenizer, domain, replay, data_dir)
                except BaseException:
                    if state == "fresh":  # leave no half-made run behind that would block the corrected rerun
                        shutil.rmtree(output, ignore_errors=True)
                    raise
        report = load_report(data_dir)
    if report is None:
        raise PretrainError(f"{data_dir}: the packed corpus is missing (process 0 failed to write it).")
    train_blocks = load_blocks(os.path.join(data_dir, "train.arrow"))
    eval_blocks = load_blocks(os.path.join(data_dir, "eval.arrow"))

    load_kwargs = {"dtype": torch.float32, "trust_remote_code": config.trust_remote_code,
                   "use_safetensors": None if config.allow_pickle else True}
    if config.attn_implementation:
        load_kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(config.model, **load_kwargs)
    if config.document_isolation:
        difference = check_isolation(model, tokenizer.eos_token_id, model.get_input_embeddings().weight.shape[0])
        if difference > 1e-3:
            raise PretrainError(
                f"--document-isolation: {config.model} with attn_implementation={config.attn_implementation} ignores "
                f"restarted position_ids (a packed document's logits differ by {difference:.3g} from the document "
                f"alone). Turn document isolation off (plain causal blocks) or pick a backend that supports packed "
                f"sequences.")

    trainer = Trainer(model=model, args=args, train_dataset=train_blocks, data_collator=BlockCollator(),
                      processing_class=tokenizer, callbacks=callbacks)

    resume_from = last_checkpoint(checkpoints, remove_incomplete=args.process_index == 0)
    if args.world_size > 1:
        torch.distributed.barrier()
    ppl_path = os.path.join(data_dir, PPL_BEFORE)
    if resume_from is not None and os.path.isfile(ppl_path):
        before = _read_json(ppl_path)
    else:
        before = _perplexity(trainer, eval_blocks)
        if trainer.is_world_process_zero():
            _write_json(ppl_path, before)

    result = trainer.train(resume_from_checkpoint=resume_from)
    after = _perplexity(trainer, eval_blocks)
    trainer.save_model(output)

    summary: Dict[str, Any] = {}
    if trainer.is_world_process_zero():
        finish_checkpoint(output, config)
        curve = loss_curve(trainer.state.log_history)
        world = args.world_size
        summary = {
            "status": "resumed and completed" if resume_from else "completed",
            "resumed_from": os.path.basename(resume_from) if resume_from else None,
            "model": config.model,
            "output": output,
            "steps": trainer.state.global_step,
            "max_steps": trainer.state.max_steps,
            "tokens_seen": int(trainer.state.num_input_tokens_seen),
            "tokens_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps * world * config.seq_len,
            "epochs": trainer.state.epoch,
            "world_size": world,
            "precision": precision,
            "train_loss": result.training_loss,
            "loss_curve": curve,
            "heldout_before": before,
            "heldout_after": after,
            "heldout_blocks": len(eval_blocks),
            "heldout_note": None if before else (
                "no held-out block: the held-out documents hold fewer than seq_len tokens (raise eval_fraction)"
                if config.eval_fraction > 0 else "eval_fraction is 0"),
            "data": report,
            "config": {k: v for k, v in config.to_dict().items()},
            "fingerprint": run["fingerprint"],
            "wall_seconds_this_invocation": round(time.time() - started, 2),
        }
        if before and after:
            title = (f"held-out perplexity {before['perplexity']:.3g} -> {after['perplexity']:.3g} "
                     f"({summary['tokens_seen']:,} tokens, {summary['steps']} steps)")
        else:
            title = f"{summary['tokens_seen']:,} tokens, {summary['steps']} steps (no held-out text)"
        plot_loss(curve, os.path.join(output, PLOT_FILE), title)
        _write_json(os.path.join(output, SUMMARY_FILE), summary)  # last: marks the run complete
    if args.world_size > 1:
        torch.distributed.barrier()
    return summary
