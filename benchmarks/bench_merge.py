"""Time and peak memory of a domain_instruct merge with diagnostics against its baselines.

Creates three random Llama-shaped bf16 checkpoints (~500M parameters each by default, sharded
safetensors), then measures in child processes, one stage at a time:

  task_arithmetic   plain `mergekit-yaml` with mergekit's task_arithmetic (weights 1, 1)
  domain_instruct   plain `mergekit-yaml` with domain_instruct (diagnostics included)
  di_no_diag        the same with FINMERGE_NO_DIAGNOSTICS=1 (what the statistics cost)
  io_floor          read every byte of the three inputs (plain reads), write one output of the same size
  read_torch        a fresh Python process that imports torch and copies every tensor of the three
                    inputs out of safetensors (what any torch tool pays before computing anything)
  diagnose          `finmerge diagnose` on the three inputs

Stages are interleaved (one of each per repeat); wall time is the best of --repeats runs, peak RSS
the largest of the stage's runs (/usr/bin/time's maximum resident set size of the stage process).
Inputs are read from the page cache (a warm-up read runs first), so the numbers compare compute
and memory, not disk speed. The checkpoints are deleted at the end (unless --keep).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_merge.py --repeats 2

`--ratio N`: the fixed-cost comparison. task_arithmetic and domain_instruct (with diagnostics)
through plain mergekit-yaml, alternating, N runs each; prints the median wall time of each and the
median of the per-pair ratios (each pair ran side by side, so load from other processes hits both).

`--profile`: one domain_instruct merge in-process under cProfile, split into mergekit's run_merge
(tensor math + I/O) and what finmerge adds around it (preflight, output fix-up, diagnostics report,
heatmap, model card, swap), plus the largest items of the heatmap.

    .venv/bin/python benchmarks/bench_merge.py --hidden 576 --intermediate 1536 --layers 30 --vocab 49152 --ratio 7

`--shape nekomata-14b|nekomata-7b`: the paper's model size instead. A Qwen-v1 triplet with the real
tensor names and shapes (untied lm_head, bf16, --shard-mb shards with an index, remote-code config as
in tests/qwen_fixture.py); stages io_floor, task_arithmetic, domain_instruct, di_no_diag, diagnose and,
on request, ta_out1B / di_out1B (mergekit's --out-shard-size 1B), run in turn (the order rotates each
repeat). Per run: wall, CPU, peak anonymous and peak total RSS of the process tree, bytes read and
written (logical and from disk) and the multiple of the I/O floor. --shape-layers N keeps the width
at another depth; --share-layers hard-links the base's layer shards into domain/ and instruct/ (disk of
about one checkpoint; measures memory and compute, not disk reads of those shards).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_merge.py --shape nekomata-14b --shape-layers 8 \
        --repeats 1 --stages io_floor,task_arithmetic,domain_instruct,di_no_diag,diagnose,ta_out1B,di_out1B
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

BIN = os.path.dirname(sys.executable)
STAGES = ("io_floor", "read_torch", "task_arithmetic", "domain_instruct", "di_no_diag", "diagnose")


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_heads_dim: int) -> Dict[str, tuple]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def write_checkpoints(root: str, args) -> Dict[str, str]:
    """base = N(0, 0.02); domain/instruct = base + independent noise; written shard by shard."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    heads = args.hidden // 64
    kv_dim = 64 * max(1, heads // 5)
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab, kv_dim)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_dim // 64,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    paths = {role: os.path.join(root, role) for role in ("base", "domain", "instruct")}
    noise = {"domain": 0.002, "instruct": 0.001}
    shard_bytes = args.shard_mb * 1024 * 1024
    for path in paths.values():
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as handle:
            json.dump(config, handle)
    generator = torch.Generator().manual_seed(0)
    shard: Dict[str, Dict[str, torch.Tensor]] = {r: {} for r in paths}
    index: Dict[str, Dict[str, str]] = {r: {} for r in paths}
    shard_no, shard_size = 1, 0

    def flush():
        nonlocal shard_no, shard_size
        for role in paths:
            name = f"model-{shard_no:05d}.safetensors"
            save_file(shard[role], os.path.join(paths[role], name), metadata={"format": "pt"})
            index[role].update({k: name for k in shard[role]})
            shard[role] = {}
        shard_no, shard_size = shard_no + 1, 0

    for name, shape in shapes.items():
        base = torch.randn(shape, generator=generator) * 0.02
        shard["base"][name] = base.bfloat16()
        for role, scale in noise.items():
            shard[role][name] = (base + torch.randn(shape, generator=generator) * scale).bfloat16()
        shard_size += base.numel() * 2
        if shard_size >= shard_bytes:
            flush()
    if shard_size:
        flush()
    for role, path in paths.items():
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": total * 2}, "weight_map": index[role]}, handle)
    print(f"wrote 3 checkpoints of {total / 1e6:.0f}M parameters (bf16, {shard_no - 1} shards each) under {root}", flush=True)
    return paths


def io_floor(paths: Dict[str, str], out: str) -> None:
    """Child process: read every byte of the three inputs, then write one checkpoint-sized output.

    Plain buffered reads into one reused 64 MiB buffer: safetensors' get_tensor maps the file
    lazily and would "read" nothing until the bytes are used.
    """
    import glob

    buffer = bytearray(64 * 1024 * 1024)
    view = memoryview(buffer)
    start = time.perf_counter()
    sizes = {}
    for role in ("base", "domain", "instruct"):
        for file in sorted(glob.glob(os.path.join(paths[role], "*.safetensors"))):
            with open(file, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
            sizes.setdefault(role, []).append(os.path.getsize(file))
    read_s = time.perf_counter() - start
    os.makedirs(out)
    for n, size in enumerate(sizes["base"]):
        with open(os.path.join(out, f"model-{n:05d}.safetensors"), "wb", buffering=0) as handle:
            while size > 0:
                size -= handle.write(view[: min(size, len(buffer))])
    print(json.dumps({"read_s": read_s, "write_s": time.perf_counter() - start - read_s}))


TIME = "/usr/bin/time"


def read_torch(paths: Dict[str, str]) -> None:
    """Child process: torch + safetensors, every tensor copied once (mmap pages really read)."""
    import glob

    import torch
    from safetensors import safe_open

    start = time.perf_counter()
    buffer = torch.empty(0, dtype=torch.uint8)
    for role in ("base", "domain", "instruct"):
        for file in sorted(glob.glob(os.path.join(paths[role], "*.safetensors"))):
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():
                    raw = handle.get_tensor(name).reshape(-1).view(torch.uint8)
                    if buffer.numel() < raw.numel():
                        buffer = torch.empty(raw.numel(), dtype=torch.uint8)
                    buffer[: raw.numel()].copy_(raw)
                    del raw
    print(json.dumps({"read_s": time.perf_counter() - start}))


def run_child(command: List[str], env: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """Run one stage: wall seconds and the peak RSS of the stage's own process.

    /usr/bin/time measures a process it starts itself. os.wait4 on a direct child would also count
    the parent's pages: Linux folds the pre-exec (forked or vforked) image into ru_maxrss.
    """
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        timed = [TIME, "-f", "%M %U %S", "-o", rss.name, *command] if os.access(TIME, os.X_OK) else command
        start = time.perf_counter()
        process = subprocess.Popen(timed, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(process.pid, 0)  # files, not pipes: a chatty child cannot block
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
        measured = rss.read().strip().splitlines()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    if timed[0] == TIME:
        rss_kb, user, system = measured[-1].split()
        cpu = float(user) + float(system)
    else:
        rss_kb, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    # CPU seconds (user + system) move less than wall time when other processes share the cores
    result = {"wall_s": wall, "cpu_s": cpu, "rss_mb": int(rss_kb) / 1024, "load": load}
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if last.startswith("{"):
        result.update(json.loads(last))
    return result


def write_recipes(root: str, paths: Dict[str, str]) -> Dict[str, str]:
    import yaml

    recipes = {
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": paths["base"], "dtype": "bfloat16",
            "models": [{"model": paths["domain"], "parameters": {"weight": 1.0}},
                       {"model": paths["instruct"], "parameters": {"weight": 1.0}}],
        },
        "domain_instruct": {
            "merge_method": "domain_instruct", "base_model": paths["base"], "dtype": "bfloat16",
            "models": [{"model": paths["domain"], "parameters": {"role": "domain", "weight": 1.0}},
                       {"model": paths["instruct"], "parameters": {"role": "instruct", "weight": 1.0}}],
        },
    }
    files = {}
    for name, recipe in recipes.items():
        files[name] = os.path.join(root, f"{name}.yml")
        with open(files[name], "w") as handle:
            yaml.safe_dump(recipe, handle)
    return files


def stage_command(stage: str, root: str, paths: Dict[str, str], recipes: Dict[str, str], out: str):
    env = dict(os.environ)
    if stage == "io_floor":
        return [sys.executable, __file__, "--io-floor-child", json.dumps(paths), out], env
    if stage == "read_torch":
        return [sys.executable, __file__, "--read-torch-child", json.dumps(paths)], env
    if stage == "diagnose":
        return [os.path.join(BIN, "finmerge"), "diagnose", "--base", paths["base"], "--domain", paths["domain"],
                "--instruct", paths["instruct"], "--out", out], env
    if stage == "di_no_diag":
        env["FINMERGE_NO_DIAGNOSTICS"] = "1"
    recipe = recipes["task_arithmetic" if stage == "task_arithmetic" else "domain_instruct"]
    return [os.path.join(BIN, "mergekit-yaml"), recipe, out, "--quiet"], env


def machine() -> str:
    import platform

    from importlib.metadata import version

    cpu = ""
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((l.split(":", 1)[1].strip() for l in handle if l.startswith("model name")), "")
    except OSError:
        pass
    with open("/proc/meminfo") as handle:
        mem_gb = int(handle.readline().split()[1]) / 1024 / 1024
    return (f"{cpu or platform.processor()}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM, Python "
            f"{platform.python_version()}, torch {version('torch')}, mergekit {version('mergekit')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def table(results: Dict[str, Dict[str, float]]) -> str:
    ta, floor, torch_read = results.get("task_arithmetic"), results.get("io_floor"), results.get("read_torch")
    lines = ["| stage | wall s | peak RSS MB | vs task_arithmetic (time / RSS) | note |", "|---|---|---|---|---|"]
    for stage, r in results.items():
        ratio = f"{r['wall_s'] / ta['wall_s']:.2f}× / {r['rss_mb'] / ta['rss_mb']:.2f}×" if ta else ""
        note = ""
        if stage == "io_floor":
            note = f"read {r['read_s']:.2f} s, write {r['write_s']:.2f} s"
        elif stage == "read_torch":
            note = f"reading itself {r['read_s']:.2f} s"
        elif stage == "diagnose":
            parts = [f"{r['wall_s'] / floor['read_s']:.1f}× the plain read ({floor['read_s']:.2f} s)"] if floor else []
            parts += [f"{r['wall_s'] / torch_read['wall_s']:.2f}× read_torch"] if torch_read else []
            note = ", ".join(parts)
        lines.append(f"| {stage} | {r['wall_s']:.1f} | {r['rss_mb']:.0f} | {ratio} | {note} |")
    return "\n".join(lines)


def ratio_runs(paths: Dict[str, str], recipes: Dict[str, str], root: str, runs: int,
               against: str = "domain_instruct") -> Dict[str, object]:
    """Alternate task_arithmetic / `against` (order flipped every pair); medians and pair ratios."""
    import statistics

    walls: Dict[str, List[float]] = {"task_arithmetic": [], against: []}
    cpus: Dict[str, List[float]] = {"task_arithmetic": [], against: []}
    ratios, cpu_ratios = [], []
    for run in range(runs):
        order = ["task_arithmetic", against][:: 1 if run % 2 == 0 else -1]
        pair: Dict[str, Dict[str, float]] = {}
        for stage in order:
            out = os.path.join(root, f"out-{stage}-{run}")
            pair[stage] = run_child(*stage_command(stage, root, paths, recipes, out))
            walls[stage].append(pair[stage]["wall_s"])
            cpus[stage].append(pair[stage]["cpu_s"])
            shutil.rmtree(out, ignore_errors=True)
        ratios.append(pair[against]["wall_s"] / pair["task_arithmetic"]["wall_s"])
        cpu_ratios.append(pair[against]["cpu_s"] / pair["task_arithmetic"]["cpu_s"])
        print(f"pair {run + 1}: task_arithmetic {pair['task_arithmetic']['wall_s']:.2f} s "
              f"(cpu {pair['task_arithmetic']['cpu_s']:.2f}), {against} {pair[against]['wall_s']:.2f} s "
              f"(cpu {pair[against]['cpu_s']:.2f}), ratio {ratios[-1]:.3f} (cpu {cpu_ratios[-1]:.3f}) "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
    median = statistics.median
    summary = {"median_s": {k: median(v) for k, v in walls.items()}, "median_cpu_s": {k: median(v) for k, v in cpus.items()},
               "median_ratio": median(ratios), "median_cpu_ratio": median(cpu_ratios), "ratios": ratios,
               "cpu_ratios": cpu_ratios, "walls": walls, "cpus": cpus}
    print(f"\nmedian task_arithmetic {summary['median_s']['task_arithmetic']:.2f} s, {against} "
          f"{summary['median_s'][against]:.2f} s; median of pair ratios {summary['median_ratio']:.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {runs} pairs); CPU seconds: median "
          f"{summary['median_cpu_s']['task_arithmetic']:.2f} vs {summary['median_cpu_s'][against]:.2f}, "
          f"median of pair ratios {summary['median_cpu_ratio']:.3f}")
    return summary


PROFILED = {  # what finmerge does around mergekit's run_merge, by function
    "mergekit run_merge (tensor math + I/O)": "mergekit/merge.py:30(run_merge)",
    "preflight (configs, safetensors headers)": "finmerge/plugins/preflight.py:*(preflight)",
    "output fix-up (tokenizer, ids)": "finmerge/plugins/instruct_output.py:*(finish_instruct_output)",
    "diagnostics report (incl. heatmap)": "finmerge/diagnostics/report.py:*(write_report)",
    "  heatmap SVG": "finmerge/diagnostics/heatmap.py:*(heatmap_svg)",
    "model card": "mergekit/card.py:*(generate_card)",
    "swap into OUT": "finmerge/plugins/run.py:*(_move_into_place)",
    "whole domain_instruct merge": "finmerge/plugins/run.py:*(run_domain_instruct)",
}


def profile_child(recipe: str, out: str) -> None:
    """Child process: one domain_instruct merge under cProfile; cumulative seconds per step."""
    import cProfile
    import fnmatch
    import pstats

    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(recipe, encoding="utf-8") as handle:
        source = handle.read()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    profile = cProfile.Profile()
    profile.runcall(run_merge, config, out, options=MergeOptions(quiet=True), config_source=source)
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, ncalls, tottime, cumtime, callers)}
    result = {}
    for label, pattern in PROFILED.items():
        hits = [v[3] for (file, line, function), v in stats.items()
                if fnmatch.fnmatch(f"{file}:{line}({function})", "*" + pattern)]
        result[label] = max(hits) if hits else 0.0
    heatmap = [(v[3], f"{os.path.basename(file)}:{function}") for (file, _, function), v in stats.items()
               if "matplotlib" in file and function in ("savefig", "tight_layout", "colorbar", "add_subplot")]
    for label, seconds in result.items():
        print(f"{seconds:8.3f} s  {label}")
    outside = result["whole domain_instruct merge"] - result["mergekit run_merge (tensor math + I/O)"]
    print(f"{outside:8.3f} s  finmerge's cost around run_merge")
    for seconds, name in sorted(heatmap, reverse=True):
        print(f"{seconds:8.3f} s    matplotlib {name}")
    print(json.dumps({**result, "outside_run_merge": outside}))


# ---- the paper's model shapes: Qwen-v1 (nekomata) triplets, memory and I/O per run ----------------

# rinna/nekomata-14b and -7b are Qwen-v1 models: fused qkv with bias, SwiGLU MLP whose w1/w2 have
# intermediate_size // 2 rows, untied lm_head, vocabulary padded beyond the tokenizer's size.
QWEN_SHAPES = {
    "nekomata-14b": {"hidden_size": 5120, "num_hidden_layers": 40, "intermediate_size": 27392,
                     "vocab_size": 152064, "num_attention_heads": 40},
    "nekomata-7b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 22016,
                    "vocab_size": 151936, "num_attention_heads": 32},
}
SHAPE_STAGES = ("io_floor", "task_arithmetic", "domain_instruct", "di_no_diag", "diagnose")
# the same merges with mergekit's output shard at 1 GB instead of its 5 GB default (the writer holds a
# whole shard in memory before writing it)
SHAPE_VARIANTS = {"ta_out1B": ("task_arithmetic", ["--out-shard-size", "1B"]),
                  "di_out1B": ("domain_instruct", ["--out-shard-size", "1B"])}
POOL = 50_000_017  # values in a random pool; prime, so its period never lines up with a row length


def qwen_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> Dict[str, tuple]:
    inner = intermediate // 2
    shapes = {"transformer.wte.weight": (vocab, hidden)}
    for n in range(layers):
        p = f"transformer.h.{n}."
        shapes.update({
            p + "ln_1.weight": (hidden,), p + "attn.c_attn.weight": (3 * hidden, hidden),
            p + "attn.c_attn.bias": (3 * hidden,), p + "attn.c_proj.weight": (hidden, hidden),
            p + "ln_2.weight": (hidden,), p + "mlp.w1.weight": (inner, hidden),
            p + "mlp.w2.weight": (inner, hidden), p + "mlp.c_proj.weight": (hidden, inner),
        })
    shapes.update({"transformer.ln_f.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    return shapes


def plan_shards(shapes: Dict[str, tuple], shard_bytes: int) -> List[List[str]]:
    """Tensors in order, a new shard whenever the next tensor would overflow (as save_pretrained does)."""
    import math

    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class RandomPool:
    """Random bf16 values drawn cheaply: a fixed N(0, 1)·scale pool read from a random offset.

    Generating ~100 GB of independent normals would take longer than the merges it feeds; speed and
    memory of a merge do not depend on the values, only on their being finite and the roles differing.
    """

    def __init__(self, seed: int, scale: float):
        import torch

        self.generator = torch.Generator().manual_seed(seed)
        self.pool = (torch.randn(POOL, generator=self.generator) * scale).bfloat16()

    def take(self, shape: tuple):
        import math

        import torch

        n = math.prod(shape)
        offset = int(torch.randint(POOL, (1,), generator=self.generator))
        reps = (offset + n) // POOL + 1
        return self.pool.repeat(reps)[offset: offset + n].reshape(shape).clone()


def write_qwen_checkpoints(root: str, args) -> Dict[str, object]:
    """base, domain = base + noise, instruct = base + other noise, nekomata's layout (remote code,
    tokenizer, sharded bf16 safetensors with an index).

    --share-layers: domain and instruct hard-link every base shard that holds neither the embedding
    nor lm_head (their task vectors are zero there); only those two shards differ per role. Disk use
    drops to about one checkpoint, and the merges still load, compute and write every tensor, but
    reads of the linked shards hit the same file pages as the base's: it measures memory and
    compute, not disk reads.
    """
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import qwen_fixture  # the layout the test suite's nekomata-shaped models have (code, tokenizer, config)

    config = {**qwen_fixture.CONFIG, **QWEN_SHAPES[args.shape]}
    if args.shape_layers:
        config["num_hidden_layers"] = args.shape_layers
    shapes = qwen_shapes(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                         config["vocab_size"])
    shards = plan_shards(shapes, args.shard_mb * 1024 * 1024)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    eos = qwen_fixture.eod_id()
    generation = {"eos_token_id": eos, "pad_token_id": eos, "max_new_tokens": 512, "do_sample": False,
                  "chat_format": "raw"}
    paths = {role: os.path.join(root, role) for role in ("base", "domain", "instruct")}
    for path in paths.values():
        os.makedirs(path)
        qwen_fixture._write_code_and_tokenizer(path, generation, 8192)
        qwen_fixture._write_json(os.path.join(path, "config.json"), {
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            "model_type": "qwen", "dtype": "bfloat16", **config})
    pools = {"base": RandomPool(0, 0.02), "domain": RandomPool(1, 0.002), "instruct": RandomPool(2, 0.001)}
    ones = {"base": RandomPool(3, 0.05)}
    total = sum(torch.Size(s).numel() for s in shapes.values())
    linked = 0
    for members, name in zip(shards, names):
        distinct = not args.share_layers or any(n in ("transformer.wte.weight", "lm_head.weight") for n in members)
        tensors = {r: {} for r in paths}
        for tensor_name in members:
            shape = shapes[tensor_name]
            base = pools["base"].take(shape)
            if ".ln_" in tensor_name:  # norm weights near 1, as trained ones are
                base = ones["base"].take(shape) + 1.0
            tensors["base"][tensor_name] = base
            if distinct:
                for role in ("domain", "instruct"):
                    tensors[role][tensor_name] = base + pools[role].take(shape)
        save_file(tensors["base"], os.path.join(paths["base"], name), metadata={"format": "pt"})
        for role in ("domain", "instruct"):
            if distinct:
                save_file(tensors[role], os.path.join(paths[role], name), metadata={"format": "pt"})
            else:
                os.link(os.path.join(paths["base"], name), os.path.join(paths[role], name))
                linked += 1
        del tensors
    weight_map = {n: name for members, name in zip(shards, names) for n in members}
    for path in paths.values():
        qwen_fixture._write_json(os.path.join(path, "model.safetensors.index.json"),
                                 {"metadata": {"total_size": total * 2}, "weight_map": weight_map})
    print(f"wrote 3 {args.shape}-shaped checkpoints ({config['num_hidden_layers']} layers, {total / 1e9:.2f}B "
          f"parameters, bf16, {len(shards)} shards each, {linked} shards hard-linked to the base's) under {root}",
          flush=True)
    return {"paths": paths, "parameters": total, "shards": len(shards), "linked": linked,
            "layers": config["num_hidden_layers"], "bytes_each": total * 2}


def _descendants(pid: int) -> List[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as handle:
                    pids += [int(c) for c in handle.read().split()]
        except OSError:
            pass
        i += 1
    return pids


class TreeSampler:
    """Polls a process tree: peak anonymous and peak total RSS (summed over the tree), and each
    process's last-seen I/O counters.

    Total RSS includes the safetensors files' mapped pages (file-backed, the kernel can drop them
    under pressure); anonymous RSS is what the merge really holds. Anonymous memory is sampled
    (every `interval` s), so a spike shorter than that can be missed; total RSS also takes each
    process's own VmHWM (the kernel's exact peak).
    """

    def __init__(self, pid: int, interval: float = 0.05):
        import threading

        self.pid, self.interval = pid, interval
        self.peak_anon = self.peak_rss = self.peak_hwm = 0
        self.io: Dict[int, Dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        anon = rss = 0
        for pid in _descendants(self.pid):
            try:
                with open(f"/proc/{pid}/status") as handle:
                    fields = dict(line.split(":", 1) for line in handle if ":" in line)
                with open(f"/proc/{pid}/io") as handle:
                    self.io[pid] = {k: int(v) for k, v in (line.split(": ") for line in handle)}
            except (OSError, ValueError):
                continue
            kb = lambda key: int(fields.get(key, "0 kB").split()[0])  # noqa: E731
            anon += kb("RssAnon")
            rss += kb("VmRSS")
            self.peak_hwm = max(self.peak_hwm, kb("VmHWM"))
        self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> Dict[str, float]:
        self._stop.set()
        self._thread.join()
        io = {k: sum(p.get(k, 0) for p in self.io.values()) for k in ("rchar", "wchar", "read_bytes", "write_bytes")}
        return {"anon_gb": self.peak_anon / 1024 / 1024, "rss_gb": max(self.peak_rss, self.peak_hwm) / 1024 / 1024,
                **{k + "_gb": v / 1e9 for k, v in io.items()}}


def run_sampled(command: List[str], env: Optional[Dict[str, str]] = None) -> Dict[str, float]:
    """One stage in a child process: wall, CPU (user + system of the whole tree), memory and I/O."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, text=True)
        sampler = TreeSampler(process.pid)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:  # interrupted: the stage must not go on writing into a folder being removed
            process.kill()
            process.wait()
            sampler.stop()
            raise
        wall = time.perf_counter() - start
        measured = sampler.stop()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({os.waitstatus_to_exitcode(status)}):\n{stderr[-3000:]}")
    result = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "load": load, **measured}
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    if last.startswith("{"):
        result.update(json.loads(last))
    return result


def shape_command(stage: str, paths: Dict[str, str], recipes: Dict[str, str], out: str, mergekit_args: List[str]):
    method, extra = SHAPE_VARIANTS.get(stage, (stage, []))
    command, env = stage_command(method, "", paths, recipes, out)
    if method in ("task_arithmetic", "domain_instruct", "di_no_diag"):
        command += ["--trust-remote-code", *mergekit_args, *extra]  # config.json names remote code, as nekomata's does
    return command, env


def shape_table(runs: List[Dict[str, object]], floor_s: float) -> str:
    lines = ["| run | stage | wall s | CPU s | floor multiple | peak anon RSS GB | peak total RSS GB | read GB (disk) | "
             "written GB (disk) | load before |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        multiple = r["wall_s"] / floor_s if floor_s else float("nan")
        lines.append(f"| {r['repeat']} | {r['stage']} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {multiple:.2f}× | "
                     f"{r['anon_gb']:.2f} | {r['rss_gb']:.2f} | {r['rchar_gb']:.1f} ({r['read_bytes_gb']:.1f}) | "
                     f"{r['wchar_gb']:.1f} ({r['write_bytes_gb']:.1f}) | {r['load']:.1f} |")
    return "\n".join(lines)


def shape_main(args, stages: List[str]) -> None:
    """Build a nekomata-shaped triplet, run the stages alternating (order rotated every repeat)."""
    import signal

    root = tempfile.mkdtemp(prefix="finmerge-bench-", dir=args.workdir)
    # a killed benchmark still removes its tens of GB of checkpoints (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        start = time.perf_counter()
        forwarded = ["--shape", args.shape, "--shard-mb", str(args.shard_mb)]
        forwarded += ["--shape-layers", str(args.shape_layers)] if args.shape_layers else []
        forwarded += ["--share-layers"] if args.share_layers else []
        made = subprocess.run([sys.executable, __file__, *forwarded, "--checkpoints-child", root],
                              check=True, capture_output=True, text=True)
        print(made.stdout.strip().splitlines()[0] + f" in {time.perf_counter() - start:.0f} s", flush=True)
        built = json.loads(made.stdout.strip().splitlines()[-1])
        paths = built["paths"]
        recipes = write_recipes(root, paths)
        mergekit_args = args.mergekit_args.split()
        runs: List[Dict[str, object]] = []
        for repeat in range(args.repeats):
            shift = repeat % len(stages)
            for stage in stages[shift:] + stages[:shift]:
                out = os.path.join(root, f"out-{stage}-{repeat}")
                result = run_sampled(*shape_command(stage, paths, recipes, out, mergekit_args))
                if stage == "io_floor":
                    result["floor_s"] = result["read_s"] + result["write_s"]
                runs.append({"repeat": repeat + 1, "stage": stage, **result})
                print(f"{stage} run {repeat + 1}: {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s CPU, "
                      f"anon {result['anon_gb']:.2f} GB, total {result['rss_gb']:.2f} GB, read "
                      f"{result['rchar_gb']:.1f} GB (disk {result['read_bytes_gb']:.1f}), written "
                      f"{result['wchar_gb']:.1f} GB (load before {result['load']:.1f})", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        floors = [r["floor_s"] for r in runs if r["stage"] == "io_floor"]
        floor_s = min(floors) if floors else 0.0
        print(f"\nmachine: {machine()}")
        print(f"checkpoints: {args.shape} shape, {built['layers']} layers, {built['parameters'] / 1e9:.2f}B parameters "
              f"({built['bytes_each'] / 1e9:.1f} GB each), {built['shards']} shards, {built['linked']} hard-linked; "
              f"mergekit options: {args.mergekit_args or '(defaults)'}; I/O floor {floor_s:.0f} s\n")
        print(shape_table(runs, floor_s))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"machine": machine(), "args": vars(args), "checkpoints": {k: v for k, v in built.items()
                           if k != "paths"}, "floor_s": floor_s, "runs": runs}, handle, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--intermediate", type=int, default=3456)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-mb", type=int, default=400, help="shard size (use 2000 with --shape: the hub's ~2 GB)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--ratio", type=int, default=0, metavar="N",
                        help="only the fixed-cost comparison: N alternating task_arithmetic/domain_instruct pairs")
    parser.add_argument("--ratio-against", default="domain_instruct",
                        help="comma-separated: domain_instruct (with diagnostics) and/or di_no_diag")
    parser.add_argument("--profile", action="store_true", help="also profile one domain_instruct merge in-process")
    parser.add_argument("--shape", choices=sorted(QWEN_SHAPES),
                        help="a Qwen-v1 triplet shaped like the paper's models (stages: "
                             f"{','.join(SHAPE_STAGES)}; per run: wall, CPU, peak anonymous and total RSS, I/O)")
    parser.add_argument("--shape-layers", type=int, default=0,
                        help="with --shape: this many layers at the model's width (default: the model's own)")
    parser.add_argument("--share-layers", action="store_true",
                        help="with --shape: domain/instruct hard-link the base's layer shards (disk of one checkpoint)")
    parser.add_argument("--mergekit-args", default="", help="with --shape: extra mergekit-yaml options, e.g. "
                                                              "'--out-shard-size 1B'")
    parser.add_argument("--io-floor-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--profile-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoints-child", help=argparse.SUPPRESS)
    parser.add_argument("--read-torch-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shard_mb is None:
        args.shard_mb = 2000 if args.shape else 400
    if args.io_floor_child:
        io_floor(json.loads(args.io_floor_child[0]), args.io_floor_child[1])
        return
    if args.read_torch_child:
        read_torch(json.loads(args.read_torch_child))
        return
    if args.profile_child:
        profile_child(*args.profile_child)
        return
    if args.checkpoints_child:
        writer = write_qwen_checkpoints if args.shape else write_checkpoints
        print(json.dumps(writer(args.checkpoints_child, args)))
        return
    if args.shape and args.stages == ",".join(STAGES):
        args.stages = ",".join(SHAPE_STAGES)
    stages = [s for s in args.stages.split(",") if s]
    allowed = SHAPE_STAGES + tuple(SHAPE_VARIANTS) if args.shape else STAGES
    unknown = set(stages) - set(allowed)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {allowed}")
    if args.shape:
        shape_main(args, stages)
        return
    root = tempfile.mkdtemp(prefix="finmerge-bench-", dir=args.workdir)
    try:
        # generated in a child, so this process stays small (it never imports torch)
        shape = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
                 "--vocab", str(args.vocab), "--shard-mb", str(args.shard_mb)]
        made = subprocess.run([sys.executable, __file__, *shape, "--checkpoints-child", root],
                              check=True, capture_output=True, text=True)
        print(made.stdout.strip().splitlines()[0], flush=True)
        paths = json.loads(made.stdout.strip().splitlines()[-1])
        recipes = write_recipes(root, paths)
        run_child(*stage_command("io_floor", root, paths, recipes, os.path.join(root, "warmup")))  # page cache
        if args.profile:
            out = os.path.join(root, "out-profile")
            profiled = subprocess.run([sys.executable, __file__, "--profile-child", recipes["domain_instruct"], out],
                                      check=True, capture_output=True, text=True)
            print("\n" + "\n".join(profiled.stdout.strip().splitlines()[:-1]) + "\n", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if args.ratio:
            summary = {against: ratio_runs(paths, recipes, root, args.ratio, against)
                       for against in args.ratio_against.split(",")}
            print(f"\nmachine: {machine()}")
            if args.json:
                with open(args.json, "w") as handle:
                    json.dump({"machine": machine(), "args": vars(args), "ratio": summary}, handle, indent=2)
            return
        results: Dict[str, Dict[str, float]] = {}
        for repeat in range(args.repeats):
            for stage in stages:
                out = os.path.join(root, f"out-{stage}-{repeat}")
                result = run_child(*stage_command(stage, root, paths, recipes, out))
                print(f"{stage} run {repeat + 1}: {result['wall_s']:.1f} s, {result['rss_mb']:.0f} MB "
                      f"(load average before: {result['load']:.1f})", flush=True)
                best = results.get(stage)
                if best is None or result["wall_s"] < best["wall_s"]:
                    results[stage] = {**result, "rss_mb": max(result["rss_mb"], best["rss_mb"] if best else 0)}
                else:
                    best["rss_mb"] = max(best["rss_mb"], result["rss_mb"])
                shutil.rmtree(out, ignore_errors=True)
        print(f"\nmachine: {machine()}\n")
        print(table({s: results[s] for s in stages}))
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"machine": machine(), "args": vars(args), "results": results}, handle, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
