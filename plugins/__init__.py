"""The `domain_instruct` mergekit plugin.

Importing this package is cheap (no torch, no mergekit): it runs at every interpreter start through
`finmerge-autoload.pth`. The heavy parts load only when mergekit's merge machinery is imported.
"""

METHOD_NAME = "domain_instruct"


def register() -> None:
    """Make `domain_instruct` available to mergekit by name, and make `run_merge` finish its output.

    Idempotent: calling it again (or after the import hook already did it) changes nothing. Raises
    finmerge.plugins.autoload.PluginUnavailable (a RuntimeError naming the mergekit version and the
    reason) if this mergekit cannot take the method; the import hook only warns in that case.
    """
    from finmerge.plugins.autoload import install_into_loaded_mergekit

    install_into_loaded_mergekit(force_import=True)


__all__ = ["METHOD_NAME", "register"]
