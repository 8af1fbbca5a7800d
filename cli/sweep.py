"""`finmerge sweep RECIPE`: the merge over a grid of weights and per-module variants, best by a metric and/or chosen without labels."""

import click

from finmerge.cli.options import CommaList
from finmerge.sweep.run import VARIANTS


def _read_recipe(path: str):
    """(merge recipe, finmerge.eval, finmerge.sweep, the recipe's Jinja chat template), read as `finmerge
    reproduce` reads them. A plain mergekit recipe (no `finmerge:` section) is merged as `mergekit-yaml` would
    read it; data and settings then come from the command line."""
    from types import SimpleNamespace

    from finmerge.reproduce.recipe import ReproductionError, load_reproduction
    from finmerge.reproduce.run import recipe_chat_template
    from finmerge.reproduce.settings import EvalSection, SweepSection
    from finmerge.safety.flags import refuse_cli_only
    from finmerge.safety.yaml_files import load_yaml

    data = load_yaml(path, "recipe", ReproductionError)
    if isinstance(data, dict) and "merge_method" in data and not data.get("finmerge"):
        refuse_cli_only(data, f"recipe {path}")
        return data, EvalSection(), SweepSection(), recipe_chat_template(SimpleNamespace(merge=data))
    repro = load_reproduction(path)
    return repro.merge, repro.eval, repro.sweep or SweepSection(), recipe_chat_template(repro)


@click.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for sweep.json/.md/.png and best-recipe.yml.")
@click.option("--qa", multiple=True, metavar="NAME=FILE", help="Validation chat questions (repeatable). Default: the recipe's finmerge.sweep.qa.")
@click.option("--text", type=click.Path(), help="Validation text for perplexity. Default: the recipe's finmerge.sweep.text.")
@click.option("--w-domain", type=CommaList(float, "0.5,1,1.5", required_items=True), help="Comma-separated domain weights, e.g. 0.5,1,1.5.")
@click.option("--w-instruct", type=CommaList(float, "0.5,1,1.5", required_items=True), help="Comma-separated instruct weights.")
@click.option("--variants", type=CommaList(click.Choice(VARIANTS), "paper,instruct_head", required_items=True),
              help="Comma-separated: paper (weights everywhere; the default), instruct_head (lm_head and final "
              "norm from the instruction vector only), instruct_tokens (the chat-control tokens' embedding and lm_head rows "
              "from the instruction vector only).")
@click.option("--metric", help="What picks the best point from labelled data (here or as finmerge.sweep.metric; this and/or --prompts is required): what to maximize, SET.KEY, e.g. finance.strict "
              "for --qa finance=...; more, comma-separated, break ties; -SET.KEY minimizes.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False), help="User prompts without answers (.txt, one per "
              "line, or JSONL with `question`): with --text, also make the data-free choice (no labelled answer is read). "
              "Default: the recipe's finmerge.sweep.prompts.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Answer length limit for greedy answers (default: the recipe's finmerge.eval.max_new_tokens).")
@click.option("--no-generate", is_flag=True, help="Skip greedy generation (likelihood metrics only; default: the recipe's finmerge.eval.generate).")
@click.option("--trust-remote-code", is_flag=True, help="Let the models' own Python code run (merges and evaluation); needed for models that ship code (e.g. nekomata). Command line only: a recipe that sets it is refused.")
@click.option("--allow-pickle", is_flag=True, help="Read models stored only as pickled .bin weights (unpickling can run code). Command line only.")
def sweep(recipe, out_dir, qa, text, w_domain, w_instruct, variants, metric, prompts, max_new_tokens, no_generate,
          trust_remote_code, allow_pickle):
    """Merge RECIPE for every (w_domain, w_instruct) and variant, evaluate each, report the best by --metric
    (labelled questions) and/or the data-free choice (--prompts and --text: no labelled answer read).

    Every model is asked through the recipe's own Jinja `chat_template:` when it has one, as `finmerge
    reproduce` does; the generation knobs come from the recipe's finmerge.eval section.
    """
    from finmerge.evaluation.settings import EvalData
    from finmerge.reproduce.run import eval_settings, flags_of
    from finmerge.sweep.run import SweepGrid, SweepSettings, run_sweep, sweep_markdown, write_sweep

    merge, eval_section, section, template = _read_recipe(recipe)
    data = EvalData(text=text or section.text, qa=dict(v.split("=", 1) for v in qa) if qa else section.qa)
    if not data.qa and not data.text:
        raise click.UsageError("give validation data: --qa NAME=FILE and/or --text, or finmerge.sweep in the recipe")
    flags = flags_of(trust_remote_code, allow_pickle)
    given = {"max_new_tokens": max_new_tokens, "generate": False if no_generate else None}
    evaluation = eval_settings(data, eval_section, flags, template, **{k: v for k, v in given.items() if v is not None})
    grid = {**section.model_dump(include=set(SweepGrid.model_fields), exclude_unset=True),
            **{k: v for k, v in (("w_domain", w_domain), ("w_instruct", w_instruct), ("variants", variants),
                                 ("metric", metric), ("prompts", prompts)) if v}}
    settings = SweepSettings(**grid, eval=evaluation)
    result = run_sweep(merge, settings, out_dir, log=lambda m: click.echo(m, err=True))
    paths = write_sweep(result, out_dir)
    click.echo(sweep_markdown(result))
    recipes = [f"{what}: {paths[key]}" for key, what in (("recipe", "best recipe"), ("data_free_recipe", "data-free recipe"))
               if key in paths]
    click.echo("; ".join(recipes + [f"heatmap: {paths['png']}"]))
