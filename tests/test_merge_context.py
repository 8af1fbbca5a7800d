"""The kernel's `MergeContext`: one merge at a time per process, seen from mergekit's worker threads,
and gone after the merge however it ended."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from mergekit.merge_methods import merge_state_dicts, merge_tensors

from finmerge.demo.tiny_models import recipe
from finmerge.diagnostics import StatsCollector
from finmerge.plugins.merge_context import MergeContext, MergeOverlapError, current_merge, merging
from finmerge.plugins import method as method_module
from finmerge.plugins.method import NonFiniteTensorError, OverflowTensorError, domain_instruct_merge
from merge_helpers import assert_close_state, copy_model, expected_merge, nan_domain, run_merge, tensors

ROLES = {"role": {"domain": "domain", "instruct": "instruct"}}


def _beyond_fp16():
    """fp32 models whose merge (30000 + 20000 + 20000) fits fp32 but not fp16 (65504)."""
    base = {"w": torch.full((4,), 30000.0)}
    return {"base": base, "domain": {"w": base["w"] + 20000}, "instruct": {"w": base["w"] + 20000}}


def _no_partial_left(folder):
    return not [name for name in os.listdir(folder) if "partial" in name]


def test_no_merge_running_is_the_empty_context():
    assert current_merge() == MergeContext(saved_dtype=None, collector=None)


def test_a_second_context_is_refused_and_changes_nothing():
    first, second = MergeContext(saved_dtype=torch.float16), MergeContext(saved_dtype=torch.bfloat16)
    with merging(first):
        with pytest.raises(MergeOverlapError, match="already running in this process"):
            with merging(second):
                pytest.fail("the second context was activated")
        assert current_merge() is first
    assert current_merge() == MergeContext()


def test_worker_threads_see_the_running_merge():
    """mergekit's --multi-gpu executor calls the kernel from a ThreadPoolExecutor, whose threads do not
    inherit the starting thread's context variables: the saved dtype and the collector must reach them."""
    models = _beyond_fp16()
    inputs = [models[r]["w"] for r in ("base", "domain", "instruct")]

    def merge_in_worker():
        return merge_tensors(inputs, domain_instruct_merge, ids=["base", "domain", "instruct"], base_index=0,
                             parameters=dict(ROLES), name="w")

    collector = StatsCollector()
    with ThreadPoolExecutor(max_workers=1) as pool:
        with merging(MergeContext(saved_dtype=torch.float16)):
            with pytest.raises(OverflowTensorError, match="65504"):
                pool.submit(merge_in_worker).result()
        with merging(MergeContext(collector=collector)):
            merged = pool.submit(merge_in_worker).result()
    assert torch.equal(merged, torch.full((4,), 70000.0))
    assert [t.name for t in collector.tensors()] == ["w"]


@pytest.fixture
def multi_gpu_on_cpu(monkeypatch):
    """mergekit's --multi-gpu executor with two "devices" on the CPU: its own thread pool and task
    islands, only the CUDA stream around each device's worker left out. Returns the names of the
    threads the kernel ran in."""
    import mergekit.multigpu_executor as executor_module
    from mergekit.graph import Executor

    def device_worker(self, task_list, cached_values, device, quiet):
        run = Executor(targets=task_list, math_device=device, storage_device=self.storage_device or device,
                       cached_values=cached_values)
        for handle, result in run._run(quiet=quiet):
            keep = handle in self.targets or handle in self.trailing_dependencies
            self.task_completion_queue.put((handle._index, result if keep else None))

    monkeypatch.setattr(executor_module, "get_torch_accelerator_type", lambda *_: "cpu")
    monkeypatch.setattr(executor_module, "get_torch_accelerator_count", lambda *_: 2)
    monkeypatch.setattr(executor_module.MultiGPUExecutor, "_device_worker", device_worker)
    threads = set()
    merge_group = method_module.merge_group

    def recording(*args, **kwargs):
        threads.add(threading.current_thread())
        return merge_group(*args, **kwargs)

    monkeypatch.setattr(method_module, "merge_group", recording)
    return threads


def test_multi_gpu_workers_get_the_merges_dtype_and_collector(tiny_family, tmp_path, multi_gpu_on_cpu):
    import json

    run_merge(recipe(tiny_family), tmp_path / "out", multi_gpu=True)
    assert multi_gpu_on_cpu and threading.main_thread() not in multi_gpu_on_cpu  # the kernel ran in workers only
    merged = tensors(tmp_path / "out")
    assert_close_state(merged, expected_merge(tiny_family))
    measured = json.loads((tmp_path / "out" / "diagnostics.json").read_text())["tensors"]
    assert sorted(t["name"] for t in measured) == sorted(merged)

    # finite fp32 inputs whose merge exceeds float16: refused only if the workers see `out_dtype`
    name = "model.layers.0.mlp.up_proj.weight"

    def push(state):
        state[name] = state[name] + 40000.0

    big = recipe(tiny_family, out_dtype="float16")
    big["models"][0]["model"] = copy_model(tiny_family.domain, tmp_path / "big-domain", edit_tensors=push)
    big["models"][1]["model"] = copy_model(tiny_family.instruct, tmp_path / "big-instruct", edit_tensors=push)
    with pytest.raises(OverflowTensorError, match=name):
        run_merge(big, tmp_path / "big", multi_gpu=True)
    assert not (tmp_path / "big").exists() and current_merge() == MergeContext()


def test_overlapping_merges_in_one_process_are_refused(tiny_family, tmp_path, monkeypatch):
    """A merge started while another runs in the same process fails with a clear error and writes
    nothing; the running one is undisturbed and correct."""
    entered, release = threading.Event(), threading.Event()
    start_tensor = StatsCollector.start_tensor

    def paused_start(self, *args, **kwargs):  # the first merge waits inside its kernel
        if not entered.is_set():
            entered.set()
            release.wait(timeout=120)
        return start_tensor(self, *args, **kwargs)

    monkeypatch.setattr(StatsCollector, "start_tensor", paused_start)
    failures = []

    def first_merge():
        try:
            run_merge(recipe(tiny_family), tmp_path / "first")
        except BaseException as error:  # reported by the main thread's assertions
            failures.append(error)

    worker = threading.Thread(target=first_merge)
    worker.start()
    try:
        assert entered.wait(timeout=120), f"the first merge never reached its kernel: {failures}"
        with pytest.raises(MergeOverlapError, match="another domain_instruct merge is already running"):
            run_merge(recipe(tiny_family), tmp_path / "second")
    finally:
        release.set()
        worker.join(timeout=300)
    assert not worker.is_alive() and failures == []
    assert not (tmp_path / "second").exists() and _no_partial_left(tmp_path)
    assert_close_state(tensors(tmp_path / "first"), expected_merge(tiny_family))
    assert (tmp_path / "first" / "diagnostics.json").is_file()
    assert current_merge() == MergeContext()


def test_context_is_cleared_after_a_merge_that_raises(tiny_family, tmp_path):
    merge = recipe(tiny_family, out_dtype="float16")
    merge["models"][0]["model"] = nan_domain(tiny_family, tmp_path / "nan-domain")
    with pytest.raises(NonFiniteTensorError):
        run_merge(merge, tmp_path / "failed")
    assert current_merge() == MergeContext()
    # the failed merge's float16 no longer limits a kernel call
    models = _beyond_fp16()
    assert torch.equal(merge_state_dicts(models, domain_instruct_merge, parameters=ROLES, base="base")["w"],
                       torch.full((4,), 70000.0))
    # and the next merge in this process runs
    run_merge(recipe(tiny_family), tmp_path / "next")
    assert_close_state(tensors(tmp_path / "next"), expected_merge(tiny_family))
