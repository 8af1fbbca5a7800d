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
"""

import functools
import importlib
import os
import sys
from importlib.machinery import PathFinder

_TARGETS = ("mergekit.merge_methods", "mergekit.merge")


def _after_import(name: str) -> None:
    if name == "mergekit.merge_methods":
        # Importing the method module registers it; if that module is what is importing mergekit
        # right now, it registers itself when it finishes.
        method = importlib.import_module("finmerge.plugins.method")
        if hasattr(method, "register_method"):
            method.register_method()
    elif name == "mergekit.merge":
        wrap_run_merge(sys.modules["mergekit.merge"])


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
        from finmerge.plugins.run import run_domain_instruct

        return run_domain_instruct(original, merge_config, out_path, options, config_source, **kwargs)

    run_merge.__finmerge_wrapped__ = original
    merge_module.run_merge = run_merge


def install_into_loaded_mergekit(force_import: bool = False) -> None:
    """Apply the hook's work to mergekit modules already imported (or import them if asked)."""
    for name in _TARGETS:
        if force_import and name not in sys.modules:
            __import__(name)  # the finder below does the work while it imports
        if name in sys.modules:
            _after_import(name)


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
    install_into_loaded_mergekit()


_install()
