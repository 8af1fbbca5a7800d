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
from finmerge.demo.world import QUICK, WorldSize, build_world, write_world
from finmerge.reproduce.stages import Stages, stage_key

# --quick: the same path on a smaller world and model, for the test suite.
QUICK_DOMAIN = dict(seq_len=96, per_device_train_batch_size=16, max_steps=60, learning_rate=2e-3, save_steps=30, logging_steps=5)
QUICK_SWEEP = dict(w_domain=[1.0, 1.5], w_instruct=[1.0, 1.5], variants=["paper", "instruct_head"])


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
    report = collect(repro)
    report["demo"] = {"quick": quick, "seconds": round(time.perf_counter() - started, 1), "threads": threads,
                      "world": size.__dict__, "family": fam.settings_dict(settings)}
    paths = write_report(report, title="finmerge demo: " + ("quick world" if quick else "tiny financial world"))
    return {"report": report, "paths": paths}
