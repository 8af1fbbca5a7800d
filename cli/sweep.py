"""`finmerge sweep RECIPE`: the merge over a grid of weights and per-module variants, best by one metric."""

import click


def _floats(text: str, option: str):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,1,1.5", param_hint=option) from None
    if not values:
        raise click.BadParameter("give at least one weight, e.g. 0.5,1,1.5", param_hint=option)
    return values


def _read_recipe(path: str):
    """(merge recipe, finmerge.eval, finmerge.sweep). A plain mergekit recipe (no `finmerge:` section) is
    merged as `mergekit-yaml` would read it; data and settings then come from the command line."""
    import yaml

    from finmerge.reproduce.recipe import ReproductionError, load_reproduction
    from finmerge.safety.errors import InputError
    from finmerge.safety.flags import refuse_cli_only

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise InputError(f"recipe {path} is not readable YAML ({type(error).__name__}); fix the file") from None
    if isinstance(data, dict) and "merge_method" in data and not data.get("finmerge"):
        refuse_cli_only(data, path)
        return data, {}, {}
    try:
        repro = load_reproduction(path)
    except ReproductionError as error:
        raise click.ClickException(str(error)) from error
    return repro.merge, repro.eval, repro.sweep or {}


@click.command("sweep")
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for sweep.json/.md/.png and best-recipe.yml.")
@click.option("--qa", multiple=True, metavar="NAME=FILE", help="Validation chat questions (repeatable). Default: the recipe's finmerge.sweep.qa.")
@click.option("--text", type=click.Path(), help="Validation text for perplexity. Default: the recipe's finmerge.sweep.text.")
@click.option("--w-domain", help="Comma-separated domain weights, e.g. 0.5,1,1.5.")
@click.option("--w-instruct", help="Comma-separated instruct weights.")
@click.option("--variants", help="Comma-separated: paper (weights everywhere; the default), instruct_head (lm_head and final "
              "norm from the instruction vector only), instruct_tokens (the chat-control tokens' embedding and lm_head rows "
              "from the instruction vector only).")
@click.option("--metric", help="Required (here or as finmerge.sweep.metric): what to maximize, SET.KEY, e.g. finance.strict "
              "for --qa finance=...; more, comma-separated, break ties; -SET.KEY minimizes.")
@click.option("--max-new-tokens", type=int, help="Answer length limit for greedy answers.")
def sweep(recipe, out_dir, qa, text, w_domain, w_instruct, variants, metric, max_new_tokens):
    """Merge RECIPE for every (w_domain, w_instruct) and variant, evaluate each, report the best."""
    from finmerge.evaluation.run import EvalSettings
    from finmerge.sweep.run import SweepSettings, run_sweep, sweep_markdown, write_sweep

    merge, eval_section, section = _read_recipe(recipe)
    qa_sets = dict(v.split("=", 1) for v in qa) if qa else section.get("qa") or {}
    if not qa_sets and not (text or section.get("text")):
        raise click.UsageError("give validation data: --qa NAME=FILE and/or --text, or finmerge.sweep in the recipe")
    knobs = {k: v for k, v in {**eval_section, **section}.items() if k in ("max_len", "batch_size", "max_new_tokens", "turn_end")}
    if max_new_tokens:
        knobs["max_new_tokens"] = max_new_tokens
    settings = SweepSettings(eval=EvalSettings(text=text or section.get("text"), qa=qa_sets, **knobs))
    for name, value in (("w_domain", w_domain and _floats(w_domain, "--w-domain")),
                        ("w_instruct", w_instruct and _floats(w_instruct, "--w-instruct")),
                        ("variants", variants and variants.split(",")), ("metric", metric)):
        value = value or section.get(name)
        if value:
            setattr(settings, name, value)
    result = run_sweep(merge, settings, out_dir, log=lambda m: click.echo(m, err=True))
    paths = write_sweep(result, out_dir)
    click.echo(sweep_markdown(result))
    click.echo(f"best recipe: {paths['recipe']}; heatmap: {paths['png']}")
