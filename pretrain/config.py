"""The one place the `finmerge pretrain` settings are defined.

`PretrainConfig` is a dataclass whose field `metadata["help"]` texts are both the documentation of a
YAML config file and the `--help` of the command (as TRL's SFTConfig does). Any field can be set in
a YAML file and overridden on the command line (`--field-name VALUE`); the command line wins.

Pure standard library + PyYAML: importing it costs no torch, so `finmerge pretrain --help` is fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


class PretrainError(Exception):
    """A problem the user can fix (bad config, bad data, bad output dir). The message says what and where."""


def _f(default, help: str, **extra):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TXT_UNITS = ("file", "paragraph", "line")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class PretrainConfig:
    # --- model and output -----------------------------------------------------------------------
    model: Optional[str] = _f(None, "Base model to continue pretraining: local folder or Hugging Face hub id. Required.")
    output: Optional[str] = _f(None, "Output folder: the domain checkpoint (safetensors, config.json, base tokenizer), "
                                     "training_summary.json, loss_curve.png, checkpoints/ and the packed data. "
                                     "Rerunning the same command on it resumes; a different run there is refused. Required.")
    trust_remote_code: bool = _f(False, "Run the model repository's own Python code (needed by e.g. Qwen-v1/nekomata). "
                                        "Command line only: a config file cannot switch it on.", cli_only=True)
    allow_pickle: bool = _f(False, "Accept a base model stored only as pickled .bin weights (unpickling can run code). "
                                   "Default: safetensors only. Command line only.", cli_only=True)
    attn_implementation: Optional[str] = _f("sdpa", "Attention backend passed to from_pretrained (sdpa, eager, "
                                                    "flash_attention_2, ...); empty for the model's default.")
    # --- corpus -----------------------------------------------------------------------------------
    data: List[str] = _f([], "Domain corpus, repeatable: .txt/.jsonl/.parquet files, folders of them (recursive), "
                             "a `datasets` save_to_disk folder, or `dataset:NAME_OR_PATH` (datasets.load_dataset; a bare "
                             "`owner/name` that is not a local path means the same). Required.")
    text_field: str = _f("text", "Field/column holding the text in .jsonl, .parquet and datasets sources.")
    txt_document: str = _f("file", "What one document is in a .txt file: `file` (the whole file), `paragraph` "
                                   "(blank-line separated) or `line`.", choices=TXT_UNITS)
    dataset_config: Optional[str] = _f(None, "Configuration name for datasets.load_dataset sources.")
    dataset_split: str = _f("train", "Split for datasets sources.")
    streaming: bool = _f(False, "Load datasets sources with streaming=True (no full download; the corpus is read once, "
                                "cleaned and packed to disk as it streams).")
    replay_data: List[str] = _f([], "General (non-domain) text replayed against forgetting, same forms as --data. Repeatable.")
    replay_ratio: float = _f(0.0, "Share of training tokens taken from --replay-data (0 = no replay, must be < 1).")
    # --- cleaning ---------------------------------------------------------------------------------
    nfkc: bool = _f(False, "Unicode NFKC normalization (full-width to half-width etc.; common for Japanese web text).")
    normalize_whitespace: bool = _f(True, "Collapse runs of spaces/tabs, strip line ends, keep at most one blank line.")
    min_chars: int = _f(20, "Drop documents shorter than this many characters (after normalization).")
    dedup: bool = _f(True, "Drop exact duplicates (after normalization).")
    near_dedup: bool = _f(True, "Drop near-duplicates: MinHash (128 permutations) over character shingles with LSH.")
    near_dedup_threshold: float = _f(0.85, "Estimated Jaccard similarity at or above which a document is a near-duplicate "
                                           "of an earlier one.")
    shingle_chars: int = _f(5, "Character n-gram size of the near-duplicate shingles (works for text without spaces).")
    eval_fraction: float = _f(0.02, "Share of domain documents held out (chosen by a hash of the text) for perplexity "
                                    "before/after training; 0 disables.")
    max_eval_blocks: int = _f(256, "At most this many held-out blocks; further held-out documents go to training.")
    # --- packing ----------------------------------------------------------------------------------
    seq_len: int = _f(2048, "Tokens per training block. Documents end with the tokenizer's EOS and are concatenated "
                            "and cut into blocks of exactly this length (no padding). At most the model's "
                            "max_position_embeddings.")
    document_isolation: bool = _f(False, "Also give each block position_ids that restart after every EOS, so that a "
                                         "document attends only to itself (transformers' packed-sequence masks; checked "
                                         "at start, refused if the model ignores them). Off: plain causal blocks.")
    # --- training ---------------------------------------------------------------------------------
    max_steps: int = _f(-1, "Optimizer steps; -1 means --num-train-epochs passes over the packed blocks.")
    num_train_epochs: float = _f(1.0, "Passes over the data when --max-steps is -1.")
    per_device_train_batch_size: int = _f(4, "Blocks per device per micro-batch.")
    per_device_eval_batch_size: int = _f(8, "Blocks per device per held-out batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    learning_rate: float = _f(2e-5, "Peak learning rate (AdamW).")
    lr_scheduler_type: str = _f("cosine", "transformers scheduler name after the linear warmup (cosine, "
                                          "cosine_with_min_lr, linear, constant_with_warmup, ...).")
    warmup_ratio: float = _f(0.01, "Share of the steps spent in linear warmup.")
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    precision: str = _f("auto", "auto: bf16 mixed precision where the GPU supports it, fp32 otherwise; or bf16/fp16/fp32.",
                        choices=PRECISIONS)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward (less memory, ~30% slower).")
    seed: int = _f(42, "Seed for initialization-independent randomness: data order, dropout.")
    num_threads: Optional[int] = _f(None, "torch CPU threads (torch.set_num_threads); default: torch's choice.")
    # --- checkpoints and logging ------------------------------------------------------------------
    save_steps: int = _f(500, "Write a resumable checkpoint every this many steps (and at the end).")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (older ones are deleted).")
    logging_steps: int = _f(10, "Record the training loss every this many steps (loss curve).")
    save_dtype: str = _f("auto", "dtype of the saved domain checkpoint; auto = the base checkpoint's dtype, so the "
                                 "merge sees three checkpoints of one dtype.", choices=SAVE_DTYPES)

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "PretrainConfig":
        for name in ("model", "output"):
            if not getattr(self, name):
                raise PretrainError(f"`{name}` is required (config field `{name}` or --{name}).")
        if not self.data:
            raise PretrainError("`data` is required: give at least one --data FILE_OR_DIR (or `data:` in the config).")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PretrainError(f"`{f.name}` must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}.")
        checks = [
            ("seq_len", self.seq_len >= 2, "at least 2"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "at least 1"),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size >= 1, "at least 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 or at least 1"),
            ("num_train_epochs", self.num_train_epochs > 0, "positive"),
            ("replay_ratio", 0.0 <= self.replay_ratio < 1.0, "in [0, 1)"),
            ("eval_fraction", 0.0 <= self.eval_fraction < 1.0, "in [0, 1)"),
            ("near_dedup_threshold", 0.0 < self.near_dedup_threshold <= 1.0, "in (0, 1]"),
            ("shingle_chars", self.shingle_chars >= 1, "at least 1"),
            ("min_chars", self.min_chars >= 0, "at least 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("save_steps", self.save_steps >= 1, "at least 1"),
            ("save_total_limit", self.save_total_limit >= 1, "at least 1"),
            ("logging_steps", self.logging_steps >= 1, "at least 1"),
            ("max_eval_blocks", self.max_eval_blocks >= 1, "at least 1"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, "at least 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise PretrainError(f"`{name}` must be {want}; got {getattr(self, name)!r}.")
        if self.replay_ratio > 0 and not self.replay_data:
            raise PretrainError("`replay_ratio` is > 0 but no `replay_data` is given.")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that change nothing about the trained weights: a rerun may differ in them and still resume.
NOT_IN_FINGERPRINT = frozenset({
    "output", "trust_remote_code", "allow_pickle", "num_threads", "save_steps", "save_total_limit", "logging_steps",
    "per_device_eval_batch_size",
})


def fields() -> List[dataclasses.Field]:
    return list(dataclasses.fields(PretrainConfig))


def field_type(f: dataclasses.Field):
    """(base type, is_list, optional) of a field from its annotation."""
    hint = typing.get_type_hints(PretrainConfig)[f.name]
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    if origin in (list, List):
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    kind, is_list, optional = field_type(f)
    if value is None:
        if optional or is_list:
            return [] if is_list else None
        raise PretrainError(f"{where}: `{f.name}` cannot be empty.")
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce_scalar(f.name, kind, item, where) for item in items]
    return _coerce_scalar(f.name, kind, value, where)


def _coerce_scalar(name: str, kind, value: Any, where: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise PretrainError(f"{where}: `{name}` must be true or false; got {value!r}.")
    if kind is int and isinstance(value, bool) or kind is float and isinstance(value, bool):
        raise PretrainError(f"{where}: `{name}` must be a number; got {value!r}.")
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
    except (TypeError, ValueError):
        raise PretrainError(f"{where}: `{name}` must be {'an integer' if kind is int else 'a number'}; got {value!r}.") from None
    if kind is str and isinstance(value, (str, int, float)):
        return str(value)
    raise PretrainError(f"{where}: `{name}` must be a string; got {value!r}.")


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except OSError as error:
        raise PretrainError(f"cannot read config file {path}: {error.strerror or error}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise PretrainError(f"config file {path} is not valid YAML: {error}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PretrainError(f"config file {path} must be a mapping of field: value; got {type(loaded).__name__}.")
    return loaded


def build_config(config_file: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> PretrainConfig:
    """Defaults < YAML file < command-line overrides (None in overrides means "not given")."""
    by_name = {f.name: f for f in fields()}
    values: Dict[str, Any] = {}
    if config_file:
        loaded = read_yaml(config_file)
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in by_name:
                close = difflib.get_close_matches(name, list(by_name), n=2)
                hint = f" Did you mean {' or '.join(close)}?" if close else ""
                raise PretrainError(f"config file {config_file}: unknown field `{key}`.{hint}")
            if by_name[name].metadata.get("cli_only"):
                raise PretrainError(
                    f"config file {config_file}: `{key}` cannot be set in a config file (it lets the model repository "
                    f"run code on this machine). Remove it and pass --{name.replace('_', '-')} on the command line.")
            values[name] = _coerce(by_name[name], value, f"config file {config_file}")
        base_dir = os.path.dirname(os.path.abspath(config_file))
        # Relative paths in a config file are relative to the config file, as in most tools.
        for name in ("data", "replay_data"):
            if name in values:
                values[name] = [_relative_to(base_dir, item) for item in values[name]]
        for name in ("model", "output"):
            if values.get(name):
                values[name] = _relative_to(base_dir, values[name])
    for name, value in (overrides or {}).items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        values[name] = _coerce(by_name[name], list(value) if isinstance(value, tuple) else value, "command line")
    return PretrainConfig(**values).validate()


def _relative_to(base_dir: str, item: str) -> str:
    """Resolve a relative path against the config file's folder if it exists there (hub ids pass through)."""
    if item.startswith("dataset:"):
        rest = item[len("dataset:"):]
        resolved = _relative_to(base_dir, rest)
        return "dataset:" + resolved
    if os.path.isabs(item) or item.startswith("~"):
        return os.path.expanduser(item)
    candidate = os.path.join(base_dir, item)
    return candidate if os.path.exists(candidate) else item


def fingerprint(config: PretrainConfig, data_identity: List[Dict[str, Any]], model_identity: Dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights: settings, data contents, base model."""
    # Paths are left out: the identities stand for them (moving a corpus folder does not change the run).
    skip = NOT_IN_FINGERPRINT | {"model", "data", "replay_data"}
    settings = {k: v for k, v in config.to_dict().items() if k not in skip}
    payload = json.dumps({"settings": settings, "data": data_identity, "model": model_identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
