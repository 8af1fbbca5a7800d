"""benchmarks/bench_merge.py --shape: the checkpoints it measures have the paper's models' layout.

The benchmark's memory and time figures stand for nekomata only if its random triplets have the real
tensor names, shapes and sharding; these tests hold them to the test suite's Qwen-v1 fixture and to
the published model sizes, without building anything large.
"""

import argparse
import importlib.util
import os

import pytest
import torch
from safetensors import safe_open

import qwen_fixture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_merge", os.path.join(ROOT, "benchmarks", "bench_merge.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tensor_names_and_shapes_are_the_qwen_v1_fixtures(bench):
    c = qwen_fixture.CONFIG
    shapes = bench.qwen_shapes(c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"])
    assert shapes == qwen_fixture._shapes()


@pytest.mark.parametrize("shape, billions", [("nekomata-14b", 14.17), ("nekomata-7b", 7.72)])
def test_full_shapes_have_the_published_parameter_counts(bench, shape, billions):
    # Qwen-14B / Qwen-7B (nekomata's bases) report 14.2B and 7.7B parameters, untied lm_head included
    s = bench.QWEN_SHAPES[shape]
    shapes = bench.qwen_shapes(s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"])
    assert sum(torch.Size(v).numel() for v in shapes.values()) / 1e9 == pytest.approx(billions, abs=0.01)


def test_shards_fill_up_to_the_size_in_order(bench):
    shapes = {"a": (10,), "b": (10,), "c": (30,), "d": (1,)}  # 20, 20, 60, 2 bytes in bf16
    assert bench.plan_shards(shapes, 40) == [["a", "b"], ["c"], ["d"]]


def test_shared_layers_are_hard_links_and_the_rest_differ(bench, tmp_path, monkeypatch):
    # a layer is 1.3 MB in bf16, so 1 MiB shards put most layer tensors in shards of their own
    monkeypatch.setitem(bench.QWEN_SHAPES, "tiny", {"hidden_size": 256, "num_hidden_layers": 4,
                                                    "intermediate_size": 1024, "vocab_size": 1000,
                                                    "num_attention_heads": 4})
    args = argparse.Namespace(shape="tiny", shape_layers=0, share_layers=True, shard_mb=1)
    built = bench.write_qwen_checkpoints(str(tmp_path), args)
    paths = built["paths"]
    index = {}
    for name in sorted(os.listdir(paths["base"])):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(paths["base"], name), "pt") as handle:
                index[name] = list(handle.keys())
    assert len(index) == built["shards"] and 0 < built["linked"] < 2 * built["shards"]
    for name, members in index.items():
        linked = os.path.samefile(os.path.join(paths["base"], name), os.path.join(paths["domain"], name))
        holds_ends = "transformer.wte.weight" in members or "lm_head.weight" in members
        assert linked == (not holds_ends), name
        if holds_ends:
            with safe_open(os.path.join(paths["base"], name), "pt") as b, \
                    safe_open(os.path.join(paths["domain"], name), "pt") as d, \
                    safe_open(os.path.join(paths["instruct"], name), "pt") as i:
                for tensor in members:
                    base, domain, instruct = b.get_tensor(tensor), d.get_tensor(tensor), i.get_tensor(tensor)
                    assert base.dtype == torch.bfloat16 and torch.isfinite(base.float()).all()
                    assert not torch.equal(base, domain) and not torch.equal(domain, instruct), tensor
