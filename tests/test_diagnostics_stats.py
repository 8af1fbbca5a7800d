"""Diagnostics statistics from the domain_instruct kernel, in memory, against direct torch computations."""

import json
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from diagnostics_helpers import assert_stats_match, concatenated
from finmerge.plugins import method as method_module
from finmerge.plugins.merge_context import MergeContext, MergeOverlapError, current_merge, merging
from finmerge.diagnostics import StatsCollector
from finmerge.diagnostics.aggregate import Aggregates
from finmerge.diagnostics.names import classify
from finmerge.diagnostics.report import write_report
from finmerge.plugins.method import domain_instruct_merge

ROLES = {"role": {"domain": "domain", "instruct": "instruct"}}


def _llama_like(seed=0, layers=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    base = {"model.embed_tokens.weight": rand(40, 8), "model.norm.weight": 1 + rand(8, scale=0.1), "lm_head.weight": rand(40, 8)}
    for n in range(layers):
        for module, shape in (("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)), ("self_attn.v_proj", (4, 8)),
                              ("self_attn.o_proj", (8, 8)), ("mlp.gate_proj", (16, 8)), ("mlp.up_proj", (16, 8)),
                              ("mlp.down_proj", (8, 16))):
            base[f"model.layers.{n}.{module}.weight"] = rand(*shape)
        base[f"model.layers.{n}.input_layernorm.weight"] = 1 + rand(8, scale=0.1)
    # some shared direction, so the cosines are not all near zero
    shared = {k: rand(*v.shape, scale=0.05) for k, v in base.items()}
    domain = {k: v + shared[k] + rand(*v.shape, scale=0.05) for k, v in base.items()}
    instruct = {k: v + 0.5 * shared[k] + rand(*v.shape, scale=0.02) for k, v in base.items()}
    return {"base": base, "domain": domain, "instruct": instruct}


def _measure(models, collector=None, **kwargs):
    collector = collector or StatsCollector()
    with merging(MergeContext(collector=collector)):
        merge_state_dicts(models, domain_instruct_merge, parameters=dict(ROLES), base="base", **kwargs)
    return collector


def _report(collector, tmp_path):
    report = write_report(str(tmp_path), collector, {"base": "b", "domain": "d", "instruct": "i"}, source="merge")
    text = (tmp_path / "diagnostics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return report, json.loads(text)


@pytest.mark.parametrize("chunk", [None, 7])  # 7: every tensor spans several chunks, none divides evenly
def test_per_tensor_stats_match_torch(monkeypatch, tmp_path, chunk):
    if chunk:
        monkeypatch.setattr(method_module, "_CHUNK_ELEMENTS", chunk)
    models = _llama_like()
    _, data = _report(_measure(models), tmp_path)
    assert {t["name"] for t in data["tensors"]} == set(models["base"])
    for entry in data["tensors"]:
        tau_d, tau_i, base = concatenated(models, [entry["name"]])
        assert_stats_match(entry, tau_d, tau_i, base)


def test_bf16_inputs_measured_as_the_kernel_sees_them(tmp_path):
    models = _llama_like(dtype=torch.bfloat16)
    _, data = _report(_measure(models), tmp_path)
    for entry in data["tensors"]:
        tau_d, tau_i, base = concatenated(models, [entry["name"]])
        assert_stats_match(entry, tau_d, tau_i, base)


def test_aggregates_equal_flattening_and_concatenating(tmp_path):
    models = _llama_like(layers=4)
    _, data = _report(_measure(models), tmp_path)
    names = list(models["base"])
    assert_stats_match(data["overall"], *concatenated(models, names))
    for entry in data["by_module"]:
        members = [n for n in names if classify(n)[1] == entry["module"]]
        assert entry["tensors"] == len(members)
        assert_stats_match(entry, *concatenated(models, members))
    for entry in data["by_layer"]:
        members = [n for n in names if classify(n)[0] == entry["layer"]]
        assert_stats_match(entry, *concatenated(models, members))
    for entry in data["cells"]:
        members = [n for n in names if classify(n) == (entry["layer"], entry["module"])]
        assert_stats_match(entry, *concatenated(models, members))
    assert [e["layer"] for e in data["by_layer"]] == [0, 1, 2, 3]
    # the overall cosine is not the mean of the per-tensor cosines (what the sums avoid)
    mean = sum(t["cos"] for t in data["tensors"]) / len(data["tensors"])
    assert abs(mean - data["overall"]["cos"]) > 1e-3


def test_sign_agreement_among_entries_where_both_vectors_are_non_zero(tmp_path):
    """As on bf16 weights with a small fine-tune: most entries of τ_i are exactly zero. Independent signs
    must still read about 50%, with the non-zero share beside it (a share of ALL entries read ~2%)."""
    generator = torch.Generator().manual_seed(3)
    base = {f"model.layers.0.mlp.{m}_proj.weight": torch.randn(64, 128, generator=generator) for m in ("up", "down")}
    domain = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    instruct = {}
    for name, value in base.items():
        touched = torch.rand(value.shape, generator=generator) < 0.04  # 96% of τ_i is zero
        instruct[name] = torch.where(touched, value + 0.01 * torch.randn(value.shape, generator=generator), value)
    models = {"base": base, "domain": domain, "instruct": instruct}
    _, data = _report(_measure(models), tmp_path)
    tau_d, tau_i, flat_base = concatenated(models, list(base))
    assert_stats_match(data["overall"], tau_d, tau_i, flat_base)
    for entry in data["tensors"]:
        assert_stats_match(entry, *concatenated(models, [entry["name"]]))
    overall = data["overall"]
    assert 0.02 < overall["nonzero_share"] < 0.06
    assert 0.4 < overall["sign_agree"] < 0.6  # independent signs
    assert overall["sums"]["both_nonzero"] == int(((tau_d != 0) & (tau_i != 0)).sum())


def test_orthogonal_vectors_have_zero_cosine(tmp_path):
    generator = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 32, generator=generator), "v": torch.randn(1000, generator=generator)}
    tau = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    even = {k: (torch.arange(v.numel()) % 2 == 0).reshape(v.shape) for k, v in base.items()}
    models = {  # disjoint supports: exactly orthogonal, no entry with both non-zero
        "base": base,
        "domain": {k: base[k] + tau[k] * even[k] for k in base},
        "instruct": {k: base[k] - tau[k] * ~even[k] for k in base},
    }
    _, data = _report(_measure(models), tmp_path)
    for entry in [data["overall"], *data["tensors"]]:
        assert entry["cos"] == 0.0 and entry["nonzero_share"] == 0.0
        assert entry["sign_agree"] is None  # no entry where both are non-zero: no sign to compare
        assert entry["norm_domain"] > 0 and entry["norm_instruct"] > 0
    assert data["verdict"].startswith("Nearly orthogonal")


def test_dense_orthogonal_vectors(tmp_path):
    generator = torch.Generator().manual_seed(2)
    a, b = torch.randn(4096, generator=generator, dtype=torch.float64), torch.randn(4096, generator=generator, dtype=torch.float64)
    b -= (a @ b) / (a @ a) * a  # Gram-Schmidt in float64
    base = torch.zeros(4096)
    models = {"base": {"x": base}, "domain": {"x": a.float()}, "instruct": {"x": b.float()}}
    _, data = _report(_measure(models), tmp_path)
    assert abs(data["overall"]["cos"]) < 1e-5
    assert data["overall"]["rel_domain"] is None  # zero base: no relative size, and no crash


@pytest.mark.parametrize("factor,expected", [(2.0, 1.0), (-0.5, -1.0)])
def test_parallel_vectors_have_cosine_one(tmp_path, factor, expected):
    generator = torch.Generator().manual_seed(3)
    # multiples of 1/64 and 1/1024: every sum and difference below is exact in fp32
    base = {"w": torch.randint(-64, 64, (48, 16), generator=generator).float() / 64}
    tau = torch.randint(-8, 9, (48, 16), generator=generator).float() / 1024
    models = {"base": base, "domain": {"w": base["w"] + tau}, "instruct": {"w": base["w"] + factor * tau}}
    _, data = _report(_measure(models), tmp_path)
    entry = data["tensors"][0]
    assert entry["cos"] == pytest.approx(expected, abs=1e-12)
    assert entry["norm_instruct"] == pytest.approx(abs(factor) * entry["norm_domain"], rel=1e-12)
    assert entry["nonzero_share"] == pytest.approx(float((tau != 0).double().mean()), abs=1e-12)
    assert entry["sign_agree"] == (1.0 if factor > 0 else 0.0)  # among the entries where both are non-zero
    assert data["verdict"].startswith("Strongly aligned" if factor > 0 else "Strongly opposed")


def test_zero_task_vector_cosine_is_undefined_not_nan(tmp_path):
    models = _llama_like(layers=1)
    models["domain"] = {k: v.clone() for k, v in models["base"].items()}  # domain == base
    models["instruct"]["model.norm.weight"] = models["base"]["model.norm.weight"].clone()
    report, data = _report(_measure(models), tmp_path)
    assert data["overall"]["cos"] is None and data["overall"]["norm_domain"] == 0.0
    assert all(t["cos"] is None for t in data["tensors"])
    assert data["overall"]["norm_instruct"] > 0 and data["overall"]["sign_agree"] is None
    assert data["overall"]["nonzero_share"] == 0.0
    assert "domain task vector is zero" in data["verdict"]
    markdown = (tmp_path / "diagnostics.md").read_text()
    assert "nan" not in markdown.lower() and "| n/a |" in markdown
    assert "n/a" in report.card_section()


def test_multithreaded_accumulation_equals_sequential():
    models = _llama_like(layers=6)
    sequential = _measure(models)
    collector = StatsCollector()
    names = list(models["base"]) * 3  # the same tensor again replaces, never double counts

    def merge_one(name):
        tensors = [models[r][name] for r in ("base", "domain", "instruct")]
        merge_tensors(tensors, domain_instruct_merge, ids=["base", "domain", "instruct"], base_index=0,
                      parameters=dict(ROLES), name=name)

    with merging(MergeContext(collector=collector)), ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(merge_one, names))
    threaded = {t.name: t.sums for t in collector.tensors()}
    assert threaded == {t.name: t.sums for t in sequential.tensors()}


def test_collector_finish_is_thread_safe():
    collector = StatsCollector()
    barrier = threading.Barrier(8)

    def feed(worker):
        barrier.wait()
        for n in range(200):
            accumulator = collector.start_tensor(f"model.layers.{worker}.t{n}.weight", (3,))
            accumulator.update(torch.ones(3), torch.ones(3), -torch.ones(3))
            collector.finish_tensor(accumulator)

    threads = [threading.Thread(target=feed, args=(w,)) for w in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    overall = Aggregates(collector.tensors()).overall
    assert overall.tensors == 1600 and overall.n == 4800 and overall.cos == -1.0


def test_collector_is_per_merge():
    first, second = StatsCollector(), StatsCollector()
    with merging(MergeContext(collector=first)):
        assert current_merge().collector is first
        with pytest.raises(MergeOverlapError, match="already running"):
            with merging(MergeContext(collector=second)):
                pass
        assert current_merge().collector is first  # the refused one changed nothing
    assert current_merge().collector is None
    models = _llama_like()
    _measure(models, first)
    _measure({**models, "domain": models["instruct"]}, second)
    assert first.tensors()[0].sums != second.tensors()[0].sums
    assert len(first.tensors()) == len(second.tensors()) == len(models["base"])


def test_no_statistics_without_an_active_collector(monkeypatch):
    """Without a collector in the running merge's context the kernel still merges exactly and measures nothing at all."""
    from finmerge.diagnostics.stats import TensorAccumulator

    calls = []
    for cls, name in ((TensorAccumulator, "update"), (StatsCollector, "start_tensor"), (StatsCollector, "finish_tensor")):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    models = _llama_like(layers=1)
    idle = StatsCollector()  # exists but is not active: must stay empty
    assert current_merge().collector is None
    merged = merge_state_dicts(models, domain_instruct_merge, parameters=dict(ROLES), base="base")
    assert calls == [] and idle.tensors() == [] and current_merge().collector is None
    base, domain, instruct = models["base"], models["domain"], models["instruct"]
    assert set(merged) == set(base)
    for name, value in merged.items():
        expected = base[name].double() + (domain[name].double() - base[name].double()) + (instruct[name].double() - base[name].double())
        assert torch.allclose(value.double(), expected, atol=1e-6, rtol=0), name
    _measure(models)  # the spies do see a collecting merge, so an empty `calls` above means something
    assert {"update", "start_tensor", "finish_tensor"} <= set(calls)


@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.self_attn.q_proj.weight", (3, "q")),
    ("model.layers.3.self_attn.k_proj.bias", (3, "k")),
    ("model.layers.3.self_attn.v_proj.weight", (3, "v")),
    ("model.layers.3.self_attn.o_proj.weight", (3, "o")),
    ("model.layers.12.mlp.gate_proj.weight", (12, "gate")),
    ("model.layers.12.mlp.up_proj.weight", (12, "up")),
    ("model.layers.12.mlp.down_proj.weight", (12, "down")),
    ("model.layers.0.input_layernorm.weight", (0, "norm")),
    ("model.layers.0.post_attention_layernorm.weight", (0, "norm")),
    ("model.layers.0.self_attn.q_norm.weight", (0, "norm")),
    ("model.embed_tokens.weight", (None, "embed")),
    ("model.norm.weight", (None, "norm")),
    ("lm_head.weight", (None, "lm_head")),
    ("transformer.h.3.attn.c_attn.weight", (3, "qkv")),
    ("transformer.h.3.attn.c_attn.bias", (3, "qkv")),
    ("transformer.h.3.attn.c_proj.weight", (3, "o")),
    ("transformer.h.3.mlp.w1.weight", (3, "up")),
    ("transformer.h.3.mlp.w2.weight", (3, "gate")),
    ("transformer.h.3.mlp.c_proj.weight", (3, "down")),
    ("transformer.h.3.ln_1.weight", (3, "norm")),
    ("transformer.h.3.ln_2.weight", (3, "norm")),
    ("transformer.ln_f.weight", (None, "norm")),
    ("transformer.wte.weight", (None, "embed")),
    ("model.layers.1.block_sparse_moe.experts.7.w2.weight", (1, "down")),
    ("gpt_neox.layers.2.attention.query_key_value.weight", (2, "qkv")),
    ("model.rotary_emb.inv_freq", (None, "other")),
])
def test_layer_and_module_from_name(name, expected):
    assert classify(name) == expected


def test_report_needs_no_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    for name in [m for m in list(sys.modules) if m.startswith("matplotlib.")]:  # list(): atomic copy
        monkeypatch.setitem(sys.modules, name, None)
    report, data = _report(_measure(_llama_like(layers=1)), tmp_path)
    assert report.heatmap == data["heatmap"] == "diagnostics.svg"
    assert "diagnostics.svg" in report.card_section()


def test_report_files_and_heatmap(tmp_path):
    from xml.etree import ElementTree

    report, data = _report(_measure(_llama_like()), tmp_path)
    assert data["heatmap"] == "diagnostics.svg"
    markdown = (tmp_path / "diagnostics.md").read_text()
    assert data["verdict"] in markdown and "## By module type" in markdown and "| outside blocks |" in markdown
    assert "![cosine heatmap](diagnostics.svg)" in markdown
    assert math.isfinite(data["overall"]["cos"])
    # the SVG parses, and holds one cell per (layer, module type) whose hover text is the JSON's cosine
    svg = ElementTree.parse(tmp_path / "diagnostics.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    hovers = {r.find(ns + "title").text: r.get("fill") for r in svg.iter(ns + "rect") if r.find(ns + "title") is not None}
    layers = sorted({c["layer"] for c in data["cells"] if c["layer"] is not None}) + [None]
    modules = [m["module"] for m in data["by_module"]]
    assert len(hovers) == len(layers) * len(modules)
    for cell in data["cells"]:
        label = "outside blocks" if cell["layer"] is None else str(cell["layer"])
        key = f"layer {label}, {cell['module']}: " + ("n/a" if cell["cos"] is None else f"{cell['cos']:+.4f}")
        assert key in hovers, key


@pytest.mark.parametrize("value", [-1.0, -0.73, -0.2, -0.05, 0.0, 0.01, 0.31, 0.5, 0.999, 1.0, 1.7])
def test_heatmap_colours_are_matplotlibs_rdbu_r(value):
    """The scale written by hand against matplotlib's own colormap (the oracle; clipped beyond the limit)."""
    from matplotlib import colormaps

    from finmerge.diagnostics.heatmap import colour

    expected = colormaps["RdBu_r"]((max(-1.0, min(1.0, value)) + 1) / 2)
    ours = colour(value, 1.0)
    got = [int(ours[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    # matplotlib looks colours up in a 256-entry table: up to ~2/255 from the exact interpolation
    assert got == pytest.approx(expected[:3], abs=3 / 255)
    assert colour(value * 0.2, 0.2) == ours  # the scale is relative to the limit


def test_accumulator_refuses_chunks_too_large_for_exact_counts():
    accumulator = StatsCollector().start_tensor("w", (2**24 + 1,))
    big = torch.zeros(2**24 + 1)
    with pytest.raises(ValueError, match="at most 16777216 entries"):
        accumulator.update(big, big, big)
