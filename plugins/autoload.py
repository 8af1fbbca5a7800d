"""Lazy discovery: teach mergekit about `domain_instruct` without importing it at start-up.

mergekit 0.1.5 has no plugin entry points and looks merge methods up by name at plan time, so the
method must be registered in the same process before planning. A `.pth` line imports this module at
interpreter start; it only adds a meta-path finder (no torch, no mergekit). When, and only when,
`mergekit.merge_methods` or `mergekit.merge` finishes importing, the finder

- registers `domain_instruct` in mergekit's registry, and
- wraps `mergekit.merge.run_merge` so a `domain_instruct` merge is checked before it starts, written
  to a scratch folder and moved into place only once its output is a working instruct model.

`mergekit-yaml`, `python -m mergekit.scripts.run_yaml` and `mergekit-multi` all bind `run_merge`
after `mergekit.merge` is imported, so they all see the wrapper. Set FINMERGE_NO_AUTOLOAD=1 to
switch the hook off (then call `finmerge.plugins.register()` yourself).

The hook is fail-safe: it runs inside every import of mergekit in this environment, so if it cannot
do its work (a mergekit version outside the supported range, one without the API the method is built
on, a broken install), it prints one warning naming the mergekit version and the reason and leaves
mergekit as it is: every other merge method keeps working.
"""

import functools
import importlib
import os
import sys
from importlib.machinery import PathFinder

_TARGETS = ("mergekit.merge_methods", "mergekit.merge")
SUPPORTED_FALLBACK = ">=0.1.5,<0.2"  # pyproject's requirement, used if the installed metadata is missing
_state = {"unavailable": None, "warned": False}  # why the hook gave up (first reason), whether it said so


class PluginUnavailable(RuntimeError):
    """`domain_instruct` cannot be installed into this mergekit; the message says which and why."""


@functools.lru_cache(maxsize=None)  # both watched modules ask; the metadata does not change in a process
def supported_mergekit() -> str:
    """The mergekit versions finmerge supports: its own installed requirement (pyproject), e.g. `<0.2,>=0.1.5`."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        for line in metadata.requires("finmerge") or []:
            requirement = Requirement(line)
            if requirement.name == "mergekit" and requirement.marker is None:
                return ",".join(sorted((str(s) for s in requirement.specifier), key=lambda s: s[0] != ">"))
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        pass
    return SUPPORTED_FALLBACK


@functools.lru_cache(maxsize=None)
def mergekit_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_mergekit_version() -> None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version, supported = mergekit_version(), supported_mergekit()
    try:
        ok = Version(version) in SpecifierSet(supported, prereleases=True)
    except InvalidVersion:
        ok = False
    if not ok:
        raise PluginUnavailable("this mergekit version is outside the supported range")


def unavailable_message(error: BaseException) -> str:
    reason = error if isinstance(error, PluginUnavailable) else f"{type(error).__name__}: {error}"
    return (f"domain_instruct is not available: finmerge could not install it into mergekit {mergekit_version()} "
            f"(supported: mergekit{supported_mergekit()}): {' '.join(str(reason).split())}. Other merge methods "
            "work as usual; install a supported mergekit to use domain_instruct")


def _warn_once(error: BaseException) -> None:
    if not _state["warned"]:
        _state["warned"] = True
        print(f"finmerge warning: {unavailable_message(error)}", file=sys.stderr, flush=True)


def _hook(name: str) -> None:
    check_mergekit_version()
    if name == "mergekit.merge_methods":
        # Importing the method module registers it; if that module is what is importing mergekit
        # right now, it registers itself when it finishes.
        method = importlib.import_module("finmerge.plugins.method")
        if hasattr(method, "register_method"):
            method.register_method()
    elif name == "mergekit.merge":
        wrap_run_merge(sys.modules["mergekit.merge"])


def _after_import(name: str, strict: bool = False) -> None:
    """Do the hook's work for one freshly imported mergekit module; never let it break that import.

    `strict` (finmerge's own `register()`): raise PluginUnavailable instead of warning.
    """
    if _state["unavailable"] is not None and not strict:
        return  # already said why, once
    try:
        _hook(name)
    except Exception as error:
        _state["unavailable"] = _state["unavailable"] or error
        if strict:
            raise PluginUnavailable(unavailable_message(error)) from error
        _warn_once(error)


def _clean_message(error: BaseException) -> "str | None":  # no `typing` import at start-up
    """The one-paragraph message of an error our plugin raised for bad input; None for anything else."""
    from finmerge.safety.errors import InputError

    if isinstance(error, InputError) or type(error).__module__.startswith("finmerge."):
        return " ".join(str(error).split())
    return None


def _under_a_mergekit_command() -> bool:
    """True inside a click command that is not finmerge's (mergekit-yaml, mergekit-multi...).

    finmerge's own commands print errors themselves; library callers get the exception.
    """
    click = sys.modules.get("click")
    context = click.get_current_context(silent=True) if click else None
    return context is not None and not type(context.find_root().command).__module__.startswith("finmerge.")


def wrap_run_merge(merge_module) -> None:
    """Route `domain_instruct` merges through finmerge.plugins.run (idempotent)."""
    original = merge_module.run_merge
    if getattr(original, "__finmerge_wrapped__", None) is not None:
        return

    @functools.wraps(original)
    def run_merge(merge_config, out_path, options, config_source=None, **kwargs):
        from finmerge.plugins import METHOD_NAME

        if merge_config.merge_method != METHOD_NAME:
            return original(merge_config, out_path, options=options, config_source=config_source, **kwargs)
        from finmerge.plugins.run import MergeFlags, run_domain_instruct

        flags = MergeFlags.from_environment()  # how plain mergekit-yaml (and run_merge's callers) set them
        if not _under_a_mergekit_command():  # library callers handle errors and signals themselves
            return run_domain_instruct(original, merge_config, out_path, options, config_source, flags, **kwargs)
        return _run_under_mergekit_command(original, merge_config, out_path, options, config_source, flags, **kwargs)

    run_merge.__finmerge_wrapped__ = original
    merge_module.run_merge = run_merge


def _run_under_mergekit_command(original, merge_config, out_path, options, config_source, flags, **kwargs):
    """mergekit-yaml is a click command: our errors become one `Error: ...` line and exit status 1;
    Ctrl-C and SIGTERM one line and 130 / 143, after the merge removed its scratch folder and lock."""
    import click

    from finmerge.plugins.run import run_domain_instruct
    from finmerge.safety.signals import sigterm_raises, stop_message, stop_of

    try:
        with sigterm_raises():
            return run_domain_instruct(original, merge_config, out_path, options, config_source, flags, **kwargs)
    except BaseException as error:
        stop = stop_of(error)
        if stop is not None:
            click.echo(f"Error: {stop_message(stop, f'the domain_instruct merge into {out_path}')}", err=True)
            raise click.exceptions.Exit(stop.exit_status) from None
        message = _clean_message(error) if isinstance(error, Exception) else None
        if message is None or os.environ.get("FINMERGE_DEBUG"):
            raise
        raise click.ClickException(message) from error


def unwrapped_run_merge():
    """mergekit's own `run_merge`, as it was before this hook wrapped it."""
    import mergekit.merge

    return getattr(mergekit.merge.run_merge, "__finmerge_wrapped__", mergekit.merge.run_merge)


def install_into_loaded_mergekit(force_import: bool = False) -> None:
    """Apply the hook's work to mergekit modules already imported (or import them if asked).

    With `force_import` (finmerge's `register()`), a failure raises PluginUnavailable saying why.
    """
    for name in _TARGETS:
        if force_import and name not in sys.modules:
            __import__(name)  # the finder below does the work while it imports
        if name in sys.modules:
            _after_import(name, strict=force_import)


class _Loader:
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_import(self._name)

    def __getattr__(self, item):  # get_resource_reader, is_package, ... go to the real loader
        return getattr(self._loader, item)


class _Finder:
    """Finds nothing itself: wraps the normal loader of the two mergekit modules it watches."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _TARGETS:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, fullname)
        return spec


def _install() -> None:
    if os.environ.get("FINMERGE_NO_AUTOLOAD"):
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    try:
        install_into_loaded_mergekit()
    except Exception as error:  # never break interpreter start-up
        _warn_once(error)


_install()
