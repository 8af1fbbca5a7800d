"""`finmerge reproduce RECIPE`: pretrain -> merge -> diagnostics -> eval -> sweep -> one report."""

import click


@click.command("reproduce")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--workdir", type=click.Path(file_okay=False), help="Folder the recipe's relative paths are read from and outputs written to (default: the recipe's `finmerge.workdir`, else its folder).")
@click.option("--threads", type=int, help="torch threads for pretraining (default: torch's choice).")
@click.option("--trust-remote-code", is_flag=True, help="Passed to mergekit-yaml; needed for models that ship code (e.g. nekomata). Never taken from the recipe.")
def reproduce(recipe, workdir, threads, trust_remote_code):
    """Run RECIPE's stages; stages whose settings and inputs did not change are skipped.

    RECIPE is a mergekit recipe (it still works with `mergekit-yaml`) with an optional `finmerge:`
    section naming the stages and their settings (see recipes/demo.yml).
    """
    from finmerge.reproduce.recipe import ReproductionError, load_reproduction
    from finmerge.reproduce.report import collect, write_report
    from finmerge.reproduce.run import run_reproduction

    try:
        repro = load_reproduction(recipe, workdir)
    except ReproductionError as error:
        raise click.ClickException(str(error)) from error
    run_reproduction(repro, threads=threads, log=lambda m: click.echo(m, err=True),
                     merge_args=["--trust-remote-code"] if trust_remote_code else [])
    paths = write_report(collect(repro))
    click.echo(open(paths["md"], encoding="utf-8").read())
    click.echo(f"report: {paths['md']} (and {paths['json']})")
