"""`finmerge sweep`: the grid's recipes, the per-module variant, and the choice of the best point."""

import json

import pytest
import torch

from finmerge.demo.family import ASSISTANT, END, USER
from finmerge.demo.tiny_models import CHATS, recipe
from finmerge.evaluation.run import EvalSettings
from finmerge.sweep.run import SweepError, SweepSettings, chat_control_rows, run_sweep, variant_recipe, write_sweep
from merge_helpers import expected_merge, run_merge, tensors


def test_variant_recipes(tiny_family):
    base = recipe(tiny_family)
    paper = variant_recipe(base, 0.5, 1.5, "paper")
    weights = {m["parameters"]["role"]: m["parameters"]["weight"] for m in paper["models"]}
    assert weights == {"domain": 0.5, "instruct": 1.5}
    head = variant_recipe(base, 0.5, 1.5, "instruct_head")
    domain_weight = next(m["parameters"]["weight"] for m in head["models"] if m["parameters"]["role"] == "domain")
    assert domain_weight[-1] == {"value": 0.5} and {"filter": "lm_head", "value": 0.0} in domain_weight
    with pytest.raises(SweepError, match="unknown sweep variant 'ties'"):
        variant_recipe(base, 1, 1, "ties")
    assert "parameters" not in paper and "parameters" not in head  # instruct_rows only in instruct_tokens


def test_instruct_head_variant_merges_head_and_final_norm_from_instruct_only(tiny_family, tmp_path):
    run_merge(variant_recipe(recipe(tiny_family), 0.7, 1.2, "instruct_head"), tmp_path / "out")
    merged, full, no_domain = tensors(tmp_path / "out"), expected_merge(tiny_family, 0.7, 1.2), expected_merge(tiny_family, 0.0, 1.2)
    for name, tensor in merged.items():
        reference = no_domain if name in ("lm_head.weight", "model.norm.weight") else full
        assert torch.allclose(tensor, reference[name], atol=1e-6, rtol=0), name


def test_chat_control_rows_are_the_instruct_templates_special_tokens(tiny_family):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_family.instruct)
    expected = sorted(tokenizer.convert_tokens_to_ids([USER, ASSISTANT, END]))
    assert chat_control_rows(recipe(tiny_family)) == ",".join(map(str, expected))
    # the base tokenizer has no chat template: nothing to read the control tokens from
    no_template = recipe(tiny_family)
    no_template["models"][1]["model"] = tiny_family.base
    with pytest.raises(SweepError, match="no chat template"):
        chat_control_rows(no_template)


def test_instruct_tokens_variant_protects_only_the_control_token_rows(tiny_family, tmp_path):
    from transformers import AutoTokenizer

    variant = variant_recipe(recipe(tiny_family), 0.7, 1.2, "instruct_tokens")
    rows = [int(i) for i in variant["parameters"]["instruct_rows"].split(",")]
    assert rows == sorted(AutoTokenizer.from_pretrained(tiny_family.instruct).convert_tokens_to_ids([USER, ASSISTANT, END]))
    run_merge(variant, tmp_path / "out")
    merged, full, no_domain = tensors(tmp_path / "out"), expected_merge(tiny_family, 0.7, 1.2), expected_merge(tiny_family, 0.0, 1.2)
    others = [i for i in range(merged["lm_head.weight"].shape[0]) if i not in rows]
    for name, tensor in merged.items():
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            assert torch.allclose(tensor[rows], no_domain[name][rows], atol=1e-6, rtol=0), name
            assert torch.allclose(tensor[others], full[name][others], atol=1e-6, rtol=0), name
            assert not torch.allclose(tensor[rows], full[name][rows], atol=1e-6, rtol=0), name  # the variant did something
        else:
            assert torch.allclose(tensor, full[name], atol=1e-6, rtol=0), name


def test_sweep_needs_a_metric_and_known_variants(tiny_family, tmp_path):
    settings = SweepSettings(w_domain=[1.0], w_instruct=[1.0], eval=EvalSettings(qa={"chat": "unused.jsonl"}))
    with pytest.raises(SweepError, match="nothing picks the best point: give --metric"):
        run_sweep(recipe(tiny_family), settings, str(tmp_path / "sweep"), log=lambda m: None)
    settings.metric, settings.variants = "chat.strict", ["paper", "ties"]
    with pytest.raises(SweepError, match="unknown sweep variant 'ties'"):
        run_sweep(recipe(tiny_family), settings, str(tmp_path / "sweep"), log=lambda m: None)
    assert not (tmp_path / "sweep").exists()  # refused before any merge


def test_sweep_picks_the_best_point_and_writes_its_report(tiny_family, tmp_path):
    qa = tmp_path / "val.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    settings = SweepSettings(w_domain=[1.0], w_instruct=[0.0, 1.0], variants=["paper"], metric="chat.strict",
                             eval=EvalSettings(qa={"chat": str(qa)}))
    result = run_sweep(recipe(tiny_family), settings, str(tmp_path / "sweep"), log=lambda m: None, keep_best=str(tmp_path / "best"))
    scores = {p["w_instruct"]: p["metric"] for p in result["points"]}
    # Without the instruction vector the merge is base + τ_d: it cannot answer in the chat format.
    assert scores[0.0] < scores[1.0] == 1.0
    assert result["best"]["w_instruct"] == 1.0
    assert all(torch.allclose(tensors(tmp_path / "best")[k], v, atol=1e-6) for k, v in expected_merge(tiny_family, 1.0, 1.0).items())
    paths = write_sweep(result, str(tmp_path / "sweep"))
    assert "| best by metric |" in open(paths["md"]).read()
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    run_merge(__import__("yaml").safe_load(open(paths["recipe"])), tmp_path / "again")  # the best recipe is a real recipe
    assert all(torch.equal(tensors(tmp_path / "again")[k], v) for k, v in tensors(tmp_path / "best").items())


def test_metric_that_is_never_computed_is_an_error(tiny_family, tmp_path):
    qa = tmp_path / "val.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}))
    settings = SweepSettings(w_domain=[1.0], w_instruct=[1.0], variants=["paper"], metric="finance.strict",
                             eval=EvalSettings(qa={"chat": str(qa)}, generate=False))
    with pytest.raises(SweepError, match="metric 'finance.strict' was not computed"):
        run_sweep(recipe(tiny_family), settings, str(tmp_path / "sweep"), log=lambda m: None)


def test_ranking_breaks_ties_left_to_right_and_minimizes_with_minus():
    from finmerge.sweep.run import ranking_key

    a = {"f": {"strict": 0.0, "eos": 1.0, "nll": 2.0}}
    b = {"f": {"strict": 0.0, "eos": 0.5, "nll": 1.0}}
    assert ranking_key(a, "f.strict,f.eos") > ranking_key(b, "f.strict,f.eos")
    assert ranking_key(b, "f.strict,-f.nll") > ranking_key(a, "f.strict,-f.nll")
    assert ranking_key(a, "g.strict,f.eos") is None


def test_sweep_command_on_a_plain_mergekit_recipe_writes_a_runnable_instruct_tokens_recipe(tiny_family, tmp_path):
    import yaml

    from bad_input import command, run
    from finmerge.demo.tiny_models import write_recipe

    plain = write_recipe(str(tmp_path / "plain.yml"), tiny_family)  # no finmerge: section
    qa = tmp_path / "val.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    result = run([command("finmerge"), "sweep", plain, "--out", tmp_path / "sweep", "--qa", f"val={qa}",
                  "--metric", "val.strict", "--w-domain", "1", "--w-instruct", "1", "--variants", "instruct_tokens"])
    assert result.returncode == 0, result.stderr
    best = yaml.safe_load(open(tmp_path / "sweep" / "best-recipe.yml"))
    assert best["parameters"]["instruct_rows"] == chat_control_rows(recipe(tiny_family))
    run_merge(best, tmp_path / "again")
    expected = expected_merge(tiny_family, 1.0, 1.0)
    assert not torch.allclose(tensors(tmp_path / "again")["lm_head.weight"], expected["lm_head.weight"])
