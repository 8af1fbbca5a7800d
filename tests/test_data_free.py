"""The data-free choice: a merge picked from held-out domain text and answerless prompts, never from a
labelled answer; and the rule that picks it."""

import json

import pytest
import torch

from finmerge.demo.tiny_models import CHATS, CORPUS, recipe
from finmerge.evaluation.data import EvalDataError, load_prompts
from finmerge.evaluation.settings import EvalSettings
from finmerge.sweep import data_free
from finmerge.sweep.run import SweepSettings, run_sweep, write_sweep
from merge_helpers import expected_merge, tensors


def test_prompts_are_read_without_their_answers(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"question": "Who runs X?", "answer": "Y"}) + "\n\n" + json.dumps({"question": "Z?"}) + "\n")
    assert load_prompts(str(jsonl)) == ["Who runs X?", "Z?"]
    text = tmp_path / "p.txt"
    text.write_text("Who runs X?\n\n  Z?  \n")
    assert load_prompts(str(text)) == ["Who runs X?", "Z?"]
    jsonl.write_text(json.dumps({"question": "a"}) + "\n" + json.dumps({"answer": "b"}) + "\n")
    with pytest.raises(EvalDataError, match=r"p\.jsonl:2: expected a JSON object with a non-empty 'question'"):
        load_prompts(str(jsonl))
    with pytest.raises(EvalDataError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))


def _point(bpb, turn_end, nll, name):
    return {"name": name, "result": {"domain": {"bits_per_byte": bpb},
                                     data_free.PROMPTS_SET: {"ends_with_eos": turn_end, "answer_nll": nll}}}


def test_the_rule_lowest_bits_per_byte_among_merges_that_end_their_turns():
    points = [_point(0.40, 0.10, 1.0, "knows most, never stops"), _point(0.60, 0.95, 1.0, "stops, knows less"),
              _point(0.50, 0.90, 1.2, "stops nearly as often, knows more"), _point(0.50, 0.92, 1.1, "same bpb, closer")]
    ranked = [p["name"] for p in data_free.rank(points, instruct_turn_end=1.0)]
    # 0.9 × the instruct model's 1.0: the two 0.5 bpb merges qualify, the closer to the instruct answers first
    assert ranked == ["same bpb, closer", "stops nearly as often, knows more", "stops, knows less", "knows most, never stops"]
    # the instruct model itself seldom ends (0.2): held to the best merge's share, 0.95
    ranked = [p["name"] for p in data_free.rank(points, instruct_turn_end=0.2)]
    assert ranked[:2] == ["same bpb, closer", "stops nearly as often, knows more"]
    # nothing qualifies but one: it wins whatever its bits per byte
    assert data_free.rank(points[:2], instruct_turn_end=1.0)[0]["name"] == "stops, knows less"


def _data(tmp_path, answers):
    """The sweep's labelled QA file and its prompts file, with the given answers written into both."""
    qa, prompts, text = tmp_path / "val.jsonl", tmp_path / "prompts.jsonl", tmp_path / "heldout.txt"
    rows = [json.dumps({"question": q, "answer": a}) for (q, _), a in zip(CHATS, answers)]
    qa.write_text("\n".join(rows))
    prompts.write_text("\n".join(rows))
    text.write_text("\n\n".join(CORPUS))
    return qa, prompts, text


def _sweep(tiny_family, tmp_path, name, answers):
    folder = tmp_path / name
    folder.mkdir()
    qa, prompts, text = _data(folder, answers)
    settings = SweepSettings(w_domain=[1.0], w_instruct=[0.0, 1.0], variants=["paper"], metric="chat.strict",
                             prompts=str(prompts), eval=EvalSettings(qa={"chat": str(qa)}, text=str(text), max_new_tokens=8))
    return run_sweep(recipe(tiny_family), settings, str(folder / "sweep"), log=lambda m: None,
                     keep_best=str(folder / "best"), keep_data_free=str(folder / "free"))


def test_the_data_free_choice_is_blind_to_answers(tiny_family, tmp_path):
    """Oracle: the same sweep with every answer corrupted, in the QA file and in the prompts file."""
    right = _sweep(tiny_family, tmp_path, "right", [a for _, a in CHATS])
    wrong = _sweep(tiny_family, tmp_path, "wrong", ["Nonsense " * (i + 1) for i in range(len(CHATS))])
    free = lambda r: (r["data_free"]["variant"], r["data_free"]["w_domain"], r["data_free"]["w_instruct"])
    assert free(right) == free(wrong)
    assert [p["data_free"] for p in right["points"]] == [p["data_free"] for p in wrong["points"]]
    # the labels did change what the labelled metric sees: the oracle could have failed
    assert [p["metric"] for p in right["points"]] != [p["metric"] for p in wrong["points"]]
    # the kept merge is the chosen point's merge
    point = right["data_free"]
    expected = expected_merge(tiny_family, point["w_domain"], point["w_instruct"])
    merged = tensors(tmp_path / "right" / "free")
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in expected.items())
    # without the instruction vector the merge never ends its turn: never the data-free choice
    assert point["w_instruct"] == 1.0 and point["data_free"]["turn_end"] > 0
    assert right["data_free"]["instruct"]["prompts"] == len(CHATS)
    paths = write_sweep(right, str(tmp_path / "right" / "sweep"))
    assert "data-free" in open(paths["md"]).read() and paths["data_free_recipe"].endswith("data-free-recipe.yml")


def test_data_free_needs_text_and_an_unused_set_name(tiny_family, tmp_path):
    qa, prompts, text = _data(tmp_path, [a for _, a in CHATS])
    settings = SweepSettings(w_domain=[1.0], w_instruct=[1.0], prompts=str(prompts), eval=EvalSettings(qa={"chat": str(qa)}))
    with pytest.raises(data_free.DataFreeError, match="needs held-out domain text"):
        run_sweep(recipe(tiny_family), settings, str(tmp_path / "s"), log=lambda m: None)
    settings = SweepSettings(w_domain=[1.0], w_instruct=[1.0], prompts=str(prompts),
                             eval=EvalSettings(qa={"prompts": str(qa)}, text=str(text)))
    with pytest.raises(data_free.DataFreeError, match="may not be named 'prompts'"):
        run_sweep(recipe(tiny_family), settings, str(tmp_path / "s"), log=lambda m: None)
    assert not (tmp_path / "s").exists()  # refused before any merge
