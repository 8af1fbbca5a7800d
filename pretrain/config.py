"""The `finmerge pretrain` settings: a `transformers.TrainingArguments` subclass, as TRL's SFTConfig is.

`PretrainConfig` adds our fields (model, corpus, cleaning, packing, replay, document isolation, saved
dtype) to every Trainer option (`gradient_accumulation_steps`, `optim`, `lr_scheduler_type`,
`report_to`, `deepspeed`, `fsdp`, `torch_compile`, ...). Each field's `metadata["help"]` is its
documentation: `transformers.HfArgumentParser` turns the class into the command-line options and
their `--help`, and `finmerge.pretrain.options_doc` writes the table in docs/pretrain.md.

Values come from, in increasing priority: the defaults below < a YAML file < overrides (the command
line, or a `finmerge reproduce` recipe's `finmerge.pretrain:` section). `trust_remote_code` and
`allow_pickle` come from the command line only (keyword arguments of `build_config`).

Importing this module imports transformers (and torch); `finmerge.cli.pretrain` imports it only
when the command runs.
"""

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from transformers import HfArgumentParser, TrainingArguments

from finmerge.safety.dtypes import COMMON, SPELLINGS
from finmerge.safety.errors import InputError
from finmerge.safety.flags import refuse_cli_only


class PretrainError(InputError):
    """A problem the user can fix (bad config, bad data, bad output dir). The message says what and where."""


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TXT_UNITS = ("auto", "file", "paragraph", "line")
SAVE_DTYPES = ("auto", *COMMON)
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class DtypeName(str):
    """A dtype as the user spells it (`bf16` or `bfloat16`), kept as torch's name; an unknown one is kept as written
    for the choices check to name the allowed values."""

    def __new__(cls, value: str):
        text = str(value).strip()
        return super().__new__(cls, SPELLINGS.get(text.lower(), text))


class PrecisionName(str):
    """A mixed-precision mode as the user spells it (`bf16` or `bfloat16`), kept as the short name."""

    def __new__(cls, value: str):
        text = str(value).strip()
        return super().__new__(cls, SHORT.get(SPELLINGS.get(text.lower(), ""), text))

# Keys accepted as another spelling of a field (YAML, overrides and `--output` on the command line).
ALIASES = {"output": "output_dir"}
# Keys of finmerge < 0.2 configs that are now other fields: old key -> (new key, how the value carries over).
RENAMED = {
    "warmup_ratio": ("warmup_steps", "transformers' warmup_steps takes a share of the steps when below 1"),
    "gradient_checkpointing": ("activation_checkpointing", "transformers' new name for it"),
}


@dataclass
class PretrainConfig(TrainingArguments):
    r"""Everything `finmerge pretrain` does: our fields below, plus every `TrainingArguments` option.

    Defaults that differ from TrainingArguments are those of continual pretraining (one epoch, cosine
    schedule with 1% warmup, weight decay 0.1, loss logged every 10 steps, two checkpoints kept).
    """

    # --- model and output ------------------------------------------------------------------------
    model: Optional[str] = field(default=None, metadata={
        "help": "Base model to continue pretraining: local folder or Hugging Face hub id. Required."})
    output_dir: Optional[str] = field(default=None, metadata={
        "aliases": ["--output"],
        "help": "Output folder (also `--output`, `output:`): the domain checkpoint (safetensors, config.json, base "
                "tokenizer), training_summary.json, loss_curve.png, checkpoints/ and the packed data. Rerunning the "
                "same command on it resumes; a different run there is refused; a non-empty folder finmerge did not "
                "create is refused. Required."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the model repository's own Python code (needed by e.g. Qwen-v1/nekomata). Command line only: "
                "a config file or a recipe cannot switch it on."})
    allow_pickle: bool = field(default=False, metadata={
        "help": "Accept a base model stored only as pickled .bin weights (unpickling can run code). Default: "
                "safetensors only. Command line only."})
    attn_implementation: Optional[str] = field(default=None, metadata={
        "help": "Attention backend requested from from_pretrained (eager, sdpa, flash_attention_2, ...). Default: "
                "none requested, transformers picks (sdpa where the model declares it, else eager). A value the "
                "model does not declare is refused with the values that work. Models with their own modeling code "
                "(Qwen-v1/nekomata) do their attention themselves and declare none: leave it unset."})
    # --- corpus ----------------------------------------------------------------------------------
    data: List[str] = field(default_factory=list, metadata={
        "action": "extend",
        "help": "Domain corpus, repeatable: .txt/.jsonl/.parquet files, folders of them (recursive), a `datasets` "
                "save_to_disk folder, or `dataset:NAME_OR_PATH` (datasets.load_dataset; a bare `owner/name` that is "
                "not a local path means the same). Required."})
    text_field: str = field(default="text", metadata={
        "help": "Field/column holding the text in .jsonl, .parquet and datasets sources."})
    txt_document: str = field(default="auto", metadata={
        "choices": TXT_UNITS,
        "help": "What one document is in a .txt file: `auto` (the whole file, but one paragraph per document for "
                "files over 8 MiB, announced on stderr), `file` (the whole file), `paragraph` (blank-line separated) "
                "or `line`."})
    dataset_config: Optional[str] = field(default=None, metadata={
        "help": "Configuration name for datasets.load_dataset sources."})
    dataset_split: str = field(default="train", metadata={"help": "Split for datasets sources."})
    streaming: bool = field(default=False, metadata={
        "help": "Load datasets sources with streaming=True (no full download; the corpus is read once, cleaned and "
                "packed to disk as it streams)."})
    replay_data: List[str] = field(default_factory=list, metadata={
        "action": "extend",
        "help": "General (non-domain) text replayed against forgetting, same forms as --data. Repeatable."})
    replay_ratio: float = field(default=0.0, metadata={
        "help": "Share of training tokens taken from --replay_data (0 = no replay, must be < 1)."})
    # --- cleaning --------------------------------------------------------------------------------
    nfkc: bool = field(default=False, metadata={
        "help": "Unicode NFKC normalization (full-width to half-width etc.; common for Japanese web text)."})
    normalize_whitespace: bool = field(default=True, metadata={
        "help": "Collapse runs of spaces/tabs, strip line ends, keep at most one blank line."})
    min_chars: int = field(default=20, metadata={
        "help": "Drop documents shorter than this many characters (after normalization)."})
    dedup: bool = field(default=True, metadata={"help": "Drop exact duplicates (after normalization)."})
    near_dedup: bool = field(default=True, metadata={
        "help": "Drop near-duplicates: MinHash over character shingles with LSH."})
    near_dedup_threshold: float = field(default=0.85, metadata={
        "help": "Estimated Jaccard similarity at or above which a document is a near-duplicate of an earlier one."})
    shingle_chars: int = field(default=5, metadata={
        "help": "Character n-gram size of the near-duplicate shingles (works for text without spaces)."})
    eval_fraction: float = field(default=0.02, metadata={
        "help": "Share of domain documents held out (chosen by a hash of the text) for perplexity before/after "
                "training; 0 disables."})
    max_eval_blocks: int = field(default=256, metadata={
        "help": "At most this many held-out blocks; further held-out documents go to training."})
    # --- packing ---------------------------------------------------------------------------------
    seq_len: int = field(default=2048, metadata={
        "help": "Tokens per training block. Documents end with the tokenizer's EOS and are concatenated and cut "
                "into blocks of exactly this length (no padding). At most the model's max_position_embeddings."})
    document_isolation: bool = field(default=False, metadata={
        "help": "Also give each block position_ids that restart after every EOS, so that a document attends only "
                "to itself (transformers' packed-sequence masks; checked at start, refused if the model ignores "
                "them). Off: plain causal blocks."})
    # --- compute and saving ----------------------------------------------------------------------
    precision: PrecisionName = field(default="auto", metadata={
        "choices": PRECISIONS,
        "help": "auto: bf16 mixed precision where the GPU supports it (or what --bf16/--fp16 say), fp32 "
                "otherwise; or bf16/fp16/fp32 (also spelled bfloat16/float16/float32)."})
    num_threads: Optional[int] = field(default=None, metadata={
        "help": "torch CPU threads (torch.set_num_threads); default: torch's choice."})
    save_dtype: DtypeName = field(default="auto", metadata={
        "choices": SAVE_DTYPES,
        "help": "dtype of the saved domain checkpoint; auto = the base checkpoint's own dtype (its safetensors, "
                "else its config.json dtype), so the merge sees three checkpoints of one dtype. bf16/fp16/fp32 also "
                "accepted."})

    # --- TrainingArguments defaults changed for continual pretraining ------------------------------
    num_train_epochs: float = field(default=1.0, metadata={
        "help": "Passes over the packed blocks when --max_steps is -1."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Blocks per device per micro-batch."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "transformers scheduler name after the warmup (cosine, cosine_with_min_lr, linear, "
                "constant_with_warmup, ...)."})
    warmup_steps: float = field(default=0.01, metadata={
        "help": "Linear warmup: a number of steps, or below 1 the share of the total steps (0.01: a hundredth of them). "
                "Replaces finmerge's former `warmup_ratio`."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay."})
    save_total_limit: Optional[int] = field(default=2, metadata={
        "help": "Keep at most this many checkpoints in OUT/checkpoints (older ones are deleted)."})
    logging_steps: float = field(default=10, metadata={
        "help": "Record the training loss every this many steps (loss curve)."})
    logging_first_step: bool = field(default=True, metadata={"help": "Record the loss of the first step too."})
    include_num_input_tokens_seen: str = field(default="all", metadata={
        "help": "Count the tokens trained on (the summary's tokens_seen); `all` counts every token."})

    def __post_init__(self):
        # dtype names as the user spelled them (`bfloat16` or `bf16`), one spelling from here on
        self.precision, self.save_dtype = str(PrecisionName(self.precision)), str(DtypeName(self.save_dtype))
        # Our mixed-precision switch becomes transformers' bf16/fp16 before TrainingArguments checks them.
        if self.precision not in PRECISIONS:
            raise PretrainError(f"`precision` must be one of {', '.join(PRECISIONS)}; got {self.precision!r}.")
        if self.precision == "auto":
            if not (self.bf16 or self.fp16):
                import torch

                self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        elif (self.bf16 and self.precision != "bf16") or (self.fp16 and self.precision != "fp16"):
            raise PretrainError(f"`precision: {self.precision}` contradicts --bf16/--fp16; set one of them only.")
        else:
            self.bf16, self.fp16 = self.precision == "bf16", self.precision == "fp16"
        if not self.use_cpu:
            import torch

            # no GPU: train on the CPU (also each process of a CPU `accelerate launch`)
            self.use_cpu = not torch.cuda.is_available()
        if self.output_dir is None:  # TrainingArguments would pick "trainer_output" in the current folder
            raise PretrainError("`output_dir` is required (--output_dir/--output, or `output_dir:` in the config).")
        try:
            super().__post_init__()
        except (ValueError, TypeError) as error:
            if isinstance(error, InputError):
                raise
            raise PretrainError(f"pretrain settings: {error}") from None
        self.validate()

    def validate(self) -> "PretrainConfig":
        if not self.model:
            raise PretrainError("`model` is required (--model, or `model:` in the config).")
        if not self.data:
            raise PretrainError("`data` is required: give at least one --data FILE_OR_DIR (or `data:` in the config).")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if f.name in OUR_FIELDS and choices and getattr(self, f.name) not in choices:
                raise PretrainError(f"`{f.name}` must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}.")
        checks = [
            ("seq_len", self.seq_len >= 2, "at least 2"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "at least 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "at least 1"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 or at least 1"),
            ("num_train_epochs", self.num_train_epochs > 0, "positive"),
            ("replay_ratio", 0.0 <= self.replay_ratio < 1.0, "in [0, 1)"),
            ("eval_fraction", 0.0 <= self.eval_fraction < 1.0, "in [0, 1)"),
            ("near_dedup_threshold", 0.0 < self.near_dedup_threshold <= 1.0, "in (0, 1]"),
            ("shingle_chars", self.shingle_chars >= 1, "at least 1"),
            ("min_chars", self.min_chars >= 0, "at least 0"),
            ("max_eval_blocks", self.max_eval_blocks >= 1, "at least 1"),
            ("num_threads", self.num_threads is None or self.num_threads >= 1, "at least 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise PretrainError(f"`{name}` must be {want}; got {getattr(self, name)!r}.")
        if self.replay_ratio > 0 and not self.replay_data:
            raise PretrainError("`replay_ratio` is > 0 but no `replay_data` is given.")
        return self

    @property
    def output(self) -> str:
        """The output folder (`output_dir`)."""
        return self.output_dir


# Our fields (everything else is a TrainingArguments option).
OUR_FIELDS = ("model", "trust_remote_code", "allow_pickle", "attn_implementation", "data", "text_field",
              "txt_document", "dataset_config", "dataset_split", "streaming", "replay_data", "replay_ratio", "nfkc",
              "normalize_whitespace", "min_chars", "dedup", "near_dedup", "near_dedup_threshold", "shingle_chars",
              "eval_fraction", "max_eval_blocks", "seq_len", "document_isolation", "precision", "num_threads",
              "save_dtype")
# TrainingArguments options whose default we change (for the docs).
CHANGED_DEFAULTS = ("output_dir", "num_train_epochs", "per_device_train_batch_size", "learning_rate",
                    "lr_scheduler_type", "warmup_steps", "weight_decay", "save_total_limit", "logging_steps",
                    "logging_first_step", "include_num_input_tokens_seen")


def parser() -> HfArgumentParser:
    return HfArgumentParser(PretrainConfig, usage=argparse.SUPPRESS, add_help=False)


def _actions() -> Dict[str, argparse.Action]:
    """The parser's option for every field: its `type` and `choices` type a YAML value as the command line would."""
    actions: Dict[str, argparse.Action] = {}
    for action in parser()._actions:
        actions.setdefault(action.dest, action)  # a boolean's `--no_X` complement comes after `--X`
    return actions


def _typed(name: str, value: Any, action: argparse.Action, where: str) -> Any:
    """A value from YAML or an overrides dict, checked and converted by the parser's own type function for that
    option (so `learning_rate: 1e-4`, which YAML reads as a string, is the number the command line would give)."""
    convert = action.type
    if value is None or not callable(convert):
        return value
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_typed(name, item, argparse.Action([], name, type=convert), where) for item in items]
    is_flag = getattr(convert, "__name__", "") == "string_to_bool"
    want = {int: "an integer", float: "a number"}.get(convert, "true or false" if is_flag else "valid")
    if action.choices:
        want = f"one of {', '.join(map(str, action.choices))}"
    try:
        if is_flag and not isinstance(value, bool) and not isinstance(value, str):
            raise ValueError
        if convert in (int, float) and isinstance(value, bool):
            raise ValueError
        if convert is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if isinstance(value, (dict, list)):
            return value  # e.g. fsdp_config, deepspeed, lr_scheduler_kwargs: TrainingArguments checks them
        typed = convert(value) if isinstance(value, bool) or convert in (int, float) else convert(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise PretrainError(f"{where}: `{name}` must be {want}; got {value!r}.") from None
    if action.choices and typed not in action.choices:
        raise PretrainError(f"{where}: `{name}` must be {want}; got {value!r}.")
    return typed


def _named(values: Dict[str, Any], where: str, actions: Dict[str, argparse.Action]) -> Dict[str, Any]:
    """Keys mapped to field names (dashes, aliases, renamed keys), unknown keys refused with a suggestion."""
    named: Dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        name = ALIASES.get(name, name)
        if name in RENAMED:
            new, why = RENAMED[name]
            if new in values:
                raise PretrainError(f"{where}: `{key}` is now `{new}` ({why}); remove `{key}`.")
            print(f"finmerge pretrain: {where}: `{key}` is now `{new}` ({why}); using {new}: {value}", file=sys.stderr)
            name = new
        if name not in actions:
            close = difflib.get_close_matches(name, list(actions), n=2)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise PretrainError(f"{where}: unknown field `{key}`.{hint} (`finmerge pretrain --help` lists them all)")
        named[name] = _typed(name, value, actions[name], where)
    return named


def read_yaml(path: str) -> Dict[str, Any]:
    from finmerge.safety.yaml_files import load_yaml

    loaded = load_yaml(path, "config file", PretrainError)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise PretrainError(f"config file {path} must be a mapping of field: value; got {type(loaded).__name__}.")
    return loaded


def build_config(config_file: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None, *,
                 trust_remote_code: bool = False, allow_pickle: bool = False) -> PretrainConfig:
    """Defaults < YAML file < overrides (None in overrides means "not given"); the two code/pickle flags from the
    command line only. The entry point of `finmerge pretrain`, `finmerge reproduce` and the demo."""
    actions = _actions()
    values: Dict[str, Any] = {}
    if config_file:
        loaded = read_yaml(config_file)
        refuse_cli_only(loaded, f"config file {config_file}")
        values = _named(loaded, f"config file {config_file}", actions)
        base_dir = os.path.dirname(os.path.abspath(config_file))
        # Relative paths in a config file are relative to the config file, as in most tools.
        for name in ("data", "replay_data"):
            if name in values:
                values[name] = [_relative_to(base_dir, item) for item in values[name]]
        for name in ("model", "output_dir"):
            if values.get(name):
                values[name] = _relative_to(base_dir, values[name])
    given = {k: v for k, v in (overrides or {}).items()
             if not (v is None or (isinstance(v, (list, tuple)) and not v))}
    refuse_cli_only(given, "pretrain settings (overrides)")
    values.update(_named(given, "pretrain settings", actions))
    try:
        return PretrainConfig(**values, trust_remote_code=bool(trust_remote_code), allow_pickle=bool(allow_pickle))
    except PretrainError as error:
        where = f"config file {config_file}: " if config_file else ""
        raise PretrainError(f"{where}{error}") from None


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


# Settings that change nothing about the trained weights: a rerun may differ in them and still resume.
# Everything else (every other Trainer option included) is part of the run's identity.
NOT_IN_FINGERPRINT = frozenset({
    "output_dir", "trust_remote_code", "allow_pickle", "num_threads", "per_device_eval_batch_size",
    "local_rank", "disable_tqdm", "report_to", "run_name", "project", "resume_from_checkpoint", "ddp_timeout",
    "skip_memory_metrics", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "push_to_hub", "do_eval", "do_predict",
    "do_train", "prediction_loss_only", "batch_eval_metrics", "include_for_metrics",
})
NOT_IN_FINGERPRINT_PREFIXES = ("logging_", "log_", "save_", "hub_", "eval_", "trackio_")
# The model and data are identified by their contents, not their paths.
IDENTIFIED_BY_CONTENT = frozenset({"model", "data", "replay_data"})


def in_fingerprint(name: str) -> bool:
    if name == "save_dtype":
        return True  # the saved checkpoint's dtype is part of the result
    return (name not in NOT_IN_FINGERPRINT and name not in IDENTIFIED_BY_CONTENT
            and not name.startswith(NOT_IN_FINGERPRINT_PREFIXES))


def settings(config: PretrainConfig) -> Dict[str, Any]:
    """The config as JSON-ready values (what run.json and the summary record)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def fingerprint(config: PretrainConfig, data_identity: List[Dict[str, Any]], model_identity: Dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights: settings, data contents, base model contents."""
    kept = {k: v for k, v in settings(config).items() if in_fingerprint(k)}
    payload = json.dumps({"settings": kept, "data": data_identity, "model": model_identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
