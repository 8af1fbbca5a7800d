"""The pretrain config: a TrainingArguments subclass -> YAML, overrides, flags, --help and docs from one source."""

import dataclasses
import glob
import os

import pytest
from click.testing import CliRunner

from finmerge.cli.pretrain import pretrain
from finmerge.pretrain.config import PretrainConfig, PretrainError, build_config, fingerprint
from finmerge.safety.flags import CommandLineOnlyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"model": "m", "output": "o", "data": ["x"]}


def _write(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def test_config_is_training_arguments_and_help_lists_every_option():
    from transformers import TrainingArguments

    assert issubclass(PretrainConfig, TrainingArguments)
    result = CliRunner().invoke(pretrain, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for f in dataclasses.fields(PretrainConfig):
        if f.init:
            assert f"--{f.name}" in text, f.name
    for trainer_option in ("--optim", "--gradient_accumulation_steps", "--lr_scheduler_type", "--report_to",
                           "--deepspeed", "--fsdp", "--torch_compile", "--warmup_steps"):
        assert trainer_option in text
    assert " ".join(PretrainConfig.__dataclass_fields__["seq_len"].metadata["help"].split()[:6]) in text


def test_docs_options_table_is_up_to_date():
    from finmerge.pretrain.options_doc import render

    with open(os.path.join(ROOT, "docs", "pretrain.md"), encoding="utf-8") as handle:
        document = handle.read()
    assert render(document) == document, "run: python -m finmerge.pretrain.options_doc docs/pretrain.md"


def test_yaml_values_then_command_line_overrides(tmp_path):
    (tmp_path / "corpus").mkdir()
    config_file = _write(tmp_path / "cfg.yml", "model: base\noutput: out\ndata: [corpus, other/x.jsonl]\n"
                                               "seq_len: 128\nlearning_rate: 1e-4\nnfkc: true\noptim: adafactor\n"
                                               "gradient_accumulation_steps: 3\n")
    config = build_config(config_file, {"seq_len": 32, "nfkc": None, "max_steps": 7})
    assert config.seq_len == 32                       # overrides win
    assert config.learning_rate == 1e-4 and config.nfkc is True  # YAML's "1e-4" string typed as the flag would be
    assert config.optim == "adafactor" and config.gradient_accumulation_steps == 3  # Trainer options from YAML
    assert config.max_steps == 7
    assert config.data == [str(tmp_path / "corpus"), "other/x.jsonl"]  # existing relative path -> beside the file
    assert config.model == "base" and config.output_dir == "out"
    assert config.per_device_train_batch_size == 4 and config.lr_scheduler_type == "cosine"  # our defaults
    assert build_config(config_file, {"data": ("a.jsonl",)}).data == ["a.jsonl"]  # --data replaces the list


def test_flags_through_the_command_line_parser(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("finmerge.pretrain.train.run_pretraining", lambda config: seen.setdefault("config", config) and {})
    config_file = _write(tmp_path / "cfg.yml", "seq_len: 128\nmin_chars: 5\n")
    result = CliRunner().invoke(pretrain, [config_file, "--model", "m", "--data", "a.txt", "--data", "b/", "c/",
                                           "--output", "o", "--max-steps", "5", "--seq_len", "16", "--no-near-dedup",
                                           "--nfkc", "--optim", "sgd", "--lr_scheduler_type", "linear",
                                           "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.model, config.data, config.output_dir) == ("m", ["a.txt", "b/", "c/"], "o")
    assert (config.max_steps, config.seq_len, config.near_dedup, config.nfkc, config.dedup) == (5, 16, False, True, True)
    assert (config.optim, config.lr_scheduler_type, config.min_chars) == ("sgd", "linear", 5)
    assert config.trust_remote_code is True and config.allow_pickle is False


def test_renamed_keys_work_in_files_and_are_named_on_the_command_line(tmp_path, monkeypatch):
    config_file = _write(tmp_path / "cfg.yml", "model: m\noutput: o\ndata: [x]\nwarmup_ratio: 0.05\n")
    assert build_config(config_file).warmup_steps == 0.05
    assert build_config(None, {**REQUIRED, "warmup_ratio": 0.2}).warmup_steps == 0.2
    monkeypatch.setattr("finmerge.pretrain.train.run_pretraining", lambda config: {})
    result = CliRunner().invoke(pretrain, ["--model", "m", "--data", "x", "--output", "o", "--warmup-ratio", "0.1"])
    assert result.exit_code != 0 and "--warmup-ratio is now --warmup_steps" in result.output
    result = CliRunner().invoke(pretrain, ["--model", "m", "--data", "x", "--output", "o", "--bogus", "1"])
    assert result.exit_code != 0 and "unknown option or extra argument '--bogus'" in result.output


def test_unknown_yaml_field_is_named_with_a_suggestion(tmp_path):
    config_file = _write(tmp_path / "cfg.yml", "model: m\noutput: o\ndata: [x]\nseq_length: 64\n")
    with pytest.raises(PretrainError, match=r"cfg.yml: unknown field `seq_length`. Did you mean seq_len"):
        build_config(config_file)


@pytest.mark.parametrize("key", ["trust_remote_code", "allow_pickle", "trust-remote-code"])
def test_code_and_pickle_flags_are_command_line_only(tmp_path, key):
    config_file = _write(tmp_path / "cfg.yml", f"model: m\noutput: o\ndata: [x]\n{key}: true\n")
    with pytest.raises(CommandLineOnlyError, match=rf"`{key}` cannot be set in a file"):
        build_config(config_file)
    with pytest.raises(CommandLineOnlyError, match=rf"`{key}` cannot be set"):  # nor by a recipe's overrides
        build_config(None, {**REQUIRED, key: True})
    result = CliRunner().invoke(pretrain, [config_file])
    assert result.exit_code != 0 and "on the command line" in result.output
    clean = _write(tmp_path / "ok.yml", "model: m\noutput: o\ndata: [x]\n")
    assert build_config(clean, trust_remote_code=True, allow_pickle=True).trust_remote_code is True
    assert build_config(clean).trust_remote_code is False and build_config(clean).allow_pickle is False


@pytest.mark.parametrize("line, message", [
    ("seq_len: abc", r"`seq_len` must be an integer; got 'abc'"),
    ("nfkc: 3", r"`nfkc` must be true or false"),
    ("precision: int4", r"`precision` must be one of auto, bf16, fp16, fp32"),
    ("replay_ratio: 1.0", r"`replay_ratio` must be in \[0, 1\)"),
    ("seq_len: 1", r"`seq_len` must be at least 2"),
    ("optim: adamw_bogus", r"`optim` must be one of .*adamw_torch"),
    ("learning_rate: fast", r"`learning_rate` must be a number"),
])
def test_bad_values_name_the_field(tmp_path, line, message):
    config_file = _write(tmp_path / "cfg.yml", f"model: m\noutput: o\ndata: [x]\n{line}\n")
    with pytest.raises(PretrainError, match=message):
        build_config(config_file)


def test_required_fields_and_bad_yaml(tmp_path):
    with pytest.raises(PretrainError, match=r"`data` is required"):
        build_config(None, {"model": "m", "output": "o"})
    with pytest.raises(PretrainError, match=r"`model` is required"):
        build_config(None, {"data": ("x",), "output": "o"})
    with pytest.raises(PretrainError, match=r"`output_dir` is required"):
        build_config(None, {"data": ("x",), "model": "m"})
    with pytest.raises(PretrainError, match=r"not valid YAML"):
        build_config(_write(tmp_path / "bad.yml", "model: [unclosed\n"))
    with pytest.raises(PretrainError, match=r"must be a mapping"):
        build_config(_write(tmp_path / "list.yml", "- a\n- b\n"))
    with pytest.raises(PretrainError, match=r"replay_ratio` is > 0 but no `replay_data`"):
        build_config(None, {"model": "m", "output": "o", "data": ("x",), "replay_ratio": 0.2})


def test_example_configs_parse_to_the_values_they_write():
    import yaml

    files = sorted(glob.glob(os.path.join(ROOT, "recipes", "pretrain-*.yml")))
    assert len(files) >= 3
    for path in files:
        with open(path, encoding="utf-8") as handle:
            written = yaml.safe_load(handle)
        config = build_config(path)
        folder = os.path.dirname(path)

        def as_read(value):  # a relative path is read from the config's folder where it exists there
            return [value, os.path.join(folder, value)]

        for key, value in written.items():
            got = getattr(config, key)
            got = getattr(got, "value", got)  # transformers' enums (lr_scheduler_type)
            if key in ("model", "output_dir"):
                assert got in as_read(value), (path, key)
            elif key in ("data", "replay_data"):
                assert len(got) == len(value) and all(g in as_read(v) for g, v in zip(got, value)), (path, key)
            else:
                assert got == value, (path, key, got)


def test_demo_recipe_pretrain_section_builds():
    import yaml

    with open(os.path.join(ROOT, "recipes", "demo.yml"), encoding="utf-8") as handle:
        section = yaml.safe_load(handle)["finmerge"]["pretrain"]
    config = build_config(None, {**section, "model": "m", "output": "o"})
    assert config.replay_ratio == section["replay_ratio"] and config.seq_len == section["seq_len"]


def test_fingerprint_tracks_what_changes_the_weights():
    base = build_config(None, REQUIRED)
    data, model = [{"file": "x", "sha256": "1"}], [{"file": "model.safetensors", "sha256": "a"}]
    reference = fingerprint(base, data, model)

    def changed(**values):
        return build_config(None, {**REQUIRED, **values})

    for config in [changed(num_threads=3), changed(output="elsewhere"), changed(save_steps=7),
                   changed(data=["moved/x"]), changed(logging_steps=3), changed(report_to="tensorboard")]:
        assert fingerprint(config, data, model) == reference
    for config in [changed(learning_rate=1.0), changed(seq_len=64), changed(max_steps=3), changed(seed=1),
                   changed(optim="sgd"), changed(gradient_accumulation_steps=2), changed(save_dtype="float16")]:
        assert fingerprint(config, data, model) != reference
    assert fingerprint(base, [{"file": "x", "sha256": "2"}], model) != reference
    assert fingerprint(base, data, [{"file": "model.safetensors", "sha256": "b"}]) != reference


def test_command_module_sets_passive_omp_before_torch_and_imports_no_torch():
    import subprocess
    import sys

    code = ("import os, sys; import finmerge.cli.pretrain; "
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["False", "PASSIVE"], result.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a user's choice wins
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["False", "ACTIVE"], result.stderr
