"""`finmerge reproduce`: run a reproduction recipe's stages and write one report beside the outputs.

pretrain (optional) -> merge (plain `mergekit-yaml`, diagnostics written into OUT) -> eval -> sweep
-> report.md / report.json. Each stage is skipped when nothing it depends on changed (see stages.py).

`trust_remote_code` and `allow_pickle` come from the command line only (the recipe cannot set them,
recipe.py refuses it) and reach every stage: pretraining, the `mergekit-yaml` subprocess
(`--trust-remote-code`, FINMERGE_ALLOW_PICKLE=1), evaluation and the sweep.
"""

import os
import sys
from typing import Callable, Dict, Optional

import yaml

from finmerge.evaluation.settings import EvalData, EvalKnobs, EvalSettings
from finmerge.reproduce.recipe import Reproduction, build_pretrain_config, check_locations
from finmerge.reproduce.stages import Stages
from finmerge.safety.locks import exclusive
from finmerge.safety.outputs import atomic_write_text
from finmerge.safety.signals import run_child


def flags_of(trust_remote_code: bool = False, allow_pickle: bool = False) -> Dict[str, bool]:
    return {"trust_remote_code": bool(trust_remote_code), "allow_pickle": bool(allow_pickle)}


def eval_settings(data: EvalData, knobs: EvalKnobs, flags: Dict[str, bool], template: Optional[str] = None,
                  **given) -> EvalSettings:
    """What `evaluate` is asked: the files of `data` (the eval or sweep section), the generation and batching
    knobs of `knobs` (finmerge.eval: the sweep scores its points as the report does), the command-line
    flags, the recipe's chat template; `given` (command-line values) wins over all of them."""
    return EvalSettings(**{**data.model_dump(include=set(EvalData.model_fields)),
                           **knobs.model_dump(include=set(EvalKnobs.model_fields)),
                           "chat_template": template, **flags, **given})


def recipe_chat_template(repro: Reproduction) -> Optional[str]:
    """The recipe's own Jinja `chat_template:` (e.g. nekomata's Alpaca-ja one): every model is asked through it.

    mergekit's named templates ("chatml", "auto", ...) are not Jinja; they are left to each model's own.
    """
    template = repro.merge.get("chat_template")
    return template if isinstance(template, str) and ("{%" in template or "{{" in template) else None


def _pretrain(repro: Reproduction, threads: Optional[int], flags: Dict[str, bool]) -> None:
    from finmerge.pretrain.train import run_pretraining

    run_pretraining(build_pretrain_config(repro, threads, **flags))


def merge_command(repro: Reproduction, recipe_path: str, flags: Dict[str, bool]):
    """The plain `mergekit-yaml` command line and environment for the recipe, as a user would run it."""
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), recipe_path, repro.output, "--quiet"]
    if flags["trust_remote_code"]:
        command.append("--trust-remote-code")
    env = {k: v for k, v in os.environ.items() if k not in ("FINMERGE_OVERWRITE", "FINMERGE_ALLOW_PICKLE")}
    if flags["allow_pickle"]:
        env["FINMERGE_ALLOW_PICKLE"] = "1"
    return command, env


def _merge(repro: Reproduction, flags: Dict[str, bool]) -> None:
    """mergekit-yaml into OUT, which the stage runner has made sure is absent: it is never asked to
    replace a folder (no FINMERGE_OVERWRITE), so a folder of the user's cannot be lost."""
    recipe_path = os.path.join(repro.workdir, ".stages", "merge-recipe.yml")
    atomic_write_text(recipe_path, yaml.safe_dump(repro.merge, sort_keys=False))
    command, env = merge_command(repro, recipe_path, flags)
    returncode = run_child(command, env=env)  # stopped: mergekit-yaml is stopped too and cleans up
    if returncode != 0:
        raise RuntimeError(f"the merge stage failed: mergekit-yaml exited with code {returncode} "
                           f"(its message is above); the recipe it ran is {recipe_path}")


def _baselines(repro: Reproduction, flags: Dict[str, bool], report_eval: EvalSettings, log: Callable[[str], None]) -> None:
    """mergekit's own methods on the same three models, by plain `mergekit-multi` (one process for all of
    them, each recipe as `mergekit-yaml` would read it), then evaluated as the merge is."""
    from finmerge.evaluation.run import evaluate, write_results
    from finmerge.sweep.baselines import baseline_recipe

    recipe_path = os.path.join(repro.workdir, ".stages", "baselines-recipes.yml")
    # mergekit-multi takes any string equal to a merge's name for a reference to that merge, the method
    # name included: a merge named "ties" would depend on itself
    folders = {method: f"{method}-merge" for method in repro.baselines}
    recipes = [{"name": folders[method], **baseline_recipe(repro.merge, method)} for method in repro.baselines]
    atomic_write_text(recipe_path, yaml.safe_dump_all(recipes, sort_keys=False))
    models = os.path.join(repro.baselines_dir, "models")
    command = [os.path.join(os.path.dirname(sys.executable), "mergekit-multi"), recipe_path, "--intermediate-dir", models,
               "--no-lazy", "--random-seed", "0", "--quiet"]  # seeded: dare_ties and della drop at random
    if flags["trust_remote_code"]:
        command.append("--trust-remote-code")
    returncode = run_child(command)
    if returncode != 0:
        raise RuntimeError(f"the baselines stage failed: mergekit-multi exited with code {returncode} (its message is "
                           f"above); the recipes it ran are {recipe_path}")
    results = evaluate({method: os.path.join(models, folder) for method, folder in folders.items()}, report_eval,
                       progress=lambda m: log(f"[baselines] {m} evaluated"))
    write_results(results, os.path.join(repro.baselines_dir, "baselines.json"))


def run_reproduction(repro: Reproduction, threads: Optional[int] = None, log: Callable[[str], None] = print, *,
                     trust_remote_code: bool = False, allow_pickle: bool = False) -> Dict:
    """Run the recipe's stages; a second reproduction in the same workdir is refused while this one runs."""
    check_locations(repro)  # before anything is written
    lock = os.path.join(repro.workdir, ".stages", "reproduce.lock")
    busy = (lambda holder: f"another finmerge reproduce (process {holder}) is running in {repro.workdir} now "
                           f"(lock {lock}); wait for it to finish, or give this one another --workdir")
    with exclusive(lock, busy):
        return _run_stages(repro, threads, log, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


def _run_stages(repro: Reproduction, threads: Optional[int] = None, log: Callable[[str], None] = print, *,
                trust_remote_code: bool = False, allow_pickle: bool = False) -> Dict:
    from finmerge.evaluation.run import evaluate, write_results
    from finmerge.sweep.run import SweepGrid, SweepSettings, run_sweep, write_sweep

    flags = flags_of(trust_remote_code, allow_pickle)
    stages = Stages(repro.workdir, log=log)
    models = {"base": repro.model("base"), "domain": repro.model("domain"), "instruct": repro.model("instruct")}
    common = {"flags": flags}  # every key: the flags change what runs (and may change what loads)
    template = recipe_chat_template(repro)
    if "pretrain" in repro.stages:
        key = stages.key({**common, "pretrain": repro.pretrain},
                         [models["base"], *repro.pretrain.get("data", []), *repro.pretrain.get("replay_data", [])])
        stages.run("pretrain", key, lambda: _pretrain(repro, threads, flags), outputs=[models["domain"]], resumable=True)
    if "merge" in repro.stages:
        key = stages.key({**common, "merge": repro.merge}, list(models.values()))
        stages.run("merge", key, lambda: _merge(repro, flags), moved_in=[repro.output])
    results_path = os.path.join(repro.workdir, "eval.json")
    report_eval = eval_settings(repro.eval, repro.eval, flags, template)
    if "eval" in repro.stages:
        key = stages.key({**common, "eval": repro.eval.given()},
                         [*models.values(), repro.output, report_eval.text or "", *report_eval.qa.values()])
        stages.run("eval", key, lambda: write_results(evaluate({**models, "merged": repro.output}, report_eval,
                                                                 progress=lambda m: log(f"[eval] {m} done")), results_path),
                   files=[results_path])
    if "baselines" in repro.stages:
        key = stages.key({**common, "baselines": repro.baselines, "eval": repro.eval.given(), "merge": repro.merge},
                         [*models.values(), report_eval.text or "", *report_eval.qa.values()])
        stages.run("baselines", key, lambda: _baselines(repro, flags, report_eval, log), outputs=[repro.baselines_dir])
    if "sweep" in repro.stages:
        section = repro.sweep
        settings = SweepSettings(**section.model_dump(include=set(SweepGrid.model_fields)),
                                 eval=eval_settings(section, repro.eval, flags, template))
        # the sweep reads its own question files, and the chosen merges are evaluated on the reported ones
        question_files = [settings.eval.text or "", settings.prompts or "", *settings.eval.qa.values(),
                          report_eval.text or "", *report_eval.qa.values()]
        key = stages.key({**common, "sweep": section.given(), "eval": repro.eval.given(), "merge": repro.merge},
                         [*models.values(), *question_files])

        def sweep():
            result = run_sweep(repro.merge, settings, repro.sweep_dir, log=log, keep_best=repro.best_merge,
                               keep_data_free=repro.data_free_merge)
            write_sweep(result, repro.sweep_dir)
            chosen = {name: path for name, path in (("best", repro.best_merge), ("data_free", repro.data_free_merge))
                      if result.get(name) is not None}
            if "eval" in repro.stages:  # the chosen merges on the reported (test) data, next to the others
                write_results(evaluate(chosen, report_eval), os.path.join(repro.sweep_dir, "best_eval.json"))

        kept = [path for path, chosen in ((repro.best_merge, settings.metric), (repro.data_free_merge, settings.prompts)) if chosen]
        stages.run("sweep", key, sweep, outputs=[repro.sweep_dir], moved_in=kept)
    return {"stages": dict(stages.skipped), "seconds": dict(stages.timings), "eval": results_path,
            "sweep": repro.sweep_dir if "sweep" in repro.stages else None, "flags": flags}
