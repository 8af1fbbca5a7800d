"""`finmerge reproduce`: run a reproduction recipe's stages and write one report beside the outputs.

pretrain (optional) -> merge (plain `mergekit-yaml`, diagnostics written into OUT) -> eval -> sweep
-> report.md / report.json. Each stage is skipped when its settings and input files did not change.
"""

import os
import subprocess
import sys
from typing import Callable, Dict, Optional

import yaml

from finmerge.reproduce.recipe import Reproduction
from finmerge.reproduce.stages import Stages, stage_key


def _eval_settings(section: Dict, knobs_from: Optional[Dict] = None):
    """Data (text, qa) from `section`; generation/batching knobs from `knobs_from` unless `section` sets them."""
    from finmerge.evaluation.run import EvalSettings

    knobs = {k: v for k, v in {**(knobs_from or {}), **section}.items() if k in ("max_len", "max_new_tokens", "batch_size", "generate", "turn_end")}
    return EvalSettings(text=section.get("text"), qa=dict(section.get("qa") or {}), **knobs)


def _pretrain(repro: Reproduction, threads: Optional[int]) -> None:
    from finmerge.pretrain.config import build_config
    from finmerge.pretrain.train import run_pretraining

    overrides = {**repro.pretrain, "model": repro.model("base"), "output": repro.model("domain")}
    if threads:
        overrides["num_threads"] = threads
    run_pretraining(build_config(None, overrides))


def _merge(repro: Reproduction, extra_args=()) -> None:
    """The plain `mergekit-yaml` command on the recipe (absolute paths), as a user would run it."""
    recipe_path = os.path.join(repro.workdir, ".stages", "merge-recipe.yml")
    with open(recipe_path, "w") as handle:
        yaml.safe_dump(repro.merge, handle, sort_keys=False)
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), recipe_path, repro.output, "--quiet", *extra_args]
    subprocess.run(command, check=True, env={**os.environ, "FINMERGE_OVERWRITE": "1"})


def run_reproduction(repro: Reproduction, threads: Optional[int] = None, log: Callable[[str], None] = print,
                     merge_args=()) -> Dict:
    from finmerge.evaluation.run import evaluate, write_results
    from finmerge.sweep.run import SweepSettings, run_sweep, write_sweep

    stages = Stages(repro.workdir, log=log)
    models = {"base": repro.model("base"), "domain": repro.model("domain"), "instruct": repro.model("instruct")}
    if "pretrain" in repro.stages:
        key = stage_key({"pretrain": repro.pretrain}, [models["base"], *repro.pretrain.get("data", []), *repro.pretrain.get("replay_data", [])])
        stages.run("pretrain", key, lambda: _pretrain(repro, threads), output=models["domain"], resumable=True)
    if "merge" in repro.stages:
        key = stage_key({"merge": repro.merge}, list(models.values()))
        stages.run("merge", key, lambda: _merge(repro, merge_args), output=repro.output)
    results_path = os.path.join(repro.workdir, "eval.json")
    if "eval" in repro.stages:
        settings = _eval_settings(repro.eval)
        key = stage_key({"eval": repro.eval}, [*models.values(), repro.output, settings.text or "", *settings.qa.values()])
        stages.run("eval", key, lambda: write_results(evaluate({**models, "merged": repro.output}, settings,
                                                                 progress=lambda m: log(f"[eval] {m} done")), results_path))
    sweep_dir = os.path.join(repro.workdir, "sweep")
    if "sweep" in repro.stages:
        section = repro.sweep
        settings = SweepSettings(eval=_eval_settings(section, repro.eval),
                                 **{k: section[k] for k in ("w_domain", "w_instruct", "variants", "metric") if k in section})
        key = stage_key({"sweep": section, "eval": repro.eval, "merge": repro.merge}, list(models.values()))

        def sweep():
            best = os.path.join(repro.workdir, "best-merge")
            result = run_sweep(repro.merge, settings, sweep_dir, log=log, keep_best=best)
            write_sweep(result, sweep_dir)
            if "eval" in repro.stages:  # the best merge on the reported (test) data, next to the others
                write_results(evaluate({"best": best}, _eval_settings(repro.eval)), os.path.join(sweep_dir, "best_eval.json"))

        stages.run("sweep", key, sweep, output=sweep_dir)
    return {"stages": dict(stages.skipped), "seconds": dict(stages.timings), "eval": results_path,
            "sweep": sweep_dir if "sweep" in repro.stages else None}
