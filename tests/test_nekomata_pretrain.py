"""The paper's pretrain config, recipes/pretrain-nekomata-14b.yml, as a user runs it, on the strict Qwen-v1
fixture: no flag besides --trust_remote_code, only the model, corpus, output and sizes given on the command line."""

import json
import os

import pytest
import yaml

from pretrain_fixtures import finance_documents
from qwen_fixture import build_qwen_v1_triplet
from tests.bad_input import command, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "recipes", f"pretrain-nekomata-{size}.yml") for size in ("14b", "7b")]


@pytest.mark.parametrize("config_file", CONFIGS, ids=["14b", "7b"])
def test_nekomata_configs_request_no_attention_backend_and_say_why(config_file):
    with open(config_file, encoding="utf-8") as handle:
        text = handle.read()
    assert "attn_implementation" not in yaml.safe_load(text)  # transformers picks: eager for Qwen-v1's code
    assert "its attention itself" in text and "flash-attn" in text and "CUDA" in text


@pytest.mark.slow
def test_the_14b_config_trains_the_qwen_v1_fixture_with_only_the_remote_code_flag(tmp_path):
    base = build_qwen_v1_triplet(str(tmp_path / "models"))["base"]
    corpus = tmp_path / "finance"
    corpus.mkdir()
    for index, text in enumerate(finance_documents(30, seed=5, min_sentences=8, max_sentences=10)):
        (corpus / f"filing-{index:02d}.txt").write_text(text, encoding="utf-8")  # txt_document: file
    out = tmp_path / "domain"
    result = run([command("finmerge"), "pretrain", CONFIGS[0], "--trust_remote_code", "--model", base,
                  "--data", str(corpus), "--output", str(out), "--max_steps", "2", "--seq_len", "32",
                  "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_threads", "1"],
                 env={"HF_MODULES_CACHE": str(tmp_path / "modules")}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["config"]["activation_checkpointing"] is True and summary["config"]["nfkc"] is True
    assert summary["config"].get("attn_implementation") is None
