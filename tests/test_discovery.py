"""The installed package: mergekit finds `domain_instruct` in any import order, start-up stays light,
and nothing generic lands in site-packages."""

import os
import subprocess
import sys
import sysconfig

import pytest

PROBE = (
    "import mergekit.merge as m; from mergekit import merge_methods; "
    "print(merge_methods.get('domain_instruct').spec.name, hasattr(m.run_merge, '__finmerge_wrapped__'))"
)


def _python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("first", [
    "", "import mergekit.merge_methods", "import mergekit.scripts.run_yaml", "import finmerge.plugins.method",
    "import finmerge.plugins.run", "import finmerge.cli.merge", "import mergekit.plan",
])
def test_any_import_order_registers_and_wraps(first):
    assert _python(f"{first}\n{PROBE}") == "domain_instruct True"


def test_interpreter_start_imports_neither_torch_nor_mergekit():
    out = _python("import sys; print('torch' in sys.modules, 'mergekit' in sys.modules, 'finmerge.plugins.autoload' in sys.modules)")
    assert out == "False False True"


def test_hook_can_be_switched_off_and_register_is_idempotent():
    code = (
        "import mergekit.merge as m; from mergekit import merge_methods\n"
        "names = lambda: [x.spec.name for x in merge_methods.registered_methods()]\n"
        "print('domain_instruct' in names())\n"
        "import finmerge.plugins; finmerge.plugins.register(); finmerge.plugins.register()\n"
        "print(names().count('domain_instruct'), hasattr(m.run_merge, '__finmerge_wrapped__'))"
    )
    assert _python(code, FINMERGE_NO_AUTOLOAD="1").splitlines() == ["False", "1 True"]


def test_installed_layout_is_namespaced():
    site = sysconfig.get_paths()["purelib"]
    assert os.path.isfile(os.path.join(site, "finmerge-autoload.pth"))
    for generic in ("plugins", "pretrain", "cli", "demo", "recipes"):
        assert not os.path.exists(os.path.join(site, generic)), generic
        assert os.path.isdir(os.path.join(site, "finmerge", generic)), generic


def test_every_subcommand_loads_and_help_imports_no_torch():
    import click

    from finmerge.cli.main import COMMANDS, cli

    for name in COMMANDS:
        assert isinstance(cli.get_command(None, name), click.Command), name
    out = _python("import sys\nfrom click.testing import CliRunner\nfrom finmerge.cli.main import cli\n"
                  "r = CliRunner().invoke(cli, ['--help'])\nprint(r.exit_code, 'torch' in sys.modules, all(n in r.output for n in %r))" % list(COMMANDS))
    assert out == "0 False True"
