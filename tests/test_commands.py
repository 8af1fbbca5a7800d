"""Every `finmerge` command follows the same rules: the code/pickle flags from the command line, recipes
read by the one YAML reader, questions asked through the recipe's chat template, dtypes spelled as
torch or mergekit spell them, and the `finmerge:` section's reference table generated from its schema."""

import json
import os

import pytest
import yaml

from bad_input import invoke
from finmerge.cli.main import COMMANDS, cli
from finmerge.demo.tiny_models import CHATS, recipe

ROOT = os.path.join(os.path.dirname(__file__), "..")

# What each command reads. A command that loads models through transformers or mergekit can meet model
# code and pickled weights; `diagnose` reads safetensors files itself (no code runs, pickles are refused).
LOADS_MODELS = {"pretrain", "merge", "eval", "sweep", "reproduce"}
READS_SAFETENSORS_ONLY = {"diagnose"}
BUILDS_ITS_OWN_MODELS = {"demo"}
READS_A_RECIPE = {"merge": ["merge", "{file}", "{out}"], "sweep": ["sweep", "{file}", "--out", "{out}"],
                  "reproduce": ["reproduce", "{file}"], "pretrain": ["pretrain", "{file}"]}
ASKS_QUESTIONS_FROM_A_RECIPE = {"sweep", "reproduce"}  # `eval` takes no recipe (--chat-template-from instead)
TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}<<assistant>> "


def _options(name):
    if name == "pretrain":  # its options are PretrainConfig's, parsed by HfArgumentParser
        from finmerge.pretrain.config import parser

        return {action.dest for action in parser()._actions}
    command = cli.get_command(None, name)
    return {param.name for param in command.params}


def test_every_command_is_classified():
    assert set(COMMANDS) == LOADS_MODELS | READS_SAFETENSORS_ONLY | BUILDS_ITS_OWN_MODELS


@pytest.mark.parametrize("name", sorted(LOADS_MODELS))
def test_every_command_that_loads_models_takes_both_flags(name):
    assert {"trust_remote_code", "allow_pickle"} <= _options(name)


@pytest.mark.parametrize("name", sorted(READS_A_RECIPE))
def test_every_command_that_reads_a_recipe_uses_the_shared_yaml_reader(name, tmp_path):
    """The shared reader's own message: the byte offset of a non-UTF-8 byte (a raw yaml.safe_load says neither)."""
    path = tmp_path / "recipe.yml"
    path.write_bytes(b"merge_method: domain_instruct\nbase_model: \xff\xfe\n")
    args = [a.format(file=path, out=tmp_path / "out") for a in READS_A_RECIPE[name]]
    result = invoke(args, cwd=tmp_path)
    assert result.returncode != 0
    assert "is not valid YAML: it is not UTF-8 text (invalid byte at offset" in result.stderr + result.stdout


def _recipe_with_template(family, tmp_path, **eval_section):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in CHATS))
    data = recipe(family, chat_template=TEMPLATE)
    data["finmerge"] = {"stages": ["eval"], "output": family.instruct,
                        "eval": {"qa": {"chat": str(qa)}, **eval_section},
                        "sweep": {"w_domain": [1], "w_instruct": [1], "metric": "chat.strict", "qa": {"chat": str(qa)}}}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Asked(Exception):
    """Raised by the stand-in of the evaluation once it has recorded what it was asked."""


def _record(monkeypatch, seen):
    import finmerge.evaluation.run as evaluation
    import finmerge.sweep.run as sweep

    def evaluate(models, settings, progress=None):
        seen.update(settings=settings)
        raise Asked

    def run_sweep(merge, settings, workdir, log=print, keep_best=None):
        seen.update(settings=settings.eval, grid=settings, pickles=os.environ.get("FINMERGE_ALLOW_PICKLE"))
        raise Asked

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    monkeypatch.setattr(sweep, "run_sweep", run_sweep)


@pytest.mark.parametrize("name", sorted(ASKS_QUESTIONS_FROM_A_RECIPE))
def test_every_command_that_asks_questions_uses_the_recipes_chat_template(name, tiny_family, tmp_path, monkeypatch):
    path = _recipe_with_template(tiny_family, tmp_path)
    seen = {}
    _record(monkeypatch, seen)
    args = {"sweep": ["sweep", path, "--out", tmp_path / "sweep-out"], "reproduce": ["reproduce", path]}[name]
    result = invoke(args, cwd=tmp_path, env={"FINMERGE_DEBUG": "1"})
    assert seen, f"the evaluation was never asked:\n{result.stderr}"
    assert seen["settings"].chat_template == TEMPLATE


def test_sweep_takes_the_flags_and_the_recipes_eval_knobs(tiny_family, tmp_path, monkeypatch):
    """`finmerge sweep` scores its points as `finmerge reproduce`'s sweep stage does: finmerge.eval's knobs
    (generate included), and the flags from its own command line."""
    path = _recipe_with_template(tiny_family, tmp_path, generate=False, max_new_tokens=7)
    seen = {}
    _record(monkeypatch, seen)
    monkeypatch.delenv("FINMERGE_ALLOW_PICKLE", raising=False)
    invoke(["sweep", path, "--out", tmp_path / "out", "--trust-remote-code", "--allow-pickle", "--w-domain", "0.5,1"],
           cwd=tmp_path, env={"FINMERGE_DEBUG": "1"})
    settings = seen["settings"]
    assert (settings.generate, settings.max_new_tokens) == (False, 7)
    assert settings.trust_remote_code and settings.allow_pickle
    assert seen["pickles"] is None  # the flag travels in the settings, never through the environment
    assert seen["grid"].w_domain == [0.5, 1.0] and seen["grid"].metric == "chat.strict"


# --- dtype names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling,torch_name", [("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("float16", "float16"),
                                                 ("fp16", "float16"), ("float32", "float32"), ("fp32", "float32")])
def test_every_command_reads_a_dtype_as_torch_mergekit_or_short_names_spell_it(spelling, torch_name):
    from finmerge.cli.options import Dtype
    from finmerge.cli.pretrain import parse_command_line
    from finmerge.evaluation.settings import EvalSettings
    from finmerge.pretrain.config import build_config

    eval_dtype = next(p for p in cli.get_command(None, "eval").params if p.name == "dtype").type
    diagnose_dtype = next(p for p in cli.get_command(None, "diagnose").params if p.name == "dtype").type
    assert isinstance(eval_dtype, Dtype) and isinstance(diagnose_dtype, Dtype)
    assert eval_dtype.convert(spelling, None, None) == torch_name == diagnose_dtype.convert(spelling, None, None)
    assert EvalSettings(dtype=spelling).dtype == torch_name
    _, values, _ = parse_command_line(["--save_dtype", spelling, "--precision", spelling])
    config = build_config(None, {**values, "model": "m", "data": ["d"], "output": "/nonexistent/out"})
    assert config.save_dtype == torch_name
    assert config.precision == {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[torch_name]


def test_eval_loads_a_model_in_the_dtype_a_recipe_names(tiny_family, tmp_path):
    """`dtype: bfloat16`, as every recipe writes it, on `finmerge eval`'s command line."""
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": CHATS[0][0], "answer": CHATS[0][1]}))
    out = tmp_path / "results.json"
    result = invoke(["eval", tiny_family.instruct, "--qa", f"chat={qa}", "--no-generate", "--dtype", "bfloat16",
                     "--out", out], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert next(iter(json.loads(out.read_text()).values()))["dtype"] == "bfloat16"


def test_an_unknown_dtype_is_refused_with_the_spellings():
    result = invoke(["eval", ".", "--text", "x", "--dtype", "bf17"])
    assert result.returncode != 0 and "bf17" in result.stderr and "bfloat16 / bf16" in result.stderr


# --- the finmerge: section's reference --------------------------------------------------------------------

def test_docs_section_table_is_up_to_date():
    from finmerge.reproduce.settings import render

    with open(os.path.join(ROOT, "docs", "reproduce.md"), encoding="utf-8") as handle:
        document = handle.read()
    assert render(document) == document, "run: python -m finmerge.reproduce.settings docs/reproduce.md"


def test_recipe_sections_and_command_settings_share_their_fields():
    """The eval/sweep sections are made of the fields `evaluate` and `run_sweep` take: one definition each."""
    from finmerge.evaluation.settings import EvalSettings
    from finmerge.reproduce.settings import EvalSection, SweepSection
    from finmerge.sweep.run import SweepSettings

    for section, settings in ((EvalSection, EvalSettings), (SweepSection, SweepSettings)):
        for name, field in section.model_fields.items():
            owner = settings if name in settings.model_fields else EvalSettings
            assert owner.model_fields[name].default == field.default, name
            assert owner.model_fields[name].description == field.description, name
