"""Bad input for `finmerge reproduce`: every malformed recipe ends in one clear message and exit code != 0,
with no traceback, no input modified and no output that looks complete.

Each case writes a working reproduction (tiny models, corpus, QA file) and then breaks one thing in it.
The command runs in-process through the real `finmerge` command group (its error handling included),
which saves the ~10 s start-up of a subprocess per case; `test_one_case_through_the_installed_command`
runs one through the installed console script as well.
"""

import json
import os

import pytest
import yaml

from finmerge.demo.tiny_models import CHATS, CORPUS, recipe
from bad_input import assert_clean_failure, command, invoke, run, snapshot


def _valid(tiny_family, work):
    (work / "corpus.txt").write_text("\n\n".join(CORPUS * 10))
    (work / "qa.jsonl").write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    data = recipe(tiny_family)
    data["models"][0]["model"] = "./domain"
    data["finmerge"] = {
        "stages": ["pretrain", "merge", "eval", "sweep"],
        "pretrain": {"data": ["./corpus.txt"], "seq_len": 32, "max_steps": 2, "min_chars": 5},
        "eval": {"text": "./corpus.txt", "qa": {"chat": "./qa.jsonl"}, "max_new_tokens": 8},
        "sweep": {"w_domain": [1.0], "w_instruct": [1.0], "variants": ["paper"], "metric": "chat.accuracy",
                  "qa": {"chat": "./qa.jsonl"}},
    }
    return data


def _set(*keys):
    """A case that sets finmerge.<keys...> to a value."""
    def change(data, work, family, value):
        node = data["finmerge"]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    return change


def _raw(text):
    return lambda data, work, family: text


def _symlink_output(target):
    def change(data, work, family):
        os.symlink(target(work, family), work / "linked")
        data["finmerge"]["output"] = "./linked"
    return change


def _dangling_qa(data, work, family):
    os.symlink(work / "nowhere.jsonl", work / "dangling.jsonl")
    data["finmerge"]["eval"]["qa"]["chat"] = "./dangling.jsonl"


def _folder_as_qa(data, work, family):
    (work / "a-folder").mkdir()
    data["finmerge"]["eval"]["qa"]["chat"] = "./a-folder"


def _file_as_base(data, work, family):
    (work / "base.txt").write_text("not a model")
    data["base_model"] = "./base.txt"


def _users_domain(data, work, family):
    (work / "domain").mkdir()
    (work / "domain" / "notes.txt").write_text("mine")


def _users_sweep(data, work, family):
    (work / "sweep").mkdir()
    (work / "sweep" / "notes.txt").write_text("mine")


def _flag_in_models(data, work, family):
    data["models"][1]["parameters"]["trust_remote_code"] = True


def _no_merge_method(data, work, family):
    del data["merge_method"]


# name -> (how the valid recipe is broken, text the message must contain)
CASES = {
    "not YAML": (_raw("merge_method: [domain_instruct\nmodels: {"), ["not valid YAML", "line"]),
    "a YAML list": (_raw("- merge_method: domain_instruct\n"), ["must be a mapping", "not list"]),
    "a plain string": (_raw("just some words\n"), ["must be a mapping", "not str"]),
    "empty file": (_raw(""), ["is empty"]),
    "non-UTF-8": (_raw(b"merge_method: domain_instruct\nbase_model: \xff\xfe\n"), ["not UTF-8", "offset"]),
    "no merge_method": (_no_merge_method, ["no `merge_method`"]),
    "finmerge is a list": (lambda d, w, f: d.update(finmerge=["merge"]), ["finmerge must be a mapping"]),
    "unknown finmerge key": (_set("outptu"), ["finmerge: unknown key(s) outptu", "(known: baselines, eval, output"]),
    "sweep without a metric": (lambda d, w, f: d["finmerge"]["sweep"].pop("metric") and None,
                               ["`finmerge.sweep` needs `metric`", "and/or `prompts` with `text`"]),
    "sweep prompts without text": (lambda d, w, f: d["finmerge"]["sweep"].update(prompts="p.txt") and None,
                                   ["`finmerge.sweep.prompts` needs `finmerge.sweep.text`"]),
    "baselines unknown": (lambda d, w, f: d["finmerge"].update(baselines=["slerp"]) and None,
                          ["finmerge.baselines: unknown value(s) 'slerp'", "dare_ties"]),
    "baselines without eval": (lambda d, w, f: d["finmerge"].update(baselines=["ties"], stages=["merge", "baselines"]) and None,
                               ["stage `baselines` needs stage `eval`"]),
    "workdir a number": (_set("workdir"), ["finmerge.workdir must be a folder path"]),
    "output a list": (_set("output"), ["finmerge.output must be a folder path"]),
    "stages a string": (_set("stages"), ["finmerge.stages must be a non-empty list"]),
    "stages unknown": (_set("stages"), ["finmerge.stages: unknown value(s) 'publish'", "merge, eval, baselines, sweep", "column"]),
    "stages empty": (_set("stages"), ["finmerge.stages must be a non-empty list"]),
    "pretrain a string": (_set("pretrain"), ["finmerge.pretrain must be a mapping"]),
    "pretrain unknown field": (_set("pretrain", "max_step"), ["unknown field `max_step`", "max_steps"]),
    "pretrain wrong type": (_set("pretrain", "max_steps"), ["finmerge.pretrain", "`max_steps` must be an integer"]),
    "pretrain bad value": (_set("pretrain", "seq_len"), ["finmerge.pretrain", "seq_len"]),
    "pretrain data not a list": (_set("pretrain", "data"), ["finmerge.pretrain.data must be a non-empty list"]),
    "pretrain sets the model": (_set("pretrain", "model"), ["finmerge.pretrain.model cannot be set"]),
    "pretrain data missing": (_set("pretrain", "data"), ["pretrain data", "missing.txt does not exist"]),
    "eval a list": (_set("eval"), ["finmerge.eval must be a mapping"]),
    "eval wrong type": (_set("eval", "max_new_tokens"), ["finmerge.eval.max_new_tokens must be a positive integer",
                                                          "'ten'", "line", "column"]),
    "eval zero": (_set("eval", "max_len"), ["finmerge.eval.max_len must be a positive integer"]),
    "eval bool as string": (_set("eval", "generate"), ["finmerge.eval.generate must be true or false"]),
    "eval qa a list": (_set("eval", "qa"), ["finmerge.eval.qa must be a mapping of set name to JSONL file path"]),
    "eval unknown key": (_set("eval", "temperature"), ["finmerge.eval: unknown key(s) temperature"]),
    "eval file missing": (_set("eval", "text"), ["missing.txt does not exist"]),
    "eval `..` path missing": (_set("eval", "text"), ["outside", "missing.txt does not exist"]),
    "QA is a folder": (_folder_as_qa, ["a-folder is not a file"]),
    "QA is a dangling symlink": (_dangling_qa, ["dangling.jsonl does not exist"]),
    "sweep weights a string": (_set("sweep", "w_domain"), ["finmerge.sweep.w_domain must be a non-empty list of numbers"]),
    "sweep unknown variant": (_set("sweep", "variants"), ["finmerge.sweep.variants: unknown value(s) 'bogus'",
                                                          "instruct_tokens", "column"]),
    "sweep unknown key": (_set("sweep", "grid"), ["finmerge.sweep: unknown key(s) grid"]),
    "sweep without data": (lambda d, w, f: d["finmerge"]["sweep"].pop("qa"), ["finmerge.sweep needs validation data"]),
    "base model is a file": (_file_as_base, ["base model", "base.txt is not a folder"]),
    "output is the workdir": (_set("output"), ["is the working folder"]),
    "output is an ancestor": (_set("output"), ["is the working folder", "or contains it"]),
    "output `..` into an input": (_set("output"), ["is inside the input"]),
    "output is the corpus": (_set("output"), ["is the input", "corpus.txt"]),
    "output is the recipe": (_set("output"), ["is the input", "recipe.yml"]),
    "output symlink to an input": (_symlink_output(lambda work, family: family.instruct), ["is a symbolic link"]),
    "output symlink outside": (_symlink_output(lambda work, family: work.parent), ["is a symbolic link"]),
    "output is the pretrain output": (_set("output"), ["overlap", "give each its own folder"]),
    "domain output is a user's folder": (_users_domain, ["not created by finmerge", "remove `pretrain`"]),
    "sweep folder is a user's folder": (_users_sweep, ["sweep folder", "not created by finmerge", "--workdir"]),
    "flag in pretrain": (_set("pretrain", "trust_remote_code"), ["finmerge.pretrain.trust_remote_code", "--trust-remote-code"]),
    "flag in eval": (_set("eval", "allow_pickle"), ["finmerge.eval.allow_pickle", "--allow-pickle"]),
    "flag in sweep": (_set("sweep", "trust-remote-code"), ["finmerge.sweep.trust-remote-code", "--trust-remote-code"]),
    "flag at the top": (_set("allow_pickle"), ["finmerge.allow_pickle", "--allow-pickle"]),
    "flag in the merge body": (_flag_in_models, ["models[1].parameters.trust_remote_code", "--trust-remote-code"]),
}

# the value _set() writes for each case
VALUES = {
    "workdir a number": 5, "output a list": ["a", "b"], "stages a string": "pretrain", "stages unknown": ["merge", "publish"],
    "stages empty": [], "pretrain a string": "max_steps=3", "pretrain unknown field": 3, "pretrain wrong type": "many",
    "pretrain bad value": 1, "pretrain data not a list": 5, "pretrain sets the model": "./elsewhere",
    "pretrain data missing": ["./missing.txt"], "eval a list": ["text"], "eval wrong type": "ten", "eval zero": 0,
    "eval bool as string": "yes", "eval qa a list": ["./qa.jsonl"], "eval unknown key": 0.7,
    "eval file missing": "./missing.txt", "eval `..` path missing": "../outside/missing.txt",
    "sweep weights a string": "0.5,1", "sweep unknown variant": ["bogus"], "sweep unknown key": [1, 2],
    "output is the workdir": ".", "output is an ancestor": "../..", "output is the corpus": "./corpus.txt",
    "output is the recipe": "./recipe.yml", "output is the pretrain output": "./domain", "flag in pretrain": True,
    "flag in eval": True, "flag in sweep": "yes", "flag at the top": True, "unknown finmerge key": "./x",
}


def _case(tiny_family, tmp_path, name):
    work = tmp_path / "work"
    work.mkdir()
    data = _valid(tiny_family, work)
    change, mentions = CASES[name]
    if name == "output `..` into an input":
        VALUES[name] = os.path.relpath(os.path.join(tiny_family.instruct, "merged"), work)
    written = change(data, work, tiny_family, VALUES[name]) if name in VALUES else change(data, work, tiny_family)
    path = work / "recipe.yml"
    if isinstance(written, bytes):
        path.write_bytes(written)
    elif isinstance(written, str):
        path.write_text(written)
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return work, path, mentions


def _outputs(work):
    return [work, work / "merged", work / "domain", work / "sweep", work / "best-merge", work / "data-free-merge", work / "baselines"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_reproduction_recipe(tiny_family, tmp_path, name):
    work, path, mentions = _case(tiny_family, tmp_path, name)
    before = snapshot(work, tiny_family.base, tiny_family.instruct, tiny_family.domain)
    result = invoke(["reproduce", path], cwd=tmp_path)
    message = assert_clean_failure(result, mentions=mentions, before=before, outputs=_outputs(work))
    assert len(message.strip().splitlines()) == 1, f"more than one paragraph:\n{message}"
    assert not (work / "report.md").exists() and not (work / "eval.json").exists()


def test_missing_recipe_and_folder_as_recipe(tmp_path):
    for target, text in ((tmp_path / "nope.yml", "does not exist"), (tmp_path, "")):
        result = invoke(["reproduce", target], cwd=tmp_path)
        assert_clean_failure(result, mentions=[text])


def test_one_case_through_the_installed_command(tiny_family, tmp_path):
    work, path, mentions = _case(tiny_family, tmp_path, "flag in pretrain")
    before = snapshot(work)
    result = run([command("finmerge"), "reproduce", path], cwd=tmp_path)
    assert_clean_failure(result, mentions=mentions, before=before, outputs=_outputs(work))
