"""`finmerge demo`: the paper's method on a generated world, on a laptop, offline."""

import os

import click


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Output folder. A rerun skips the stages whose inputs did not change.")
@click.option("--quick", is_flag=True, help="The same path on a smaller world and model (about a minute).")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice; 1 is faster on a busy machine).")
@click.option("--seed", default=0, show_default=True)
@click.option("--train-standins", is_flag=True,
              help="Train the base and instruct stand-ins even where the shipped seed-0 ones are the same models "
                   "(about 7 more minutes on 2 cores).")
def demo(out_dir, quick, threads, seed, train_standins):
    """Generate a small world, get base and instruct stand-ins (the shipped seed-0 ones, or trained), then
    continually pretrain, merge with plain mergekit-yaml, diagnose, evaluate and sweep weights: prints the
    table and writes the report."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from finmerge.demo.pipeline import run_demo

    result = run_demo(out_dir, quick=quick, threads=threads, seed=seed, train_standins=train_standins, log=lambda m: click.echo(m, err=True))
    click.echo(open(result["paths"]["md"], encoding="utf-8").read())
    click.echo(f"report: {result['paths']['md']} and {result['paths']['json']} ({result['report']['demo']['seconds']} s)")
