"""`run_pretraining(config)`: continual pretraining as a sequence of named steps.

Run twice with the same settings, data and base model: the second run resumes from the last complete
checkpoint (or says the run is complete). Under `accelerate launch` every process runs this; process 0
writes files, the others wait for it. The output folder's layout: `finmerge.pretrain.output_folder`.
"""

import copy
import os
import time
from typing import Any, Dict, Optional

from .base_model import (check_seq_len, check_weights_format, checkpoint_dtype, load_model_config, local_folder,
                         model_identity)
from .checkpoint import finish_checkpoint, last_checkpoint
from .config import PretrainConfig, PretrainError, fingerprint, settings
from .corpus import resolve_sources, source_identity
from .distributed import check_fsdp_runs_sharded, check_fsdp_wrap_class
from .output_folder import (CHECKPOINTS, DATA_DIR, PPL_BEFORE, SUMMARY_FILE, forget_failed_start, inspect_output,
                            read_json, start, stored_run)
from .summary import heldout_note, loss_curve, perplexity, write_plot


def describe_run(config: PretrainConfig, base_folder: str, domain, replay) -> Dict[str, Any]:
    """run.json: the settings and the identities (contents) of data and base model, and their fingerprint."""
    previous = _previous_run(config.output_dir)
    identity = model_identity(base_folder, cached=previous.get("model_files") if previous else None)
    run = {"settings": settings(config), "data": source_identity(domain, config),
           "replay": source_identity(replay, config), "model": identity["identity"]}
    run["fingerprint"] = fingerprint(config, run["data"] + [{"replay": run["replay"]}], run["model"])
    run["model_files"] = {"stat": identity["stat"]}  # cache of the digests, not part of the identity
    return run


def _previous_run(output: str) -> Optional[Dict[str, Any]]:
    try:
        return stored_run(output) if os.path.isdir(output) else None
    except PretrainError:
        return None  # inspect_output reports it


def check_base_model(config: PretrainConfig, base_folder: str):
    """Everything about the base that can be wrong, before any data is read. Returns its transformers config."""
    model_config = load_model_config(config)
    check_seq_len(config, model_config)
    check_weights_format(config, base_folder)
    check_fsdp_wrap_class(config, model_config)
    check_fsdp_runs_sharded(config)
    return model_config


def load_tokenizer(config: PretrainConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise PretrainError(f"model {config.model}: cannot load its tokenizer ({error}).") from None
    if tokenizer.eos_token_id is None:
        raise PretrainError(f"the tokenizer of {config.model} has no eos_token; documents could not be separated.")
    return tokenizer


def trainer_arguments(config: PretrainConfig) -> PretrainConfig:
    """The config as the Trainer's arguments, with its checkpoints in OUT/checkpoints (OUT holds the result)."""
    args = copy.copy(config)
    args.output_dir = os.path.join(config.output_dir, CHECKPOINTS)
    return args


def pack_corpus(config: PretrainConfig, args, tokenizer, domain, replay, run: Dict[str, Any], state: str):
    """Process 0 claims OUT, records the run and packs the corpus (once); the others wait, then all read the blocks."""
    from .data import build_blocks, load_report
    from .packing import load_blocks

    output, data_dir = config.output_dir, os.path.join(config.output_dir, DATA_DIR)
    with args.main_process_first(desc="packing the corpus", local=False):
        if args.process_index == 0:
            created = not os.path.exists(output)
            start(output, run)
            if load_report(data_dir) is None:
                try:
                    build_blocks(config, tokenizer, domain, replay, data_dir)
                except BaseException:
                    if state == "fresh":  # leave no half-made run behind that would block the corrected rerun
                        forget_failed_start(output, created)
                    raise
        report = load_report(data_dir)
    if report is None:
        raise PretrainError(f"{data_dir}: the packed corpus is missing (process 0 failed to write it).")
    return report, load_blocks(os.path.join(data_dir, "train.arrow")), load_blocks(os.path.join(data_dir, "eval.arrow"))


def check_attention_request(config: PretrainConfig, model_config) -> None:
    """Refuse an attention backend the base does not declare before the corpus is read (packing can take hours)."""
    from .remote_code import causal_lm_class, check_attention

    if config.attn_implementation:
        check_attention(config.attn_implementation, causal_lm_class(config.model, model_config, config.trust_remote_code),
                        config.model, error=PretrainError)


def load_model(config: PretrainConfig, tokenizer, model_config):
    """The base in fp32 (mixed precision, if any, is the Trainer's); document isolation checked on it."""
    import torch

    from .packing import check_isolation
    from .remote_code import check_dtype, load_causal_lm

    load_kwargs = {"dtype": torch.float32, "use_safetensors": None if config.allow_pickle else True}
    if config.attn_implementation:
        load_kwargs["attn_implementation"] = config.attn_implementation
    model = load_causal_lm(config.model, model_config, config.trust_remote_code, error=PretrainError, **load_kwargs)
    check_dtype(model, torch.float32, config.model, error=PretrainError)
    if config.document_isolation:
        difference = check_isolation(model, tokenizer.eos_token_id, model.get_input_embeddings().weight.shape[0])
        if difference > 1e-3:
            backend = config.attn_implementation or f"{model.config._attn_implementation} (transformers' pick)"
            raise PretrainError(
                f"--document-isolation: {config.model} with attn_implementation={backend} ignores "
                f"restarted position_ids (a packed document's logits differ by {difference:.3g} from the document "
                f"alone). Turn document isolation off (plain causal blocks) or pick a backend that supports packed "
                f"sequences.")
    return model


def perplexity_before(trainer, eval_blocks, data_dir: str, resuming: bool):
    """Held-out perplexity of the base: measured once, kept in the data folder for a resumed run."""
    from finmerge.safety.outputs import atomic_write_json

    path = os.path.join(data_dir, PPL_BEFORE)
    if resuming and os.path.isfile(path):
        return read_json(path)
    before = perplexity(trainer, eval_blocks)
    if trainer.is_world_process_zero():
        atomic_write_json(path, before)
    return before


def train_until_done_or_stopped(trainer, resume_from: Optional[str]):
    """trainer.train(); a SIGTERM (a job scheduler's stop) saves a checkpoint at the end of the current
    step and ends the run, which the same command resumes. The other signals act as usual."""
    import signal
    import threading

    from transformers import TrainerCallback

    from finmerge.safety.signals import Stopped, sigterm_sets_flag

    stop_requested = threading.Event()

    class SaveAndStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stop_requested.is_set():
                control.should_save = control.should_training_stop = True

    trainer.add_callback(SaveAndStop())
    with sigterm_sets_flag(stop_requested):
        result = trainer.train(resume_from_checkpoint=resume_from)
    if stop_requested.is_set() and trainer.state.global_step < trainer.state.max_steps:
        folder = os.path.join(trainer.args.output_dir, f"checkpoint-{trainer.state.global_step}")
        raise Stopped(signal.SIGTERM, f"training saved {folder} (step {trainer.state.global_step} of "
                                      f"{trainer.state.max_steps}); run the same command again to resume from it")
    return result


def make_summary(config, trainer, result, resume_from, before, after, eval_blocks, report, run, started) -> Dict:
    world = trainer.args.world_size
    return {
        "status": "resumed and completed" if resume_from else "completed",
        "resumed_from": os.path.basename(resume_from) if resume_from else None,
        "model": config.model,
        "output": config.output_dir,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "tokens_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps * world * config.seq_len,
        "epochs": trainer.state.epoch,
        "world_size": world,
        "precision": "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32",
        "train_loss": result.training_loss,
        "loss_curve": loss_curve(trainer.state.log_history),
        "heldout_before": before,
        "heldout_after": after,
        "heldout_blocks": len(eval_blocks),
        "heldout_note": heldout_note(before, config.eval_fraction),
        "data": report,
        "config": run["settings"],
        "fingerprint": run["fingerprint"],
        "wall_seconds_this_invocation": round(time.time() - started, 2),
    }


def run_pretraining(config: PretrainConfig, callbacks: Optional[list] = None) -> Dict[str, Any]:
    """Train (or resume, or report a finished run) and return the training summary ({} on processes other than 0).

    One run per output folder: a second `finmerge pretrain` into it is refused while this one runs
    (the processes of one distributed run share it: process 0 holds the lock).
    """
    from .output_folder import disk_full_stops_cleanly

    config.validate()
    if config.process_index != 0:
        return _pretrain(config, callbacks)
    from finmerge.safety.locks import exclusive, lock_beside

    lock = lock_beside(config.output_dir)
    busy = (lambda holder: f"another pretraining run (process {holder}) is writing {os.path.abspath(config.output_dir)} "
                           f"now (lock {lock}); wait for it to finish, or choose another --output_dir")
    with exclusive(lock, busy), disk_full_stops_cleanly(config.output_dir):  # a full disk: one error naming OUT
        return _pretrain(config, callbacks)


def _pretrain(config: PretrainConfig, callbacks: Optional[list]) -> Dict[str, Any]:
    started = time.time()
    import torch

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    output = config.output_dir
    domain = resolve_sources(config.data, "data")
    replay = resolve_sources(config.replay_data, "replay-data") if config.replay_data else []
    base_folder = local_folder(config)
    run = describe_run(config, base_folder, domain, replay)
    state = inspect_output(output, run)
    if state == "complete":
        summary = read_json(os.path.join(output, SUMMARY_FILE))
        summary["status"] = "already complete"
        return summary

    model_config = check_base_model(config, base_folder)
    check_attention_request(config, model_config)
    tokenizer = load_tokenizer(config)
    args = trainer_arguments(config)
    report, train_blocks, eval_blocks = pack_corpus(config, args, tokenizer, domain, replay, run, state)
    model = load_model(config, tokenizer, model_config)

    from transformers import Trainer

    from .packing import BlockCollator

    trainer = Trainer(model=model, args=args, train_dataset=train_blocks, data_collator=BlockCollator(),
                      processing_class=tokenizer, callbacks=callbacks)
    resume_from = last_checkpoint(args.output_dir, remove_incomplete=args.process_index == 0)
    if args.world_size > 1:
        torch.distributed.barrier()
    data_dir = os.path.join(output, DATA_DIR)
    before = perplexity_before(trainer, eval_blocks, data_dir, resuming=resume_from is not None)
    result = train_until_done_or_stopped(trainer, resume_from)
    after = perplexity(trainer, eval_blocks)
    trainer.save_model(output)

    summary: Dict[str, Any] = {}
    if trainer.is_world_process_zero():
        save_dtype = config.save_dtype if config.save_dtype != "auto" else checkpoint_dtype(base_folder, model_config)
        finish_checkpoint(output, base_folder, save_dtype)
        summary = make_summary(config, trainer, result, resume_from, before, after, eval_blocks, report, run, started)
        write_plot(summary, output)
        from finmerge.safety.outputs import atomic_write_json

        atomic_write_json(os.path.join(output, SUMMARY_FILE), summary, sort_keys=False)  # last: marks the run complete
    if args.world_size > 1:
        torch.distributed.barrier()
    return summary
