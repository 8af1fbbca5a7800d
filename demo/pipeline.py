"""The embedded default, end to end: world -> base and instruct stand-ins -> the real finmerge path
(`finmerge reproduce` on recipes/demo.yml: pretrain, plain mergekit-yaml, diagnostics, eval, sweep)
-> one table. Every number in it is computed by this run; the seed-0 stand-ins themselves are shipped
(finmerge.demo.standins) and trained only when this run would train them differently."""

import json
import os
import time
from importlib import resources
from typing import Callable, Dict, Optional

import yaml

from finmerge.demo import family as fam
from finmerge.demo import report as demo_report
from finmerge.demo import breakdown as answers
from finmerge.demo import standins
from finmerge.demo.world import QUICK, WorldSize, build_world, write_world
from finmerge.reproduce.stages import Stages, stage_key
from finmerge.safety.outputs import atomic_write_json, atomic_write_text

# --quick: the same path on a smaller world and model, for the test suite.
QUICK_DOMAIN = dict(seq_len=96, per_device_train_batch_size=16, max_steps=60, learning_rate=2e-3, save_steps=30, logging_steps=5)
QUICK_SWEEP = dict(w_domain=[1.0], w_instruct=[1.0, 1.5], variants=["paper", "instruct_head", "instruct_tokens"])
QUICK_BASELINES = ["task_arithmetic", "ties"]


def _split_questions(world_dir: str, world: Dict, seed: int) -> None:
    """Finance questions: half for choosing sweep weights (val), half for the reported table (test)."""
    import random

    finance = list(world["finance_questions"])
    random.Random(seed).shuffle(finance)
    splits = {"finance_val": finance[::2], "finance_test": finance[1::2], "general_test": world["general_questions"]}
    for name, rows in splits.items():
        with open(os.path.join(world_dir, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)


def _split_for_selection(world_dir: str, folder: str) -> None:
    """What a user without labelled data has, beside the reported data: held-out domain documents cut in
    two (one half chooses the data-free merge, the other is reported) and the validation questions'
    prompts alone (their answers are not copied)."""
    from finmerge.evaluation.data import load_prompts, load_texts

    os.makedirs(folder, exist_ok=True)
    documents = load_texts(os.path.join(world_dir, "finance_heldout_text.txt"))
    for name, part in (("finance_val_text", documents[::2]), ("finance_test_text", documents[1::2])):
        atomic_write_text(os.path.join(folder, f"{name}.txt"), "\n\n".join(part) + "\n")
    prompts = load_prompts(os.path.join(world_dir, "finance_val.jsonl"))
    atomic_write_text(os.path.join(folder, "finance_prompts.txt"), "".join(p.replace("\n", " ") + "\n" for p in prompts))


def demo_recipe(quick: bool) -> Dict:
    recipe = yaml.safe_load(resources.files("finmerge").joinpath("recipes/demo.yml").read_text(encoding="utf-8"))
    if quick:
        recipe["finmerge"]["pretrain"].update(QUICK_DOMAIN)
        recipe["finmerge"]["sweep"].update(QUICK_SWEEP)
        recipe["finmerge"]["baselines"] = list(QUICK_BASELINES)
    return recipe


def run_demo(out_dir: str, quick: bool = False, threads: Optional[int] = None, seed: int = 0,
             log: Callable[[str], None] = print, family: Optional[fam.FamilySettings] = None,
             pretrain: Optional[Dict] = None, train_standins: bool = False) -> Dict:
    """`family` and `pretrain` (fields of the recipe's pretrain section) replace the demo's sizes: for
    benchmarks/demo_training.py, which measures what less training does to the table. `train_standins`
    trains base and instruct even where the shipped seed-0 ones are the same models."""
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
    settings = family or (fam.QUICK_FAMILY if quick else fam.FamilySettings(seed=seed))
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
    made_from = standins.standin_inputs(fam.settings_dict(settings), {"world": world_dir, "init": init})
    key = standins.standin_key(made_from)
    shipped = not train_standins and all(standins.shipped_standin(role, seed, key) for role in ("base", "instruct"))
    source = {"standins": "shipped" if shipped else "trained"}
    if shipped:
        log(f"[base, instruct] the shipped seed-{seed} stand-ins match this world and settings (key {key}): "
            "copied, not trained (--train-standins trains them)")
    stages.run("base", stage_key({**fam.settings_dict(settings), **source}, [init]),
               (lambda: standins.copy_standin("base", seed, base)) if shipped else
               (lambda: fam.pretrain(init, base, [paths["general_text"]], settings.base_steps, settings.base_lr, settings, threads)),
               output=base, resumable=True)
    stages.run("instruct", stage_key({**fam.settings_dict(settings), **source}, [base]),
               (lambda: standins.copy_standin("instruct", seed, instruct)) if shipped else
               (lambda: fam.fine_tune_instruct(base, instruct, world["instruct_chats"], settings, threads)), output=instruct)
    atomic_write_json(os.path.join(models, standins.KEYS), {"key": key, "trained": not shipped, "inputs": made_from})

    stages.run("split", stage_key({"split": "halves of the held-out documents; val prompts"}, [world_dir]),
               lambda: _split_for_selection(world_dir, os.path.join(out_dir, "split")), output=os.path.join(out_dir, "split"))
    recipe_path = os.path.join(out_dir, "recipe.yml")
    with open(recipe_path, "w", encoding="utf-8") as handle:
        recipe = demo_recipe(quick)
        recipe["finmerge"]["pretrain"].update(pretrain or {})
        yaml.safe_dump(recipe, handle, sort_keys=False)
    repro = load_reproduction(recipe_path, workdir=out_dir)
    run_reproduction(repro, threads=threads, log=log)
    report = collect(repro)
    finance_relations = sorted({f["relation"] for f in world["facts"] if f["domain"] == "finance"})
    breakdown = _breakdown(out_dir, report, world_dir, finance_relations)
    with open(os.path.join(out_dir, "sweep", "sweep.json"), encoding="utf-8") as handle:
        points = demo_report.sweep_points(json.load(handle))
    report["demo"] = {"quick": quick, "seconds": round(time.perf_counter() - started, 1), "threads": threads,
                      "standins": source["standins"],
                      "world": size.__dict__, "family": fam.settings_dict(settings),
                      "breakdown": breakdown, "sweep_points": points,
                      "targets": demo_report.all_targets(report["results"])}
    paths = write_report(report, title="finmerge demo: " + ("quick world" if quick else "tiny financial world"))
    with open(paths["md"], encoding="utf-8") as handle:
        markdown = handle.read()
    atomic_write_text(paths["md"], markdown.rstrip("\n") + "\n\n" + demo_report.render(report["demo"]))
    return {"report": report, "paths": paths}


def _breakdown(out_dir: str, report: Dict, world_dir: str, finance_relations) -> Dict:
    """Per-question answers of the merges on the finance test questions, and of the instruct model on
    general entities it never chatted about, for the same relation types: from the answers the
    evaluation kept (eval.json, sweep/best_eval.json), no question asked again."""
    def load(path):
        with open(os.path.join(out_dir, path), encoding="utf-8") as handle:
            return json.load(handle)

    evaluated, chosen = load("eval.json"), load(os.path.join("sweep", "best_eval.json"))
    finance_qa = os.path.join(world_dir, "finance_test.jsonl")
    labels = {label: label for label in report["results"] if label.startswith(("sweep best", "data-free choice"))}
    sources = {"merged (1, 1)": evaluated["merged"],
               **{label: chosen["best" if label.startswith("sweep best") else "data_free"] for label in labels}}
    finance = {}
    for label, result in sources.items():
        records = answers.records(result["finance"], finance_qa)
        finance[label] = {"records": records, "by_relation": answers.by_relation(records)}
    wanted = set(finance_relations)
    general = answers.records(evaluated["instruct"]["general"], os.path.join(world_dir, "general_test.jsonl"),
                              keep=lambda item: item.extra.get("relation") in wanted)
    return {"finance_test": finance, "general_same_relations": {"records": general, "by_relation": answers.by_relation(general)}}
