"""`finmerge`: one subcommand per step of the data flow.

corpus -> `pretrain` -> checkpoint -> `merge` -> `diagnose` -> `eval` / `sweep`; `reproduce` runs the
chain from one recipe and `demo` runs it on a generated world. Subcommands load only when run, so
`finmerge --help` pays for neither torch nor mergekit.
"""

import importlib
import os

import click

# name -> ("module:attribute" of the click command, one line for `finmerge --help`)
COMMANDS = {
    "pretrain": ("finmerge.cli.pretrain:pretrain", "Continually pretrain a base model on domain text (the domain checkpoint)."),
    "merge": ("finmerge.cli.merge:merge", "mergekit-yaml with domain_instruct's checks, instruct output and --overwrite."),
    "diagnose": ("finmerge.cli.diagnose:diagnose", "How independent the domain and instruction vectors are, without merging."),
    "eval": ("finmerge.cli.eval:eval_command", "Perplexity and chat QA for several checkpoints, one table."),
    "sweep": ("finmerge.cli.sweep:sweep", "Merge over a grid of weights and variants; the best by a metric."),
    "reproduce": ("finmerge.cli.reproduce:reproduce", "One recipe: pretrain -> merge -> diagnostics -> eval -> sweep -> report."),
    "demo": ("finmerge.cli.demo:demo", "The whole method on a generated world, offline, in minutes."),
}

# What a stopped command leaves, where it is more than "nothing unfinished was put in place".
AFTER_A_STOP = {
    "pretrain": "run the same command again to resume from the last complete checkpoint",
    "reproduce": "finished stages are kept and the stopped one is not marked done; run the same command "
                 "again to continue",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx):
        """Bad input ends in one message and exit code 1, never a traceback (FINMERGE_DEBUG=1 shows it).

        Ctrl-C and SIGTERM end in one line and exit status 130 / 143, after the command's own cleanup.
        """
        from finmerge.safety.signals import sigterm_raises, stop_message, stop_of

        try:
            with sigterm_raises():
                return self._invoke_reporting_errors(ctx)
        except BaseException as error:
            stop = stop_of(error)
            if stop is None:
                raise
            if not stop.detail:
                stop.detail = AFTER_A_STOP.get(ctx.invoked_subcommand, "")
            click.echo(f"Error: {stop_message(stop, f'finmerge {ctx.invoked_subcommand}')}", err=True)
            raise click.exceptions.Exit(stop.exit_status) from None

    def _invoke_reporting_errors(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:
            if os.environ.get("FINMERGE_DEBUG"):
                raise
            raise click.ClickException(describe_error(error)) from error

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])


def describe_error(error: BaseException) -> str:
    """One paragraph for the user: our own input errors as they are, anything else with its type."""
    from finmerge.safety.errors import InputError

    text = " ".join(str(error).split()) or repr(error)
    if isinstance(error, InputError):
        return text
    name = type(error).__name__
    hint = "; set FINMERGE_DEBUG=1 to see the traceback" if not isinstance(error, (OSError, ValueError)) else ""
    return f"{name}: {text}{hint}"


@click.group(cls=LazyGroup)
@click.version_option(package_name="finmerge")
def cli():
    """Domain instruct models without instruction data: continual pretraining + task-vector merge."""


if __name__ == "__main__":
    cli()
