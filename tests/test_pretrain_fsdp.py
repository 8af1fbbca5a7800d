"""FSDP: the wrap class is checked against the model before anything runs, and a configuration that accelerate
would not shard (CPU processes) is refused instead of silently training DDP.

accelerate 1.15 enables FSDP only for accelerator process groups (AcceleratorState sets DistributedType.FSDP in
its GPU/XPU/NPU/... branch); CPU processes with gloo become MULTI_CPU, i.e. DDP. So the shipped fsdp.yaml cannot
train sharded on this project's CPU-only CI; its CPU variant is run to show that the refusal is what a user gets.
"""

import os
import subprocess

import pytest
import yaml

from finmerge.pretrain.config import PretrainError, build_config
from pretrain_fixtures import accelerate_launch, finance_documents, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_fsdp_config(path, wrap_class="LlamaDecoderLayer"):
    """The shipped recipes/accelerate/fsdp.yaml for 2 CPU processes: no mixed precision, the tiny model's layer."""
    with open(os.path.join(ROOT, "recipes", "accelerate", "fsdp.yaml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.update(num_processes=2, mixed_precision="no")
    config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = wrap_class
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle)
    return str(path)


def _config(tiny_family, tmp_path, **values):
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(30, seed=3))
    return build_config(None, {"model": tiny_family.base, "data": [data], "output": str(tmp_path / "out"),
                               "seq_len": 32, "max_steps": 2, "num_threads": 1, **values})


def test_wrong_wrap_class_names_the_decoder_layers_the_model_has(tiny_family, tmp_path, monkeypatch):
    from finmerge.pretrain.train import run_pretraining

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "QWenBlock")
    with pytest.raises(PretrainError, match=r"FSDP wrap class QWenBlock is not a layer of .* decoder-layer classes "
                                            r"are: LlamaDecoderLayer"):
        run_pretraining(_config(tiny_family, tmp_path))
    assert not (tmp_path / "out").exists()  # refused before any data was read or folder made


def test_wrap_class_from_fsdp_config_is_checked_too(tiny_family, tmp_path):
    from finmerge.pretrain.base_model import load_model_config
    from finmerge.pretrain.distributed import check_fsdp_wrap_class

    config = _config(tiny_family, tmp_path, fsdp="full_shard",
                     fsdp_config={"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
    with pytest.raises(PretrainError, match=r"Qwen2DecoderLayer is not a layer .*LlamaDecoderLayer"):
        check_fsdp_wrap_class(config, load_model_config(config))
    good = _config(tiny_family, tmp_path, fsdp="full_shard",
                   fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    check_fsdp_wrap_class(good, load_model_config(good))  # the model's own layer passes


def test_fsdp_without_accelerators_is_refused_not_run_as_ddp(tiny_family, tmp_path, monkeypatch):
    from finmerge.pretrain.train import run_pretraining

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    with pytest.raises(PretrainError, match=r"FSDP is requested .* would train unsharded DDP"):
        run_pretraining(_config(tiny_family, tmp_path))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_shipped_fsdp_config_on_two_cpu_processes_is_refused_cleanly(tiny_family, tmp_path):
    """The shipped fsdp.yaml, made CPU-sized, through a real `accelerate launch`: a clear refusal, no output."""
    data = write_jsonl(str(tmp_path / "c.jsonl"), finance_documents(30, seed=3))
    out = tmp_path / "out"
    command = [*accelerate_launch(cpu_fsdp_config(tmp_path / "fsdp-cpu.yaml")), "-m",
               "finmerge.cli.main", "pretrain", "--model", tiny_family.base, "--data", data, "--output", str(out),
               "--max_steps", "4", "--save_steps", "2", "--seq_len", "32", "--num_threads", "1"]
    result = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "FSDP is requested" in result.stderr and "would train unsharded DDP" in result.stderr
    assert not out.exists() or not (out / "training_summary.json").exists()
