"""The shipped seed-0 stand-ins: `make demo` copies them only when it would train the same models.

The oracle for "the same models" is the key of what trains them (family settings, world files,
random initialisation, library versions), computed here by the demo's own path on the full-size
seed-0 world; the stand-ins' own training is `finmerge demo --train-standins` (7 minutes: recorded
in README, not run here).
"""

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from finmerge.demo import family as fam
from finmerge.demo import standins
from finmerge.safety.hashes import file_sha256


class _Stop(Exception):
    """Raised in place of the recipe's run: this test is about the stages before it."""


def _until_recipe(monkeypatch, out, **options):
    from finmerge.demo.pipeline import run_demo
    from finmerge.reproduce import run as reproduce_run

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(reproduce_run, "run_reproduction", stop)
    messages = []
    with pytest.raises(_Stop):
        run_demo(str(out), log=messages.append, **options)
    return messages


def _shipped_file(role, name):
    from importlib import resources

    return resources.files("finmerge.demo") / "standins" / "seed-0" / role / name


@pytest.fixture(scope="module")
def seed0_demo(tmp_path_factory):
    """The full-size seed-0 demo up to its recipe, as `make demo` runs it (a few seconds: no training)."""
    monkeypatch = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("standins") / "demo-out"
    try:
        messages = _until_recipe(monkeypatch, out)
    finally:
        monkeypatch.undo()
    return out, messages


def _why_not_shipped(out):
    """Which inputs of the stand-ins differ from the shipped ones': fails on drift (settings, world,
    libraries, init code); skips where only this machine's random draw differs by rounding."""
    made = json.loads((out / "models" / standins.KEYS).read_text())
    record = json.loads(_shipped_file("base", standins.RECORD).read_text())
    now, then = made["inputs"], record["inputs"]
    differ = [part for part in ("family", "libraries") if now[part] != then[part]]
    differ += [f"{label}/{name}" for label in then["files"] for name, digest in then["files"][label]
               if dict(now["files"][label]).get(name) != digest]
    if differ == ["init/model.safetensors"]:
        probe = standins.init_probe(str(out / "models" / "init"))
        assert probe.keys() == record["init_probe"].keys()
        for name, sums in probe.items():
            assert sums == pytest.approx(record["init_probe"][name], rel=1e-5, abs=1e-3), f"init tensor {name} is drawn differently"
        pytest.skip("this machine's torch draws the same random initialisation up to rounding, not bit for bit: "
                    "make demo trains the stand-ins here")
    return differ


def test_make_demo_copies_the_shipped_standins_and_they_are_the_familys_models(seed0_demo):
    out, messages = seed0_demo
    made = json.loads((out / "models" / standins.KEYS).read_text())
    if made["trained"]:
        pytest.fail(f"the seed-0 stand-ins no longer match what the demo would train ({', '.join(_why_not_shipped(out))} "
                    "differ): regenerate them (finmerge demo --train-standins; python -m finmerge.demo.standins demo-out)")
    assert any("copied, not trained" in m for m in messages)
    settings = fam.FamilySettings()
    for role in ("base", "instruct"):
        record = json.loads(_shipped_file(role, standins.RECORD).read_text())
        assert record["key"] == made["key"]
        for name in standins.FILES[role]:
            assert file_sha256(str(out / "models" / role / name)) == record["sha256"][name]
        weights = load_file(str(out / "models" / role / "model.safetensors"))
        assert weights["model.embed_tokens.weight"].shape == (settings.vocab_size, settings.hidden_size)
        assert sum(1 for n in weights if n.endswith("self_attn.q_proj.weight")) == settings.layers
        summary = json.loads((out / "models" / role / "training_summary.json").read_text())
        steps = settings.base_steps if role == "base" else settings.instruct_steps
        assert summary["steps"] == steps  # trained as the family says, not a shortened run
    config = json.loads((out / "models" / "instruct" / "config.json").read_text())
    tokenizer = json.loads((out / "models" / "instruct" / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] != json.loads((out / "models" / "base" / "config.json").read_text())["eos_token_id"]
    assert tokenizer["eos_token"] == fam.END  # the instruct sibling ends its turn with its own token


def test_another_world_or_settings_do_not_match_the_shipped_standins(seed0_demo, tmp_path):
    out, _ = seed0_demo
    key = json.loads((out / "models" / standins.KEYS).read_text())["key"]
    assert standins.shipped_standin("base", 0, key) is not None
    assert standins.shipped_standin("base", 1, key) is None  # no seed-1 stand-ins are shipped
    folders = {"world": str(out / "world"), "init": str(out / "models" / "init")}
    settings = fam.settings_dict(fam.FamilySettings())
    assert standins.standin_key(standins.standin_inputs(settings, folders)) == key  # the oracle: same inputs, same key
    other = dict(settings, base_steps=999)
    assert standins.standin_key(standins.standin_inputs(other, folders)) != key
    world = tmp_path / "world"
    shutil.copytree(out / "world", world)
    with open(world / "instruct_chats.jsonl", "a") as handle:
        handle.write(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert standins.standin_key(standins.standin_inputs(settings, {**folders, "world": str(world)})) != key


def test_train_standins_flag_trains_instead_of_copying(monkeypatch, tmp_path):
    trained = []
    monkeypatch.setattr(fam, "pretrain", lambda *args, **kwargs: trained.append("base"))
    monkeypatch.setattr(fam, "fine_tune_instruct", lambda *args, **kwargs: trained.append("instruct"))
    messages = _until_recipe(monkeypatch, tmp_path / "demo-out", train_standins=True)
    assert trained == ["base", "instruct"] and not any("copied" in m for m in messages)
    assert json.loads((tmp_path / "demo-out" / "models" / standins.KEYS).read_text())["trained"] is True


def test_a_damaged_shipped_file_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "shipped" / "seed-0"
    shutil.copytree(str(_shipped_file("base", "model.safetensors").parent), copy / "base")
    with open(copy / "base" / "config.json", "a") as handle:
        handle.write(" ")
    monkeypatch.setattr(standins, "_shipped", lambda seed: copy)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(RuntimeError, match="base/config.json does not match its recorded sha256"):
        standins.copy_standin("base", 0, str(target))


def test_writing_standins_refuses_a_demo_whose_standins_were_copied(seed0_demo, tmp_path):
    out, _ = seed0_demo
    with pytest.raises(SystemExit, match="copied from the shipped ones"):
        standins.write_standins(str(out), str(tmp_path))
    assert not os.path.exists(tmp_path / "demo")


@pytest.mark.parametrize("scale, outcome", [(1e-7, "skip"), (0.5, "fail")])
def test_the_drift_check_tells_a_rounding_difference_from_other_init_code(seed0_demo, tmp_path, scale, outcome):
    """What test 1 does on a machine that draws the initialisation differently: a relative change of
    1e-7 (another CPU's vectorised normal_) skips, a changed init scale fails."""
    import torch
    from safetensors.torch import save_file

    out, _ = seed0_demo
    copy = tmp_path / "demo-out"
    shutil.copytree(out / "world", copy / "world")
    shutil.copytree(out / "models" / "init", copy / "models" / "init")
    weights = load_file(str(copy / "models" / "init" / "model.safetensors"))
    changed = {n: (t * (1 + scale) if n.endswith("q_proj.weight") else t).contiguous() for n, t in weights.items()}
    assert any(not torch.equal(changed[n], weights[n]) for n in weights)
    save_file(changed, str(copy / "models" / "init" / "model.safetensors"), metadata={"format": "pt"})
    inputs = standins.standin_inputs(fam.settings_dict(fam.FamilySettings()),
                                     {"world": str(copy / "world"), "init": str(copy / "models" / "init")})
    (copy / "models" / standins.KEYS).write_text(json.dumps({"key": standins.standin_key(inputs), "trained": True, "inputs": inputs}))
    if outcome == "skip":
        with pytest.raises(pytest.skip.Exception, match="up to rounding"):
            _why_not_shipped(copy)
    else:
        with pytest.raises(AssertionError, match="is drawn differently"):
            _why_not_shipped(copy)
