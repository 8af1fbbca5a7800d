"""`finmerge pretrain [CONFIG.yml] [--field VALUE ...]`: continual pretraining of the base model.

The options are generated from `finmerge.pretrain.config.PretrainConfig`: each field is a
`--field-name` option whose help is the field's documentation. Values on the command line override
the YAML file. Works unchanged under `accelerate launch -m finmerge.cli.main pretrain ...`.
"""

import os

# Before torch is imported anywhere: idle OpenMP threads sleep instead of spinning, which on a shared
# machine made training several times faster (shared/notes/toolchain.md). A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from finmerge.pretrain.config import PretrainError, build_config, field_type, fields  # noqa: E402

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def _options(command):
    for f in reversed(fields()):
        kind, is_list, _ = field_type(f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses_missing() else f.default_factory()
        shown = "" if default in (None, [], "") else f" [default: {str(default).lower() if isinstance(default, bool) else default}]"
        help_text = f.metadata["help"] + shown
        if kind is bool:
            decls = [flag] if f.metadata.get("cli_only") else [f"{flag}/--no-{flag[2:]}"]
            option = click.option(*decls, f.name, is_flag=True, default=None, help=help_text)
        else:
            choices = f.metadata.get("choices")
            option = click.option(flag, f.name, type=click.Choice(choices) if choices else _CLICK_TYPES[kind],
                                  multiple=is_list, default=None, help=help_text,
                                  metavar="PATH" if f.name in ("data", "replay_data", "model", "output") else None)
        command = option(command)
    return command


def dataclasses_missing():
    import dataclasses

    return dataclasses.MISSING


@click.command("pretrain", context_settings={"max_content_width": 110})
@click.argument("config_file", required=False, type=click.Path(dir_okay=False))
@_options
def pretrain(config_file, **values):
    """Continually pretrain a base model on domain text -> the `role: domain` checkpoint of a recipe.

    CONFIG_FILE is an optional YAML file whose keys are the option names below (with underscores);
    options given here override it. Rerunning the same command resumes an interrupted run.

    \b
    finmerge pretrain recipes/pretrain-tiny.yml
    finmerge pretrain --model ./base --data corpus/ --output ./domain --max-steps 1000 --seq-len 2048
    accelerate launch --config_file recipes/accelerate/ddp-cpu.yaml -m finmerge.cli.main pretrain CONFIG.yml
    """
    try:
        config = build_config(config_file, values)
        from finmerge.pretrain.train import run_pretraining

        summary = run_pretraining(config)
    except PretrainError as error:
        raise click.ClickException(str(error)) from None
    if not summary:  # a non-zero rank under accelerate launch
        return
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    click.echo(f"{summary['status']}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens -> {summary['output']}")
    if before and after:
        click.echo(f"held-out perplexity: {before['perplexity']:.4g} -> {after['perplexity']:.4g}")
    else:
        click.echo("held-out perplexity: not measured (no held-out block; raise --eval-fraction)")
