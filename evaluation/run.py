"""Evaluate several checkpoints on the same data and lay the results out as one table."""

import os
from typing import Dict, List, Optional, Sequence, Tuple

from finmerge.evaluation.data import EvalDataError, load_qa, load_texts
from finmerge.evaluation.settings import EvalSettings
from finmerge.safety.errors import InputError


class ModelLoadError(InputError):
    """A checkpoint given to the evaluation cannot be loaded; the message names it."""


def load_model(path: str, trust_remote_code: bool = False, allow_pickle: bool = False, device: str = "cpu",
               dtype: str = "float32"):
    import glob

    from transformers import AutoConfig, AutoTokenizer

    from finmerge.evaluation.devices import load_kwargs, place
    from finmerge.pretrain.remote_code import check_dtype, load_causal_lm

    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")) and not glob.glob(os.path.join(path, "*.bin")):
        raise ModelLoadError(f"cannot load model {path}: the folder holds no weights (*.safetensors); point at a complete "
                             "checkpoint folder")
    if not allow_pickle and os.path.isdir(path) and not glob.glob(os.path.join(path, "*.safetensors")):
        raise ModelLoadError(f"cannot load model {path}: no *.safetensors weights; pickled .bin weights are read only "
                             "with --allow-pickle (unpickling can run code)")
    kwargs = load_kwargs(device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = load_causal_lm(path, model_config, trust_remote_code, error=ModelLoadError,
                               use_safetensors=None if allow_pickle else True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load model {path}: {type(error).__name__}: {first_line}; check that the folder "
                             "holds a transformers checkpoint (config.json, tokenizer, weights)") from error
    check_dtype(model, kwargs["dtype"], path, error=ModelLoadError)
    return place(model, device).eval(), tokenizer


def _template_of(path: str, settings: EvalSettings) -> Optional[str]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=settings.trust_remote_code).chat_template
    except Exception as error:
        raise ModelLoadError(f"cannot read the tokenizer of {path} for its chat template: {type(error).__name__}: "
                             f"{(str(error).splitlines() or [''])[0]}") from error


def _shared_template(paths: Sequence[str], settings: EvalSettings) -> Tuple[Optional[str], Optional[str], bool]:
    """(template, where it came from, whether EVERY model is asked through it).

    A given template (`chat_template`, e.g. a recipe's) or `--chat-template-from MODEL` applies to
    every model, so base, domain, instruct and merged see the same prompt format. Otherwise each
    model uses its own, and models without one (a base model) borrow the first model's that has one.
    """
    if settings.chat_template:
        return settings.chat_template, "given template", True
    if settings.chat_template_from:
        template = _template_of(settings.chat_template_from, settings)
        if not template:
            raise EvalDataError(f"--chat-template-from {settings.chat_template_from}: that model has no chat template")
        return template, settings.chat_template_from, True
    for path in paths:
        template = _template_of(path, settings)
        if template:
            return template, path, False
    return None, None, False


def _progress_total(rows: Optional[List], qa_sets: Dict, settings: EvalSettings) -> int:
    total = len(rows or [])
    for items in qa_sets.values():
        total += sum(1 + len(item.choices or ()) for item in items) + (len(items) if settings.generate else 0)
    return total


def _own_metrics(result: Dict, label: str, path: str, texts, text_bytes, qa_sets, settings: EvalSettings,
             template: Optional[str], template_source: Optional[str], for_all: bool) -> None:
    """Held-out text and chat QA for one model, loaded here and released when this returns."""
    from tqdm.auto import tqdm

    from finmerge.evaluation import metrics

    model, tokenizer = load_model(path, settings.trust_remote_code, settings.allow_pickle, settings.device, settings.dtype)
    result.update(dtype=str(next(model.parameters()).dtype).replace("torch.", ""), device=str(next(model.parameters()).device))
    rows = metrics.encode_documents(tokenizer, texts, settings.max_len) if texts is not None else None
    bar = tqdm(total=_progress_total(rows, qa_sets, settings), desc=label, unit="seq",
               disable=not settings.show_progress, leave=False)
    own_template = tokenizer.chat_template
    if rows is not None:
        chat_tokens = metrics.chat_control_token_ids(tokenizer, own_template if own_template and not for_all else template)
        result["domain"] = metrics.perplexity(model, rows, settings.batch_size, text_bytes, bar.update, chat_tokens)
    if qa_sets and not for_all and not own_template and template is None:
        raise EvalDataError(f"model {path} has no chat template and no other model has one; pass --chat-template-from")
    use_own = bool(own_template) and not for_all
    chat_template = None if use_own else template
    if qa_sets:
        result["chat_template_from"] = path if use_own else template_source
        result["chat_template"] = "own" if use_own else (template_source if template_source == "given template"
                                                         else f"from {template_source}")
    for name, items in qa_sets.items():
        scores = metrics.chat_likelihood(model, tokenizer, items, chat_template, settings.batch_size, bar.update)
        if settings.generate:
            scores.update(metrics.chat_generation(model, tokenizer, items, chat_template, settings.max_new_tokens,
                                                  settings.batch_size * 2, settings.turn_end, bar.update))
        result[name] = scores
    bar.close()


def without_answers(result: Dict) -> Dict:
    """One model's results without the per-question answers (for tables and sweeps; eval.json keeps them)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "answers"} if isinstance(v, dict) else v) for k, v in result.items()}


def answer_prompts(path: str, prompts: List[str], settings: EvalSettings) -> List[Tuple[str, bool]]:
    """The model's greedy answers to `prompts`, asked as `evaluate` asks (the given template, else its
    own): (answer, whether it ended the turn) per prompt."""
    from finmerge.evaluation import metrics
    from finmerge.evaluation.devices import free

    template, _, _ = _shared_template([path], settings)
    model, tokenizer = load_model(path, settings.trust_remote_code, settings.allow_pickle, settings.device, settings.dtype)
    if template is None:
        raise EvalDataError(f"model {path} has no chat template: give the recipe's chat_template or --chat-template-from")
    try:
        return metrics.greedy_answers(model, tokenizer, prompts, template, settings.max_new_tokens,
                                      settings.batch_size * 2, settings.turn_end)
    finally:
        del model
        free()


def evaluate(models: Dict[str, str], settings: EvalSettings, progress=None) -> Dict[str, Dict]:
    """{label: {metric: value}} for every model, one model in memory at a time.

    Each model reads the held-out text through its own tokenizer; bits per byte compares them.
    """
    from finmerge.evaluation.devices import check_device, free

    texts = load_texts(settings.text) if settings.text else None
    text_bytes = sum(len(t.encode("utf-8")) for t in texts) if texts else None
    qa_sets = {name: load_qa(path) for name, path in settings.qa.items()}
    missing = [p for p in models.values() if not os.path.isdir(p)]
    if missing:
        raise ModelLoadError(f"model folder(s) not found: {', '.join(missing)}")
    check_device(settings.device)
    fin = None
    if settings.fin_harness:
        from finmerge.evaluation.fin_harness import FinHarness

        fin = FinHarness(settings.fin_harness, settings.fin_tasks or None, settings.fin_prompt, settings.chabsa_archive)
    template, template_source, for_all = _shared_template(list(models.values()), settings) if qa_sets else (None, None, False)
    results = {}
    try:
        if fin:
            fin.prepare()
        for label, path in models.items():
            result: Dict[str, object] = {"path": path}
            if texts is not None or qa_sets:  # the harnesses below load their own copy
                _own_metrics(result, label, path, texts, text_bytes, qa_sets, settings, template, template_source, for_all)
                free()  # one model in memory at a time
            if settings.harness_tasks:
                from finmerge.evaluation.harness import run_harness

                result["harness"] = run_harness(path, settings.harness_tasks, settings.harness_include,
                                                batch_size=settings.batch_size, trust_remote_code=settings.trust_remote_code,
                                                device=settings.device, dtype=settings.dtype)
            if fin:
                result["fin_harness"] = fin.run(path, batch_size=settings.batch_size, device=settings.device,
                                                dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)
                free()
            results[label] = result
            if progress:
                progress(label)
    finally:
        if fin:
            fin.cleanup()
    return results


COLUMNS = [  # (key path, header, format)
    (("domain", "bits_per_byte"), "domain bits/byte", "{:.4f}"),
    (("domain", "plain_bits_per_byte"), "plain bits/byte", "{:.4f}"),
    (("domain", "perplexity"), "domain ppl (own tokens)", "{:.2f}"),
    (("chat_template",), "chat template", "{}"),
]
NOTES = {
    "domain": "bits/byte = summed NLL in bits / UTF-8 bytes of the held-out text: comparable across models. "
              "Plain bits/byte: the same with the chat template's control tokens (never in plain text) left out of each "
              "prediction. Perplexity is per token of each model's OWN tokenizer: compare it only between models sharing "
              "a vocabulary.",
    "fin_harness": "japanese-lm-fin-harness (0-shot, lm-evaluation-harness `hf` model): chabsa macro-F1 (2-class adjusted), "
                   "other tasks accuracy; avg = mean of the tasks shown.",
}
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
    for name in [k for k, v in first.items() if isinstance(v, dict) and k not in ("domain", "harness", "fin_harness")]:
        columns += [((name, key), f"{name} {header}", fmt) for key, header, fmt in QA_COLUMNS if key in first[name]]
    for task, metrics in (first.get("harness") or {}).items():
        metric = primary_metric(metrics)
        if metric:
            columns.append((("harness", task, metric), f"{task} {metric}", "{:.3f}"))
    fin = first.get("fin_harness") or {}
    for task, metric in (fin.get("metrics") or {}).items():
        columns.append((("fin_harness", "scores", task), f"{task} {metric}", "{:.4f}"))
    if fin:
        columns.append((("fin_harness", "average"), f"fin avg (prompt {fin.get('prompt')})", "{:.4f}"))
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
    shown = {c[0][0] for c in columns}
    notes = [f"- {text}" for key, text in NOTES.items() if key in shown]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_results(results: Dict[str, Dict], out_json: str) -> None:
    from finmerge.safety.outputs import atomic_write_json

    os.makedirs(os.path.dirname(os.path.abspath(out_json)), exist_ok=True)
    atomic_write_json(out_json, results, sort_keys=False)  # keep the models in the order given
