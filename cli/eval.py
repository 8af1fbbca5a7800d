"""`finmerge eval MODEL...`: the same held-out data through several checkpoints, one table."""

import os

import click

from finmerge.cli.options import CommaList, Dtype
from finmerge.safety.dtypes import COMMON


def _label_path(value: str):
    label, sep, path = value.partition("=")
    return (label, path) if sep and not os.path.isdir(value) else (os.path.basename(os.path.normpath(value)), value)


@click.command("eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--text", type=click.Path(), help="Held-out domain text (.txt, documents separated by blank lines, or .jsonl with 'text') for perplexity.")
@click.option("--qa", multiple=True, metavar="[NAME=]FILE",
              help="JSONL of chat questions {question, answer[, choices]}; repeatable, e.g. --qa finance=fin.jsonl.")
@click.option("--out", "out_json", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--max-len", default=512, show_default=True, help="Window length (tokens) for perplexity.")
@click.option("--max-new-tokens", default=32, show_default=True, help="Answer length limit for greedy chat answers.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--no-generate", is_flag=True, help="Skip greedy generation (likelihood metrics only).")
@click.option("--chat-template-from", type=click.Path(), help="Ask EVERY model through this model's chat template (default: each model its own; a model without one borrows the first model's that has one). The table says which template each model used.")
@click.option("--turn-end", help="Token that must end a chat answer, e.g. '<|im_end|>' (default: each model's own eos).")
@click.option("--harness-tasks", type=CommaList(str, "hellaswag,arc_easy"), default="", help="Comma-separated lm-evaluation-harness tasks, run 0-shot on every model (pip install 'finmerge[harness]').")
@click.option("--harness-include", type=click.Path(exists=True, file_okay=False), help="Folder of extra lm-eval task YAMLs (e.g. japanese-lm-fin-harness's tasks).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps", "auto"]), default="cpu", show_default=True,
              help="Where the models run; auto spreads a model over the available GPUs/CPU (accelerate's device_map=\"auto\").")
@click.option("--dtype", type=Dtype(("auto", *COMMON)), default="float32", show_default=True,
              help="Weights' precision, spelled as torch or mergekit do or short (bfloat16 = bf16, float16 = fp16, "
                   "float32 = fp32); auto keeps the checkpoint's own. Scores are computed in fp32 either way.")
@click.option("--fin-harness", type=click.Path(), metavar="CLONE",
              help="Run japanese-lm-fin-harness (the paper's benchmark) from a local clone of "
                   "github.com/pfnet-research/japanese-lm-fin-harness. This IMPORTS AND RUNS PYTHON FROM THE CLONE "
                   "(its dataset scripts and prompt functions): pass it only for a clone you trust.")
@click.option("--fin-tasks", type=CommaList(str, "chabsa,fp2"), default="", help="Comma-separated subset of chabsa,cma_basics,cpa_audit,fp2,security_sales_1 (default: all five).")
@click.option("--fin-prompt", help="Prompt version of the harness's task configs, e.g. 1.0-0.2.1 or default (default: 1.0-0.2.1, the leaderboard's for the nekomata-14b-pfn-qfin models).")
@click.option("--chabsa-archive", type=click.Path(), help="The chABSA archive (.zip) from https://www.kaggle.com/api/v1/datasets/download/takahirokubo0/chabsa, needed for the chabsa task.")
@click.option("--threads", type=int, help="torch threads (default: torch's choice).")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with the model repositories (off by default).")
@click.option("--allow-pickle", is_flag=True, help="Accept models stored only as pickled .bin weights (unpickling can run code).")
def eval_command(models, text, qa, out_json, max_len, max_new_tokens, batch_size, no_generate, chat_template_from, turn_end,
                 harness_tasks, harness_include, device, dtype, fin_harness, fin_tasks, fin_prompt, chabsa_archive, threads,
                 trust_remote_code, allow_pickle):
    """Evaluate MODELS (folders, optionally LABEL=FOLDER) on held-out text and chat QA.

    Prints one table (Markdown) and, with --out, writes the numbers as JSON.
    """
    import torch

    from finmerge.evaluation.data import EvalDataError
    from finmerge.evaluation.harness import HarnessUnavailable
    from finmerge.evaluation.run import EvalSettings, ModelLoadError, evaluate, markdown_table, write_results

    if not text and not qa and not harness_tasks and not fin_harness:
        raise click.UsageError("give --text, --qa, --harness-tasks and/or --fin-harness")
    if threads:
        torch.set_num_threads(threads)
    qa_sets = dict(_label_path(v) if "=" in v else (os.path.splitext(os.path.basename(v))[0], v) for v in qa)
    settings = EvalSettings(text=text, qa=qa_sets, max_len=max_len, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            chat_template_from=chat_template_from, trust_remote_code=trust_remote_code, generate=not no_generate,
                            turn_end=turn_end, harness_tasks=harness_tasks,
                            harness_include=harness_include, allow_pickle=allow_pickle, device=device, dtype=dtype,
                            fin_harness=fin_harness, fin_tasks=fin_tasks,
                            fin_prompt=fin_prompt, chabsa_archive=chabsa_archive)
    if out_json:  # refused before hours of evaluation, not after
        from finmerge.safety.outputs import check_output_location

        inputs = [p for _, p in (_label_path(m) for m in models)] + list(qa_sets.values()) + [text, fin_harness, chabsa_archive]
        check_output_location(out_json, inputs, what="--out")
    try:
        results = evaluate(dict(_label_path(m) for m in models), settings,
                           progress=lambda label: click.echo(f"evaluated {label}", err=True))
    except (EvalDataError, ModelLoadError, HarnessUnavailable) as error:
        raise click.ClickException(str(error)) from error
    click.echo(markdown_table(results))
    if out_json:
        write_results(results, out_json)
        click.echo(f"results: {out_json}")
