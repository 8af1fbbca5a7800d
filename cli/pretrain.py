"""`finmerge pretrain [CONFIG.yml] [--option VALUE ...]`: continual pretraining of the base model.

The options are those of `finmerge.pretrain.config.PretrainConfig` (a `TrainingArguments` subclass),
parsed by `transformers.HfArgumentParser`: our fields and every Trainer option, as `--name` or
`--name-with-dashes`. Values on the command line override the YAML file. Works unchanged under
`accelerate launch -m finmerge.cli.main pretrain ...`.
"""

import os

# Before torch is imported anywhere: idle OpenMP threads sleep instead of spinning, which on a shared
# machine made training several times faster. A user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import Any, Dict, List, Optional, Tuple  # noqa: E402

import click  # noqa: E402

USAGE = """Usage: finmerge pretrain [CONFIG.yml] [--OPTION VALUE ...]

  Continually pretrain a base model on domain text -> the `role: domain` checkpoint of a recipe.

  CONFIG.yml is an optional YAML file whose keys are the option names below (with underscores);
  options given here override it. Rerunning the same command resumes an interrupted run.

    finmerge pretrain recipes/pretrain-tiny.yml
    finmerge pretrain --model ./base --data corpus/ --output ./domain --max_steps 1000 --seq_len 2048
    accelerate launch --config_file recipes/accelerate/ddp-cpu.yaml -m finmerge.cli.main pretrain CONFIG.yml

  Every transformers TrainingArguments option is accepted (--optim, --gradient_accumulation_steps,
  --lr_scheduler_type, --report_to, --deepspeed, --fsdp, --torch_compile, ...).
  --trust_remote_code and --allow_pickle are accepted only here, never from a file.
"""


def help_text() -> str:
    from finmerge.pretrain.config import parser

    return USAGE + "\n" + parser().format_help()


def parse_command_line(args: List[str]) -> Tuple[Optional[str], Dict[str, Any], Dict[str, bool]]:
    """(config file, options given on the command line, the command-line-only flags)."""
    import argparse

    from finmerge.pretrain.config import RENAMED, PretrainError, parser

    config_file = None
    if args and not args[0].startswith("-"):
        config_file, args = args[0], args[1:]
    options = parser()
    for action in options._actions:  # only what was given: the YAML file supplies the rest
        action.default, action.required = argparse.SUPPRESS, False

    def refuse(message: str):
        raise PretrainError(f"finmerge pretrain: {message} (`finmerge pretrain --help` lists the options)")

    options.error = refuse
    given, rest = options.parse_known_args(args)
    if rest:
        unknown = rest[0].split("=")[0]
        old = unknown.lstrip("-").replace("-", "_")
        if old in RENAMED:
            new, why = RENAMED[old]
            refuse(f"{unknown} is now --{new} ({why})")
        refuse(f"unknown option or extra argument {rest[0]!r}")
    values = vars(given)
    flags = {name: bool(values.pop(name, False)) for name in ("trust_remote_code", "allow_pickle")}
    return config_file, values, flags


@click.command("pretrain", add_help_option=False,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def pretrain(args):
    """Continually pretrain a base model on domain text (`finmerge pretrain --help` for every option)."""
    args = list(args)
    if not args or "--help" in args or "-h" in args:
        click.echo(help_text())
        return
    from finmerge.pretrain.config import build_config
    from finmerge.safety.errors import InputError

    try:
        config_file, values, flags = parse_command_line(args)
        config = build_config(config_file, values, **flags)
        from finmerge.pretrain.output_folder import disk_full_stops_cleanly
        from finmerge.pretrain.train import run_pretraining

        with disk_full_stops_cleanly(config.output_dir):
            summary = run_pretraining(config)
    except InputError as error:
        raise click.ClickException(" ".join(str(error).split())) from None
    if not summary:  # a non-zero rank under accelerate launch
        return
    before, after = summary.get("heldout_before"), summary.get("heldout_after")
    click.echo(f"{summary['status']}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens -> {summary['output']}")
    if before and after:
        click.echo(f"held-out perplexity: {before['perplexity']:.4g} -> {after['perplexity']:.4g}")
    else:
        click.echo("held-out perplexity: not measured (no held-out block; raise --eval_fraction)")
