"""The pretrain config: one dataclass -> YAML schema and --help; CLI overrides; refusals. No torch needed."""

import dataclasses
import glob
import os

import pytest
from click.testing import CliRunner

from finmerge.cli.pretrain import pretrain
from finmerge.pretrain.config import PretrainConfig, PretrainError, build_config, fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def test_help_is_generated_from_the_dataclass():
    result = CliRunner().invoke(pretrain, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for f in dataclasses.fields(PretrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
        # the first words of the field's documentation appear in --help
        assert " ".join(f.metadata["help"].split()[:5]) in text, f.name
    assert "--no-dedup" in text and "[default: 2048]" in text


def test_yaml_values_then_command_line_overrides(tmp_path):
    (tmp_path / "corpus").mkdir()
    config_file = _write(tmp_path / "cfg.yml", "model: base\noutput: out\ndata: [corpus, other/x.jsonl]\n"
                                               "seq_len: 128\nlearning_rate: 1.0e-4\nnfkc: true\n")
    config = build_config(config_file, {"seq_len": 32, "nfkc": None, "max_steps": 7})
    assert config.seq_len == 32                       # command line wins
    assert config.learning_rate == 1e-4 and config.nfkc is True  # from YAML
    assert config.max_steps == 7
    assert config.data == [str(tmp_path / "corpus"), "other/x.jsonl"]  # existing relative path -> beside the file
    assert config.model == "base" and config.output == "out"
    assert config.per_device_train_batch_size == PretrainConfig.per_device_train_batch_size  # default untouched
    assert build_config(config_file, {"data": ("a.jsonl",)}).data == ["a.jsonl"]  # --data replaces the list


def test_flags_only_through_the_cli_parser(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("finmerge.pretrain.train.run_pretraining", lambda config: seen.setdefault("config", config) and {})
    result = CliRunner().invoke(pretrain, ["--model", "m", "--data", "a.txt", "--data", "b/", "--output", "o",
                                           "--max-steps", "5", "--seq-len", "16", "--no-near-dedup", "--nfkc"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.model, config.data, config.output) == ("m", ["a.txt", "b/"], "o")
    assert (config.max_steps, config.seq_len, config.near_dedup, config.nfkc, config.dedup) == (5, 16, False, True, True)
    assert config.trust_remote_code is False


def test_unknown_yaml_field_is_named_with_a_suggestion(tmp_path):
    config_file = _write(tmp_path / "cfg.yml", "model: m\noutput: o\ndata: [x]\nseq_length: 64\n")
    with pytest.raises(PretrainError, match=r"cfg.yml: unknown field `seq_length`. Did you mean seq_len"):
        build_config(config_file)


def test_config_file_cannot_turn_on_trust_remote_code(tmp_path):
    config_file = _write(tmp_path / "cfg.yml", "model: m\noutput: o\ndata: [x]\ntrust_remote_code: true\n")
    with pytest.raises(PretrainError, match=r"`trust_remote_code` cannot be set in a config file.*--trust-remote-code"):
        build_config(config_file)
    result = CliRunner().invoke(pretrain, [config_file])
    assert result.exit_code != 0 and "--trust-remote-code on the command line" in result.output
    # the flag itself is accepted
    clean = _write(tmp_path / "ok.yml", "model: m\noutput: o\ndata: [x]\n")
    assert build_config(clean, {"trust_remote_code": True}).trust_remote_code is True
    assert build_config(clean).trust_remote_code is False


@pytest.mark.parametrize("line, message", [
    ("seq_len: abc", r"`seq_len` must be an integer; got 'abc'"),
    ("nfkc: 3", r"`nfkc` must be true or false"),
    ("precision: int4", r"`precision` must be one of auto, bf16, fp16, fp32"),
    ("replay_ratio: 1.0", r"`replay_ratio` must be in \[0, 1\)"),
    ("seq_len: 1", r"`seq_len` must be at least 2"),
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
    with pytest.raises(PretrainError, match=r"not valid YAML"):
        build_config(_write(tmp_path / "bad.yml", "model: [unclosed\n"))
    with pytest.raises(PretrainError, match=r"must be a mapping"):
        build_config(_write(tmp_path / "list.yml", "- a\n- b\n"))
    with pytest.raises(PretrainError, match=r"replay_ratio` is > 0 but no `replay_data`"):
        build_config(None, {"model": "m", "output": "o", "data": ("x",), "replay_ratio": 0.2})


def test_example_configs_parse():
    files = sorted(glob.glob(os.path.join(ROOT, "recipes", "pretrain-*.yml")))
    assert len(files) >= 2
    for path in files:
        config = build_config(path)
        assert config.model and config.data and config.output and config.seq_len >= 64


def test_fingerprint_tracks_what_changes_the_weights():
    base = build_config(None, {"model": "m", "output": "o", "data": ("x",)})
    data, model = [{"file": "x", "sha256": "1"}], {"hub": "m"}
    reference = fingerprint(base, data, model)
    same = [dataclasses.replace(base, num_threads=3), dataclasses.replace(base, output="elsewhere"),
            dataclasses.replace(base, save_steps=7), dataclasses.replace(base, data=["moved/x"])]
    for config in same:
        assert fingerprint(config, data, model) == reference
    changed = [dataclasses.replace(base, learning_rate=1.0), dataclasses.replace(base, seq_len=64),
               dataclasses.replace(base, max_steps=3), dataclasses.replace(base, seed=1)]
    for config in changed:
        assert fingerprint(config, data, model) != reference
    assert fingerprint(base, [{"file": "x", "sha256": "2"}], model) != reference
    assert fingerprint(base, data, {"hub": "other"}) != reference


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
