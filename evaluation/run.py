"""Evaluate several checkpoints on the same data and lay the results out as one table."""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from finmerge.evaluation.data import EvalDataError, load_qa, load_texts


class ModelLoadError(RuntimeError):
    """A checkpoint given to the evaluation cannot be loaded; the message names it."""


@dataclass
class EvalSettings:
    text: Optional[str] = None  # held-out domain text for perplexity
    qa: Dict[str, str] = field(default_factory=dict)  # set name -> JSONL path
    max_len: int = 512
    max_new_tokens: int = 32
    batch_size: int = 16
    chat_template_from: Optional[str] = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # accept models stored only as pickled .bin weights
    generate: bool = True
    turn_end: Optional[str] = None  # token that must end a chat answer (default: each model's own eos)
    harness_tasks: List[str] = field(default_factory=list)  # lm-evaluation-harness tasks (the `harness` extra)
    harness_include: Optional[str] = None  # folder of extra task YAMLs, e.g. japanese-lm-fin-harness's


def load_model(path: str, trust_remote_code: bool = False, allow_pickle: bool = False):
    import glob

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not allow_pickle and os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")):
        raise ModelLoadError(f"cannot load model {path}: no *.safetensors weights; pickled .bin weights are read only "
                             "with --allow-pickle (unpickling can run code)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle else True)
    except Exception as error:
        raise ModelLoadError(f"cannot load model {path}: {type(error).__name__}: {str(error).splitlines()[0]}") from error
    return model.eval(), tokenizer


def _fallback_template(paths: Sequence[str], settings: EvalSettings) -> Tuple[Optional[str], Optional[str]]:
    """The chat template used for models without one (a base model): the named or first model's."""
    from transformers import AutoTokenizer

    for path in [settings.chat_template_from] if settings.chat_template_from else paths:
        template = AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code).chat_template
        if template:
            return template, path
    return None, None


def evaluate(models: Dict[str, str], settings: EvalSettings, progress=None) -> Dict[str, Dict]:
    """{label: {metric: value}} for every model; token ids for perplexity are computed once, from the first model."""
    from finmerge.evaluation import metrics

    texts = load_texts(settings.text) if settings.text else None
    qa_sets = {name: load_qa(path) for name, path in settings.qa.items()}
    missing = [p for p in models.values() if not os.path.isdir(p)]
    if missing:
        raise ModelLoadError(f"model folder(s) not found: {', '.join(missing)}")
    template, template_source = _fallback_template(list(models.values()), settings) if qa_sets else (None, None)
    rows = None
    results = {}
    for label, path in models.items():
        model, tokenizer = load_model(path, settings.trust_remote_code, settings.allow_pickle)
        result: Dict[str, object] = {"path": path}
        if texts is not None:
            rows = rows or metrics.encode_documents(tokenizer, texts, settings.max_len)
            result["domain"] = metrics.perplexity(model, rows, settings.batch_size)
        own_template = tokenizer.chat_template
        if qa_sets and not own_template and template is None:
            raise EvalDataError(f"model {path} has no chat template and no other model has one; pass --chat-template-from")
        chat_template = None if own_template else template
        result["chat_template_from"] = path if own_template else template_source
        for name, items in qa_sets.items():
            scores = metrics.chat_likelihood(model, tokenizer, items, chat_template, settings.batch_size)
            if settings.generate:
                scores.update(metrics.chat_generation(model, tokenizer, items, chat_template, settings.max_new_tokens,
                                                      settings.batch_size * 2, settings.turn_end))
            result[name] = scores
        if settings.harness_tasks:
            from finmerge.evaluation.harness import run_harness

            result["harness"] = run_harness(path, settings.harness_tasks, settings.harness_include,
                                            batch_size=settings.batch_size, trust_remote_code=settings.trust_remote_code)
        results[label] = result
        if progress:
            progress(label)
        del model
    return results


COLUMNS = [  # (key path, header, format)
    (("domain", "perplexity"), "domain ppl", "{:.2f}"),
]
QA_COLUMNS = [
    ("choice_accuracy", "MC acc (loglik)", "{:.3f}"),
    ("answer_nll", "answer NLL", "{:.3f}"),
    ("accuracy", "gen acc", "{:.3f}"),
    ("ends_with_eos", "ends w/ eos", "{:.3f}"),
    ("strict", "gen acc & eos", "{:.3f}"),
]


def table_columns(results: Dict[str, Dict]) -> List[Tuple[Tuple[str, ...], str, str]]:
    from finmerge.evaluation.harness import primary_metric

    first = next(iter(results.values()))
    columns = [c for c in COLUMNS if c[0][0] in first]
    for name in [k for k, v in first.items() if isinstance(v, dict) and k not in ("domain", "harness")]:
        columns += [((name, key), f"{name} {header}", fmt) for key, header, fmt in QA_COLUMNS if key in first[name]]
    for task, metrics in (first.get("harness") or {}).items():
        metric = primary_metric(metrics)
        if metric:
            columns.append((("harness", task, metric), f"{task} {metric}", "{:.3f}"))
    return columns


def _cell(result: Dict, path: Tuple[str, ...], fmt: str) -> str:
    value = result
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return "n/a" if value is None else fmt.format(value)


def markdown_table(results: Dict[str, Dict], extra_columns=()) -> str:
    columns = [c for c in table_columns(results) + list(extra_columns)
               if any(_cell(r, c[0], c[2]) != "n/a" for r in results.values())]
    lines = ["| model | " + " | ".join(c[1] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, result in results.items():
        lines.append(f"| {label} | " + " | ".join(_cell(result, c[0], c[2]) for c in columns) + " |")
    return "\n".join(lines)


def write_results(results: Dict[str, Dict], out_json: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    with open(out_json, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
