"""`finmerge sweep` on bad settings: one clear message naming the option, inputs untouched, no report.

The cases run the command in this process (`invoke`); one of them runs the installed console script."""

import json

import pytest

from bad_input import assert_clean_failure, command, invoke, run, snapshot
from finmerge.demo.tiny_models import CHATS, write_recipe

CASES = {  # name: (extra command-line arguments, recipe edit, words the message must contain)
    "no metric": ([], None, ["metric", "--metric", "--prompts"]),
    "prompts without text": (["--prompts", "PROMPTS"], None, ["needs held-out domain text", "text"]),
    "prompts under a QA set's name": (["--prompts", "PROMPTS", "--text", "PROMPTS", "--qa", "prompts=PROMPTS"], None,
                                      ["may not be named 'prompts'"]),
    "unknown variant": (["--metric", "val.strict", "--variants", "paper,ties"], None, ["ties", "instruct_tokens"]),
    "weights not numbers": (["--metric", "val.strict", "--w-domain", "1,heavy"], None, ["--w-domain", "heavy"]),
    "empty weight list": (["--metric", "val.strict", "--w-instruct", ","], None, ["--w-instruct"]),
    "instruct_tokens without a chat template": (
        ["--metric", "val.strict", "--variants", "instruct_tokens"], "instruct_is_base", ["chat template", "instruct_tokens"]),
}
THROUGH_THE_INSTALLED_COMMAND = "no metric"


@pytest.mark.parametrize("case", sorted(CASES))
def test_sweep_bad_settings(case, tiny_family, tmp_path):
    args, edit, mentions = CASES[case]
    instruct = tiny_family.base if edit == "instruct_is_base" else tiny_family.instruct
    family = type(tiny_family)(tiny_family.base, instruct, tiny_family.domain)
    recipe = write_recipe(str(tmp_path / "recipe.yml"), family)
    qa = tmp_path / "val.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    before = snapshot(recipe, qa, tiny_family.base, tiny_family.instruct, tiny_family.domain)
    out = tmp_path / "sweep"
    args = [str(qa).join(a.split("PROMPTS")) for a in args]  # the QA file stands for prompts: its answers go unread
    args = ["sweep", recipe, "--out", out, "--qa", f"val={qa}", "--w-domain", "1", "--w-instruct", "1", *args]
    result = run([command("finmerge"), *args]) if case == THROUGH_THE_INSTALLED_COMMAND else invoke(args)
    assert_clean_failure(result, mentions=mentions, before=before, outputs=[out])
    assert not (out / "sweep.json").exists() and not (out / "best-recipe.yml").exists()
