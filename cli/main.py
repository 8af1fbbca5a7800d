"""`finmerge`: one command per step of the data flow (merge now; diagnose, pretrain, eval later).

Subcommands load lazily, so `finmerge --help` does not pay for torch and mergekit.
"""

import importlib

import click

# name -> "module:attribute" of a click command
COMMANDS = {
    "demo": "finmerge.cli.demo:demo",
    "diagnose": "finmerge.cli.diagnose:diagnose",
    "eval": "finmerge.cli.eval:eval_command",
    "merge": "finmerge.cli.merge:merge",
    "pretrain": "finmerge.cli.pretrain:pretrain",
    "reproduce": "finmerge.cli.reproduce:reproduce",
    "sweep": "finmerge.cli.sweep:sweep",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup)
@click.version_option(package_name="finmerge")
def cli():
    """Domain instruct models without instruction data: continual pretraining + task-vector merge."""


if __name__ == "__main__":
    cli()
