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
    for generic in ("plugins", "diagnostics", "pretrain", "cli", "demo", "recipes"):
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


def _fake_mergekit(root, version=None, merge_module="def run_merge(*args, **kwargs):\n    return 'merged'\n"):
    """A mergekit that finmerge cannot hook: merge_methods has no InputContract/PerNonBase."""
    package = root / "mergekit"
    (package / "merge_methods").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "merge_methods" / "__init__.py").write_text("def registered_methods():\n    return []\n")
    (package / "merge_methods" / "base.py").write_text("class MergeMethod:\n    pass\n\n\nclass BasePolicy:\n    pass\n")
    (package / "merge.py").write_text(merge_module)
    if version:
        info = root / f"mergekit-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mergekit\nVersion: {version}\n")
    return str(root)


def _run_with(path, code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **env})


def test_incompatible_mergekit_keeps_working_with_one_warning(tmp_path):
    from importlib.metadata import version

    code = ("import mergekit.merge_methods, mergekit.merge\n"
            "print(mergekit.merge.run_merge(), mergekit.merge_methods.registered_methods())")
    result = _run_with(_fake_mergekit(tmp_path), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "merged []"
    warnings = [line for line in result.stderr.splitlines() if "finmerge" in line]
    assert len(warnings) == 1, result.stderr
    assert f"mergekit {version('mergekit')}" in warnings[0] and "InputContract" in warnings[0]
    assert "domain_instruct is not available" in warnings[0] and "Traceback" not in result.stderr


def test_unsupported_mergekit_version_is_named_with_the_supported_range(tmp_path):
    code = "import mergekit.merge_methods, mergekit.merge\nprint(mergekit.merge.run_merge())"
    result = _run_with(_fake_mergekit(tmp_path, version="0.3.0"), code)
    assert result.returncode == 0 and result.stdout.strip() == "merged", result.stderr
    warnings = [line for line in result.stderr.splitlines() if "finmerge" in line]
    assert len(warnings) == 1, result.stderr
    assert "mergekit 0.3.0" in warnings[0] and "supported: mergekit>=0.1.5,<0.2" in warnings[0]


def test_failure_to_wrap_run_merge_is_a_warning(tmp_path):
    """A mergekit.merge without run_merge: importing it still works, one warning says why."""
    code = "import mergekit.merge as m\nprint(m.X)"
    root = _fake_mergekit(tmp_path, merge_module="X = 42\n")
    result = _run_with(root, code)
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr
    warnings = [line for line in result.stderr.splitlines() if "finmerge" in line]
    assert len(warnings) == 1 and "run_merge" in warnings[0], result.stderr


def test_register_says_why_domain_instruct_is_unavailable(tmp_path):
    code = "import finmerge.plugins as p\ntry:\n    p.register()\nexcept RuntimeError as e:\n    print('refused:', e)"
    result = _run_with(_fake_mergekit(tmp_path), code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:") and "InputContract" in result.stdout
