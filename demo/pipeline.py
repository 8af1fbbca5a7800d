"""The embedded default, end to end: world -> base and instruct stand-ins -> the real finmerge path
(`finmerge reproduce` on recipes/demo.yml: pretrain, plain mergekit-yaml, diagnostics, eval, sweep)
-> one table. Every number in it is computed by this run."""

import json
import os
import time
from importlib import resources
from typing import Callable, Dict, Optional

import yaml

from finmerge.demo import family as fam
from finmerge.demo import report as demo_report
from finmerge.demo.breakdown import answer_each, by_relation
from finmerge.demo.world import QUICK, WorldSize, build_world, write_world
from finmerge.reproduce.stages import Stages, stage_key
from finmerge.safety.outputs import atomic_write_json, atomic_write_text

# --quick: the same path on a smaller world and model, for the test suite.
QUICK_DOMAIN = dict(seq_len=96, per_device_train_batch_size=16, max_steps=60, learning_rate=2e-3, save_steps=30, logging_steps=5)
QUICK_SWEEP = dict(w_domain=[1.0], w_instruct=[1.0, 1.5], variants=["paper", "instruct_head", "instruct_tokens"])


def _split_questions(world_dir: str, world: Dict, seed: int) -> None:
    """Finance questions: half for choosing sweep weights (val), half for the reported table (test)."""
    import random

    finance = list(world["finance_questions"])
    random.Random(seed).shuffle(finance)
    splits = {"finance_val": finance[::2], "finance_test": finance[1::2], "general_test": world["general_questions"]}
    for name, rows in splits.items():
        with open(os.path.join(world_dir, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


def demo_recipe(quick: bool) -> Dict:
    recipe = yaml.safe_load(resources.files("finmerge").joinpath("recipes/demo.yml").read_text(encoding="utf-8"))
    if quick:
        recipe["finmerge"]["pretrain"].update(QUICK_DOMAIN)
        recipe["finmerge"]["sweep"].update(QUICK_SWEEP)
    return recipe


def run_demo(out_dir: str, quick: bool = False, threads: Optional[int] = None, seed: int = 0,
             log: Callable[[str], None] = print) -> Dict:
    from finmerge.reproduce.recipe import load_reproduction
    from finmerge.reproduce.report import collect, write_report
    from finmerge.reproduce.run import run_reproduction

    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    size: WorldSize = QUICK if quick else WorldSize()
    settings = fam.QUICK_FAMILY if quick else fam.FamilySettings(seed=seed)
    stages = Stages(out_dir, log=log)
    world_dir, models = os.path.join(out_dir, "world"), os.path.join(out_dir, "models")
    world = build_world(size, seed)

    def make_world():
        write_world(world, world_dir)
        _split_questions(world_dir, world, seed)

    stages.run("world", stage_key({"size": size.__dict__, "seed": seed}), make_world, output=world_dir)
    paths = {k: os.path.join(world_dir, f"{k}.txt") for k in ("general_text", "finance_text")}
    init, base, instruct = (os.path.join(models, n) for n in ("init", "base", "instruct"))

    def make_init():
        tokenizer = fam.build_tokenizer(world["general_text"] + world["finance_text"], settings.vocab_size)
        fam.write_random_init(init, tokenizer, settings)

    stages.run("init", stage_key(fam.settings_dict(settings), [world_dir]), make_init, output=init)
    stages.run("base", stage_key(fam.settings_dict(settings), [init]),
               lambda: fam.pretrain(init, base, [paths["general_text"]], settings.base_steps, settings.base_lr, settings, threads),
               output=base, resumable=True)
    stages.run("instruct", stage_key(fam.settings_dict(settings), [base]),
               lambda: fam.fine_tune_instruct(base, instruct, world["instruct_chats"], settings, threads), output=instruct)

    recipe_path = os.path.join(out_dir, "recipe.yml")
    with open(recipe_path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(demo_recipe(quick), handle, sort_keys=False)
    repro = load_reproduction(recipe_path, workdir=out_dir)
    run_reproduction(repro, threads=threads, log=log)
    breakdown_path = os.path.join(out_dir, "breakdown.json")
    best_merge = os.path.join(out_dir, "best-merge")
    finance_relations = sorted({f["relation"] for f in world["facts"] if f["domain"] == "finance"})
    stages.run("breakdown", stage_key({"eval": repro.eval.given(), "relations": finance_relations},
                                      [repro.output, best_merge, instruct, world_dir]),
               lambda: _breakdown(repro, best_merge, instruct, world_dir, finance_relations, breakdown_path))
    report = collect(repro)
    with open(breakdown_path, encoding="utf-8") as handle:
        breakdown = json.load(handle)
    with open(os.path.join(out_dir, "sweep", "sweep.json"), encoding="utf-8") as handle:
        points = demo_report.sweep_points(json.load(handle))
    best_label = next(label for label in report["results"] if label.startswith("sweep best"))
    report["demo"] = {"quick": quick, "seconds": round(time.perf_counter() - started, 1), "threads": threads,
                      "world": size.__dict__, "family": fam.settings_dict(settings),
                      "breakdown": breakdown, "sweep_points": points,
                      "targets": {label: demo_report.targets(report["results"], label) for label in ("merged", best_label)}}
    paths = write_report(report, title="finmerge demo: " + ("quick world" if quick else "tiny financial world"))
    with open(paths["md"], encoding="utf-8") as handle:
        markdown = handle.read()
    atomic_write_text(paths["md"], markdown.rstrip("\n") + "\n\n" + demo_report.render(report["demo"]))
    return {"report": report, "paths": paths}


def _breakdown(repro, best_merge: str, instruct: str, world_dir: str, finance_relations, out: str) -> None:
    """Per-question answers of the merges on the finance test questions, and of the instruct model on
    general entities it never chatted about, for the same relation types."""
    knobs = dict(turn_end=repro.eval.turn_end, max_new_tokens=repro.eval.max_new_tokens)
    finance_qa = os.path.join(world_dir, "finance_test.jsonl")
    finance = {}
    for label, path in (("merged (1, 1)", repro.output), ("sweep best", best_merge)):
        records = answer_each(path, finance_qa, label=label, **knobs)
        finance[label] = {"records": records, "by_relation": by_relation(records)}
    wanted = set(finance_relations)
    records = answer_each(instruct, os.path.join(world_dir, "general_test.jsonl"), label="instruct",
                          keep=lambda item: item.extra.get("relation") in wanted, **knobs)
    atomic_write_json(out, {"finance_test": finance,
                            "general_same_relations": {"records": records, "by_relation": by_relation(records)}})
