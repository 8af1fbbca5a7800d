"""`finmerge reproduce`: all stages from one recipe, skipped on a rerun, redone when an input
changes, and clear errors for a bad recipe."""

import json
import re
import os
import subprocess
import sys

import pytest
import yaml

from finmerge.demo.tiny_models import CHATS, CORPUS, recipe
from merge_helpers import assert_close_state, expected_merge, tensors
from finmerge.reproduce.recipe import ReproductionError, load_reproduction
from finmerge.reproduce.report import collect, write_report
from finmerge.reproduce.run import run_reproduction


def _workdir(tiny_family, tmp_path, domain="./domain", **section):
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    merge = recipe(tiny_family)
    merge["models"][0]["model"] = domain
    merge["finmerge"] = {
        "stages": ["pretrain", "merge", "eval"],
        "pretrain": {"data": ["./corpus.txt"], "txt_document": "paragraph", "seq_len": 32, "max_steps": 6,
                     "per_device_train_batch_size": 2, "learning_rate": 1e-3, "eval_fraction": 0.2, "min_chars": 5,
                     "near_dedup": False, "dedup": False, "save_steps": 3, "logging_steps": 1},
        "eval": {"text": "./corpus.txt", "qa": {"chat": "./qa.jsonl"}, "max_new_tokens": 12},
        **section,
    }
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(merge, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_all_stages_then_rerun_skips_them(tiny_family, tmp_path):
    path = _workdir(tiny_family, tmp_path)
    repro = load_reproduction(path)
    first = run_reproduction(repro, log=lambda m: None)
    assert first["stages"] == {"pretrain": False, "merge": False, "eval": False}
    # the real merge stage (mergekit-yaml moves its folder into place): the marker is there afterwards
    assert (tmp_path / "merged" / ".finmerge-output").is_file() and (tmp_path / "domain" / ".finmerge-output").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    report = collect(repro)
    assert set(report["results"]) == {"base", "domain", "instruct", "merged"}
    assert report["results"]["merged"]["chat"]["accuracy"] is not None
    assert report["diagnostics"]["overall"]["cos"] is not None
    assert report["pretrain"]["steps"] == 6
    paths = write_report(report)
    assert "| merged |" in open(paths["md"]).read()

    second = run_reproduction(load_reproduction(path), log=lambda m: None)
    assert second["stages"] == {"pretrain": True, "merge": True, "eval": True}

    # A changed evaluation set redoes only the evaluation.
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": CHATS[0][0], "answer": CHATS[0][1]}) + "\n")
    third = run_reproduction(load_reproduction(path), log=lambda m: None)
    assert third["stages"] == {"pretrain": True, "merge": True, "eval": False}


@pytest.mark.slow
def test_the_reproduction_recipe_still_works_with_plain_mergekit_yaml(tiny_family, tmp_path):
    path = _workdir(tiny_family, tmp_path)
    data = yaml.safe_load(open(path))
    data["models"][0]["model"] = tiny_family.domain  # no pretrain stage here: an existing domain model
    (tmp_path / "plain.yml").write_text(yaml.safe_dump(data))
    mergekit_yaml = os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
    subprocess.run([mergekit_yaml, str(tmp_path / "plain.yml"), str(tmp_path / "out")], check=True, capture_output=True, cwd=tmp_path)
    assert_close_state(tensors(tmp_path / "out"), expected_merge(tiny_family))  # the recipe's merge, not just a file


def test_an_interrupted_stage_is_redone(tiny_family, tmp_path):
    from finmerge.reproduce.stages import Stages

    stages, calls = Stages(str(tmp_path), log=lambda m: None), []

    def crash():
        calls.append("crash")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run("merge", "k1", crash)
    assert stages.run("merge", "k1", lambda: calls.append("ok")) is True
    assert stages.run("merge", "k1", lambda: calls.append("again")) is False
    assert calls == ["crash", "ok"]


@pytest.mark.parametrize("section,message", [
    ({"stages": ["pretrain", "merge", "publish"]}, r"finmerge\.stages: unknown value\(s\) 'publish'"),
    ({"colour": "blue"}, r"finmerge: unknown key\(s\) colour"),
    ({"eval": {"text": "./missing.txt"}}, r"file .*missing\.txt does not exist"),
    ({"eval": {"qa": {"chat": "./qa.jsonl"}, "temperature": 0}}, r"finmerge\.eval: unknown key\(s\) temperature"),
    ({"stages": ["merge", "eval"]}, r"domain model .*domain does not exist \(add the `pretrain` stage"),
    ({"stages": ["pretrain", "merge", "sweep"]}, r"stage `sweep` needs a `finmerge.sweep:` section"),
])
def test_bad_reproduction_recipes(tiny_family, tmp_path, section, message):
    path = _workdir(tiny_family, tmp_path, **section)
    with pytest.raises(ReproductionError, match=message):
        load_reproduction(path)


def test_missing_recipe_and_cli_error_is_clean(tmp_path):
    with pytest.raises(ReproductionError, match="does not exist"):
        load_reproduction(str(tmp_path / "nope.yml"))
    finmerge = os.path.join(os.path.dirname(sys.executable), "finmerge")
    result = subprocess.run([finmerge, "reproduce", str(tmp_path / "nope.yml")], capture_output=True, text=True)
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_pretrain_data_paths_are_read_from_the_workdir_whatever_the_current_folder(tiny_family, tmp_path, monkeypatch):
    """The pretrain stage's key must see the corpus itself, so an edited corpus redoes the stage."""
    from finmerge.reproduce.stages import stage_key

    path = _workdir(tiny_family, tmp_path)
    monkeypatch.chdir("/")
    repro = load_reproduction(path)
    assert repro.pretrain["data"] == [str(tmp_path / "corpus.txt")]
    before = stage_key({}, repro.pretrain["data"])
    (tmp_path / "corpus.txt").write_text("\n\n".join(CORPUS * 11))
    assert stage_key({}, repro.pretrain["data"]) != before


# --- flags come from the command line only, and reach every stage ----------------------------------------

EVIL_CONFIG = """
import pathlib
pathlib.Path({sentinel!r}).write_text("the model repository's code ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "finmerge-evil"
"""


def _evil_base(tiny_family, tmp_path):
    """A copy of the tiny base whose configuration_evil.py leaves a file behind when it is imported."""
    import shutil

    model, sentinel = tmp_path / "evil-base", tmp_path / "code-ran.txt"
    shutil.copytree(tiny_family.base, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="finmerge-evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(EVIL_CONFIG.format(sentinel=str(sentinel)))
    return model, sentinel


def test_a_recipe_cannot_turn_on_remote_code_for_pretraining(tiny_family, tmp_path):
    """`finmerge: pretrain: trust_remote_code: true` and no flag ran the base's code."""
    from tests.bad_input import assert_clean_failure, command, run, snapshot

    model, sentinel = _evil_base(tiny_family, tmp_path)
    path = _workdir(tiny_family, tmp_path, stages=["pretrain"])
    data = yaml.safe_load(open(path))
    data["base_model"] = str(model)
    data["finmerge"]["pretrain"]["trust_remote_code"] = True
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(model, tmp_path / "corpus.txt", path)
    result = run([command("finmerge"), "reproduce", path], env={"HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert not sentinel.exists(), "the model repository's code ran without --trust-remote-code"
    assert_clean_failure(result, mentions=["finmerge.pretrain.trust_remote_code", "--trust-remote-code"],
                         before=before, outputs=[tmp_path / "domain"])
    assert not (tmp_path / "domain").exists()


@pytest.mark.parametrize("section,key", [
    ({"pretrain": {"allow_pickle": True}}, "finmerge.pretrain.allow_pickle"),
    ({"eval": {"trust_remote_code": True}}, "finmerge.eval.trust_remote_code"),
    ({"sweep": {"qa": {"chat": "./qa.jsonl"}, "allow-pickle": "yes"}}, "finmerge.sweep.allow-pickle"),
    ({"trust_remote_code": True}, "finmerge.trust_remote_code"),
])
def test_a_recipe_cannot_set_the_command_line_only_flags(tiny_family, tmp_path, section, key):
    path = _workdir(tiny_family, tmp_path)
    data = yaml.safe_load(open(path))
    for name, value in section.items():
        data["finmerge"][name] = {**data["finmerge"].get(name, {}), **value} if isinstance(value, dict) else value
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ReproductionError, match=re.escape(f"`{key}` cannot be set in a file")):
        load_reproduction(path)


class Fakes:
    """Stand-ins for the heavy work of each stage that record what they were given (flags, env, calls)."""

    def __init__(self, monkeypatch):
        import finmerge.evaluation.run as evaluation
        import finmerge.pretrain.train as train
        import finmerge.reproduce.run as run
        import finmerge.sweep.run as sweep

        self.calls = []
        monkeypatch.setattr(train, "run_pretraining", self.pretrain)
        monkeypatch.setattr(run, "run_child", self.mergekit_yaml)
        monkeypatch.setattr(evaluation, "evaluate", self.evaluate)
        monkeypatch.setattr(sweep, "run_sweep", self.sweep)
        monkeypatch.setattr(sweep, "write_sweep", lambda result, folder: None)

    def pretrain(self, config):
        self.calls.append(("pretrain", {"trust_remote_code": config.trust_remote_code, "allow_pickle": config.allow_pickle}))
        os.makedirs(config.output, exist_ok=True)  # as run_pretraining does
        with open(os.path.join(config.output, "model.safetensors"), "w") as handle:
            handle.write("weights")

    def mergekit_yaml(self, command, env=None, **kwargs):
        self.calls.append(("merge", {"trust_remote_code": "--trust-remote-code" in command,
                                     "allow_pickle": (env or {}).get("FINMERGE_ALLOW_PICKLE") == "1",
                                     "overwrite": bool((env or {}).get("FINMERGE_OVERWRITE"))}))
        out = command[2]
        os.makedirs(out)  # as mergekit-yaml does: the folder appears when the merge is done
        with open(os.path.join(out, "model.safetensors"), "w") as handle:
            handle.write("merged")
        return 0

    def evaluate(self, models, settings, progress=None):
        self.calls.append(("eval", {"trust_remote_code": settings.trust_remote_code, "allow_pickle": settings.allow_pickle}))
        return {label: {} for label in models}

    def sweep(self, recipe, settings, workdir, log=print, keep_best=None, keep_data_free=None):
        self.calls.append(("sweep", {"trust_remote_code": settings.eval.trust_remote_code,
                                     "allow_pickle": settings.eval.allow_pickle}))
        os.makedirs(workdir, exist_ok=True)
        if keep_best:
            os.makedirs(keep_best)
            with open(os.path.join(keep_best, "model.safetensors"), "w") as handle:
                handle.write("best")
        return {"metric": settings.metric, "points": [], "best": {}}

    def ran(self):
        stages = [name for name, _ in self.calls]
        self.calls.clear()
        return stages


def _all_stages(tiny_family, tmp_path):
    (tmp_path / "val.jsonl").write_text(json.dumps({"question": CHATS[1][0], "answer": CHATS[1][1]}) + "\n")
    return _workdir(tiny_family, tmp_path, stages=["pretrain", "merge", "eval", "sweep"],
                    sweep={"w_domain": [1.0], "w_instruct": [1.0], "variants": ["paper"], "metric": "chat.accuracy",
                           "qa": {"chat": "./val.jsonl"}})


@pytest.mark.parametrize("on", [True, False])
def test_the_command_line_flags_reach_every_stage_and_the_report(tiny_family, tmp_path, monkeypatch, on):
    """The flags reach pretrain, the mergekit-yaml subprocess, eval and the sweep."""
    import finmerge.pretrain.config as pretrain_config

    repro = load_reproduction(_all_stages(tiny_family, tmp_path))
    fakes = Fakes(monkeypatch)
    keywords = []
    real_build = pretrain_config.build_config

    def build_config(config_file=None, overrides=None, *, trust_remote_code=False, allow_pickle=False):
        # the pretrain config's interface: the flags are keyword arguments, always passed
        keywords.append({"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle})
        assert "trust_remote_code" not in (overrides or {}) and "allow_pickle" not in (overrides or {})
        config = real_build(config_file, overrides)
        config.trust_remote_code, config.allow_pickle = trust_remote_code, allow_pickle
        return config

    monkeypatch.setattr(pretrain_config, "build_config", build_config)
    result = run_reproduction(repro, log=lambda m: None, trust_remote_code=on, allow_pickle=on)
    flags = {"trust_remote_code": on, "allow_pickle": on}
    seen = {}
    for stage, given in fakes.calls:
        seen.setdefault(stage, []).append(given)
    assert keywords == [flags]
    assert seen["pretrain"] == [flags]
    assert seen["merge"] == [{**flags, "overwrite": False}]
    assert seen["eval"] == [flags, flags]  # the four models, then the sweep's best merge on the reported data
    assert seen["sweep"] == [flags]  # the sweep merges with these flags (MergeFlags), not through the environment
    assert result["flags"] == flags
    report = collect(repro, result["flags"])
    paths = write_report(report)
    assert json.load(open(paths["json"]))["flags"] == flags
    assert ("`--trust-remote-code`, `--allow-pickle`" in open(paths["md"]).read()) == on


def test_the_cli_passes_both_flags(tiny_family, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import finmerge.cli.reproduce as cli
    import finmerge.reproduce.run as run

    given = {}
    monkeypatch.setattr(run, "run_reproduction", lambda repro, **kwargs: given.update(kwargs) or {})
    path = _workdir(tiny_family, tmp_path, stages=["merge"], domain=tiny_family.domain)
    result = CliRunner().invoke(cli.reproduce, [path, "--trust-remote-code", "--allow-pickle"])
    assert result.exit_code == 0, result.output
    assert given["trust_remote_code"] is True and given["allow_pickle"] is True
    assert json.load(open(tmp_path / "report.json"))["flags"] == {"trust_remote_code": True, "allow_pickle": True}


# --- reproduce deletes only what it created -----------------------------------------------------------------

def _cli_fails(path, *mentions, protect=(), installed=False):
    """`finmerge reproduce PATH` fails cleanly, naming `mentions`, and leaves `protect` as it was.

    In-process through the real command group unless `installed` (the console script, ~10 s more)."""
    from tests.bad_input import assert_clean_failure, command, run, snapshot
    from tests.test_bad_input_reproduce import invoke

    before = snapshot(*protect)
    if installed:
        result = run([command("finmerge"), "reproduce", path])
    else:
        result = invoke(["reproduce", path], cwd=os.path.dirname(path))
    return assert_clean_failure(result, mentions=mentions, before=before)


def test_output_is_a_users_folder(tiny_family, tmp_path):
    """`output: ./precious` once removed the user's folder without a word."""
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    path = _workdir(tiny_family, tmp_path, stages=["merge"], domain=tiny_family.domain, output="./precious")
    message = _cli_fails(path, "precious", "not created by finmerge", "move that one away", protect=[tmp_path / "precious"],
                         installed=True)
    assert "Error:" in message
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_output_is_the_workdir(tiny_family, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    path = _workdir(tiny_family, tmp_path, stages=["merge"], domain=tiny_family.domain, output=".")
    _cli_fails(path, "working folder", protect=[tmp_path])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_is_an_ancestor_of_the_workdir(tiny_family, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    path = _workdir(tiny_family, work, stages=["merge"], domain=tiny_family.domain, output="..")
    _cli_fails(path, "working folder", protect=[tmp_path])


def test_pretrain_output_is_an_existing_domain_model(tiny_family, tmp_path):
    """A first run (no stamp) cleared an existing domain model named as the pretrain output."""
    import shutil

    shutil.copytree(tiny_family.domain, tmp_path / "domain")
    path = _workdir(tiny_family, tmp_path, stages=["pretrain", "merge"])
    _cli_fails(path, str(tmp_path / "domain"), "not created by finmerge", "remove `pretrain` from `finmerge.stages`",
               protect=[tmp_path / "domain"])


@pytest.mark.parametrize("output,relation", [("{instruct}", "is the input"), ("{instruct}/merged", "is inside the input"),
                                             ("./corpus.txt", "is the input"), ("./recipe.yml", "is the input")])
def test_output_overlaps_an_input(tiny_family, tmp_path, output, relation):
    path = _workdir(tiny_family, tmp_path, stages=["merge", "eval"], domain=tiny_family.domain, output=output.format(instruct=tiny_family.instruct))
    _cli_fails(path, relation, protect=[tiny_family.instruct, tmp_path / "corpus.txt", path])


def test_stage_outputs_carry_the_marker_and_only_they_are_cleared(tiny_family, tmp_path, monkeypatch):
    from finmerge.safety.outputs import MARKER

    path = _all_stages(tiny_family, tmp_path)
    fakes = Fakes(monkeypatch)
    run_reproduction(load_reproduction(path), log=lambda m: None)
    assert fakes.ran() == ["pretrain", "merge", "eval", "sweep", "eval"]
    for folder in ("domain", "merged", "sweep", "best-merge"):
        assert (tmp_path / folder / MARKER).is_file(), folder
    # A changed setting redoes the stages: their own folders are cleared and rebuilt.
    data = yaml.safe_load(open(path))
    data["finmerge"]["pretrain"]["max_steps"] = 7
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(data, sort_keys=False))
    run_reproduction(load_reproduction(path), log=lambda m: None)
    assert fakes.ran() == ["pretrain", "merge", "eval", "sweep", "eval"]
    # A user's folder put where an output was is refused, not cleared.
    import shutil

    shutil.rmtree(tmp_path / "merged")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.txt").write_text("mine")
    with pytest.raises(ReproductionError, match="not created by finmerge"):
        run_reproduction(load_reproduction(path), log=lambda m: None)
    assert fakes.ran() == []
    assert (tmp_path / "merged" / "mine.txt").read_text() == "mine"


# --- stage keys -----------------------------------------------------------------------------------------------

def test_sweep_is_redone_when_its_question_file_changes(tiny_family, tmp_path, monkeypatch):
    path = _all_stages(tiny_family, tmp_path)
    fakes = Fakes(monkeypatch)
    run_reproduction(load_reproduction(path), log=lambda m: None)
    fakes.ran()
    run_reproduction(load_reproduction(path), log=lambda m: None)
    assert fakes.ran() == []
    (tmp_path / "val.jsonl").write_text(json.dumps({"question": CHATS[2][0], "answer": CHATS[2][1]}) + "\n")
    run_reproduction(load_reproduction(path), log=lambda m: None)
    assert fakes.ran() == ["sweep", "eval"]


def _merge_then(tiny_family, tmp_path, monkeypatch, change, **first):
    path = _workdir(tiny_family, tmp_path, stages=["pretrain", "merge", "eval"])
    fakes = Fakes(monkeypatch)
    run_reproduction(load_reproduction(path), log=lambda m: None, **first)
    assert fakes.ran() == ["pretrain", "merge", "eval"]
    kwargs = change() or {}
    run_reproduction(load_reproduction(path), log=lambda m: None, **kwargs)
    return fakes.ran()


def test_no_diagnostics_switch_is_part_of_the_key(tiny_family, tmp_path, monkeypatch):
    assert _merge_then(tiny_family, tmp_path, monkeypatch,
                       lambda: monkeypatch.setenv("FINMERGE_NO_DIAGNOSTICS", "1")) == ["pretrain", "merge", "eval"]


@pytest.mark.parametrize("package", ["finmerge", "mergekit"])
def test_versions_are_part_of_the_key(tiny_family, tmp_path, monkeypatch, package):
    import importlib.metadata

    real = importlib.metadata.version

    def upgrade():
        monkeypatch.setattr(importlib.metadata, "version", lambda name: "999.0" if name == package else real(name))

    assert _merge_then(tiny_family, tmp_path, monkeypatch, upgrade) == ["pretrain", "merge", "eval"]


def test_flags_are_part_of_the_key(tiny_family, tmp_path, monkeypatch):
    assert _merge_then(tiny_family, tmp_path, monkeypatch,
                       lambda: {"trust_remote_code": True}) == ["pretrain", "merge", "eval"]


def test_a_deleted_output_redoes_its_stage_and_the_later_ones(tiny_family, tmp_path, monkeypatch):
    import shutil

    one, two, three = (tmp_path / name for name in ("one", "two", "three"))
    for folder in (one, two, three):
        folder.mkdir()
    assert _merge_then(tiny_family, one, monkeypatch, lambda: shutil.rmtree(one / "merged")) == ["merge", "eval"]
    assert (one / "merged").is_dir()
    assert _merge_then(tiny_family, two, monkeypatch, lambda: shutil.rmtree(two / "domain")) == ["pretrain", "merge", "eval"]
    assert _merge_then(tiny_family, three, monkeypatch, lambda: os.remove(three / "eval.json")) == ["eval"]


def _same_size_same_mtime(path, text):
    stat = os.stat(path)
    replacement = str(path) + ".new"
    with open(replacement, "w") as handle:
        handle.write(text)
    assert os.path.getsize(replacement) == stat.st_size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)


def test_files_are_identified_by_content_not_size_and_mtime(tmp_path):
    from finmerge.reproduce.stages import stage_key

    data = tmp_path / "weights.bin"
    data.write_text("AAAA")
    before = stage_key({}, [str(data)])
    _same_size_same_mtime(data, "BBBB")
    assert stage_key({}, [str(data)]) != before


def test_digests_are_cached_per_file_version(tmp_path):
    from finmerge.reproduce.stages import HashCache

    data = tmp_path / "weights.bin"
    data.write_text("AAAA")
    cache = HashCache(str(tmp_path))
    real = cache.digest(str(data))
    cache.save()
    # the same version of the file is not read again: a planted digest is returned as it is
    cache = HashCache(str(tmp_path))
    cache.entries[str(data)]["sha256"] = "planted"
    assert cache.digest(str(data)) == "planted"
    # a file swapped in with the same size and mtime has a new ctime/inode: hashed again
    _same_size_same_mtime(data, "BBBB")
    assert cache.digest(str(data)) not in ("planted", real)


def test_eval_asks_every_model_through_the_recipes_own_template():
    """fin.yml's Alpaca-ja Jinja template reaches the eval settings; mergekit's template names do not."""
    from types import SimpleNamespace

    from finmerge.reproduce.run import eval_settings, recipe_chat_template
    from finmerge.reproduce.settings import EvalSection

    with open(os.path.join(os.path.dirname(__file__), "..", "recipes", "fin.yml"), encoding="utf-8") as handle:
        fin = yaml.safe_load(handle)
    template = recipe_chat_template(SimpleNamespace(merge=fin))
    assert template == fin["chat_template"] and "### 応答:" in template
    section = EvalSection(qa={"x": "x.jsonl"})
    settings = eval_settings(section, section, {"trust_remote_code": True, "allow_pickle": False}, template=template)
    assert settings.chat_template == template and settings.trust_remote_code
    for named in ("chatml", "auto", None):
        assert recipe_chat_template(SimpleNamespace(merge={"chat_template": named})) is None
