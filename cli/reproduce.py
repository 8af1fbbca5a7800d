"""`finmerge reproduce RECIPE`: pretrain -> merge -> diagnostics -> eval -> sweep -> one report."""

import click


@click.command("reproduce")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--workdir", type=click.Path(file_okay=False), help="Folder the recipe's relative paths are read from and outputs written to (default: the recipe's `finmerge.workdir`, else its folder).")
@click.option("--threads", type=int, help="torch threads for pretraining (default: torch's choice).")
@click.option("--trust-remote-code", is_flag=True, help="Let the models' own Python code run, in every stage (pretrain, mergekit-yaml, eval, sweep); needed for models that ship code (e.g. nekomata). Command line only: a recipe that sets it is refused.")
@click.option("--allow-pickle", is_flag=True, help="Read models stored only as pickled .bin weights (unpickling can run code), in every stage. Command line only.")
def reproduce(recipe, workdir, threads, trust_remote_code, allow_pickle):
    """Run RECIPE's stages; stages whose settings and inputs did not change are skipped.

    RECIPE is a mergekit recipe (it still works with `mergekit-yaml`) with an optional `finmerge:`
    section naming the stages and their settings (see recipes/demo.yml). Outputs are only ever
    folders this command created; an existing folder of yours is refused, never replaced.
    """
    from finmerge.reproduce.recipe import load_reproduction
    from finmerge.reproduce.report import collect, write_report
    from finmerge.reproduce.run import flags_of, run_reproduction

    repro = load_reproduction(recipe, workdir)  # bad input: finmerge prints the message, exit code 1
    flags = flags_of(trust_remote_code, allow_pickle)
    run_reproduction(repro, threads=threads, log=lambda m: click.echo(m, err=True), **flags)
    paths = write_report(collect(repro, flags))
    click.echo(open(paths["md"], encoding="utf-8").read())
    click.echo(f"report: {paths['md']} (and {paths['json']})")
