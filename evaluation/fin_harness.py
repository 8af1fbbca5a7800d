"""japanese-lm-fin-harness (the paper's benchmark) under this project's lm-eval and datasets.

The harness's tasks load their data through `datasets` loading scripts, which datasets 4 and
later no longer run, and it pins an older lm-eval. So `finmerge eval --fin-harness CLONE`:

1. runs each task's loading script FROM THE CLONE only as plain Python (its `_split_generators`
   with a local stand-in for the download manager, then `_generate_examples`), and writes the
   test split as JSON Lines in a temporary folder (encoded with the script's own `Features`);
2. writes one lm-eval task config per task in that folder: the clone's config for the chosen
   prompt version (with its `include:` chain resolved), data from the JSON Lines file, and the
   leaderboard's main metric only (chabsa: macro-F1 adjusted to its two scored classes; the other
   tasks: accuracy). The `!function utils.*` prompt functions stay in the clone: the task folder
   holds a symbolic link to the clone's utils.py;
3. runs lm-evaluation-harness's `hf` model on each checkpoint and returns the task scores and
   their average.

Nothing from the clone is copied into this repository; importing its scripts runs its code, which
the user chose by passing --fin-harness.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from typing import Any, Dict, List, Optional

import yaml

from finmerge.safety.errors import InputError

# task -> (folder under jlm_fin_eval/datasets, the harness leaderboard's metric for it)
TASKS = {
    "chabsa": ("chabsa", "f1"),
    "cma_basics": ("cma_basics", "acc"),
    "cpa_audit": ("cpa", "acc"),
    "fp2": ("fp2", "acc"),
    "security_sales_1": ("security_sales_1", "acc"),
}
# The prompt version of the harness leaderboard's rows for nekomata-14b-pfn-qfin, its instruct
# merge and nekomata-14b-instruction (nekomata-14b's row used 1.0-0.1.2).
DEFAULT_PROMPT = "1.0-0.2.1"
CHABSA_URL = "https://www.kaggle.com/api/v1/datasets/download/takahirokubo0/chabsa"
CHABSA_F1 = "finmerge_chabsa_two_class_macro_f1"


class FinHarnessError(InputError):
    """The japanese-lm-fin-harness clone, a task or its data cannot be used; the message says why."""


class _FunctionRef(str):
    """A `!function utils.name` reference kept as written."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(_FunctionRef, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _register_chabsa_f1() -> None:
    """The leaderboard's chabsa score: macro-F1 over gold/predicted labels times 1.5.

    chabsa's gold labels include "neutral", which is not a choice (its gold index is -100 and is never
    predicted), so the macro average over three labels is rescaled to the two that can be scored.
    """
    from lm_eval.api import registry

    if CHABSA_F1 in registry.AGGREGATION_REGISTRY:
        return

    @registry.register_aggregation(CHABSA_F1)
    def _chabsa_f1(items) -> float:
        from sklearn.metrics import f1_score

        golds, preds = zip(*items)
        return float(f1_score(golds, preds, average="macro") * 1.5)


def _load_task_yaml(path: str) -> Dict[str, Any]:
    """The clone's task config with its `include:` chain merged (the included file first)."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.load(handle, Loader=_TaskLoader) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise FinHarnessError(f"cannot read task config {path}: {error}") from None
    if not isinstance(config, dict):
        raise FinHarnessError(f"task config {path} is not a mapping")
    parent = config.pop("include", None)
    if parent:
        config = {**_load_task_yaml(os.path.join(os.path.dirname(path), parent)), **config}
    return config


class _LocalDownloads:
    """Stands in for datasets' download manager: relative names are files beside the script; the
    chABSA URL is the archive the user downloaded (extracted into our temporary folder)."""

    def __init__(self, script_dir: str, archives: Dict[str, Optional[str]], workdir: str):
        self.script_dir, self.archives, self.workdir = script_dir, archives, workdir

    def download(self, name):
        if isinstance(name, (list, tuple)):
            return [self.download(n) for n in name]
        if name in self.archives:
            return self._archive(name)
        path = os.path.join(self.script_dir, name)
        if not os.path.exists(path):
            raise FinHarnessError(f"the clone's data file {path} is missing; is the clone complete (git lfs pull)?")
        return path

    def _archive(self, url: str) -> str:
        archive = self.archives[url]
        if not archive:
            raise FinHarnessError(f"the chabsa task needs the chABSA dataset archive: download {url} (a .zip, free Kaggle "
                                  "account) and pass its path with --chabsa-archive, or leave chabsa out with --fin-tasks")
        if not zipfile.is_zipfile(archive):
            raise FinHarnessError(f"--chabsa-archive {archive} is not a zip archive; download {url}")
        target = tempfile.mkdtemp(prefix="chabsa-", dir=self.workdir)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(target)
        return target

    def download_and_extract(self, name):
        return self.download(name)


def _as_strings(feature, value):
    """datasets' Value("string") encoder is `str(value)`: a missing spreadsheet cell (float NaN) in a
    string field becomes "nan" (cpa_audit: 38 questions with five choices in a six-choice sheet)."""
    import datasets

    if isinstance(feature, dict) and isinstance(value, dict):
        return {k: _as_strings(feature[k], v) if k in feature else v for k, v in value.items()}
    inner = getattr(feature, "feature", None)  # List / Sequence
    if inner is not None and isinstance(value, list):
        return [_as_strings(inner, v) for v in value]
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string") and value is not None:
        return value if isinstance(value, str) else str(value)
    return value


def _as_columns(features, example: Dict[str, Any]) -> Dict[str, Any]:
    """A `Sequence({...})` field given as a list of dicts becomes a dict of lists, as datasets used to
    store it (the clone's prompt functions read doc["choices"]["text"]); datasets 5 no longer does it."""
    out = dict(example)
    for key, feature in features.items():
        value = out.get(key)
        if isinstance(feature, dict) and isinstance(value, list):
            value = {name: [item.get(name) for item in value] for name in feature}
        out[key] = _as_strings(feature, value)
    return out


@contextlib.contextmanager
def _pandas_2_strings():
    """cpa_audit's script was written for pandas 2, where `astype(str)` turns a missing cell into "nan";
    pandas 3 keeps it missing and the script fails on it. Ask pandas 3 for the old behaviour meanwhile."""
    try:
        import pandas
    except ImportError:
        yield
        return
    if int(pandas.__version__.split(".")[0]) < 3:
        yield
        return
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the option is deprecated in pandas 3, removed in 4
        with pandas.option_context("future.infer_string", False):
            yield


def _import_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass-style builder configs look their module up
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        raise FinHarnessError(f"the clone's {path} needs a package that is not installed: {error}; install it "
                              "(e.g. pip install openpyxl for cpa_audit's .xlsx)") from None
    return module


class FinHarness:
    """The chosen tasks of a japanese-lm-fin-harness clone, converted once and run on each model."""

    def __init__(self, clone: str, tasks: Optional[List[str]] = None, prompt: Optional[str] = None,
                 chabsa_archive: Optional[str] = None):
        self.clone = os.path.abspath(clone)
        self.tasks = list(tasks or TASKS)
        self.prompt = prompt or DEFAULT_PROMPT
        self.chabsa_archive = chabsa_archive
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise FinHarnessError(f"--fin-tasks: unknown task(s) {', '.join(unknown)}; choose among {', '.join(TASKS)}")
        self.package = os.path.join(self.clone, "jlm_fin_eval")
        if not all(os.path.isdir(os.path.join(self.package, d)) for d in ("tasks", "datasets")):
            raise FinHarnessError(f"--fin-harness {clone} is not a clone of pfnet-research/japanese-lm-fin-harness (no "
                                  "jlm_fin_eval/tasks and jlm_fin_eval/datasets); git clone "
                                  "https://github.com/pfnet-research/japanese-lm-fin-harness and pass its folder")
        for task in self.tasks:
            if not os.path.isfile(self._task_yaml(task)):
                raise FinHarnessError(f"--fin-prompt {self.prompt}: the clone has no {self._yaml_for(task, self.prompt)}; "
                                      f"prompt versions are the NAME-VERSION.yaml files in {os.path.dirname(self._task_yaml(task))} "
                                      "('default' for NAME.yaml)")
        if chabsa_archive and not os.path.isfile(chabsa_archive):
            raise FinHarnessError(f"--chabsa-archive {chabsa_archive} does not exist; download {CHABSA_URL}")
        if chabsa_archive and not zipfile.is_zipfile(chabsa_archive):
            raise FinHarnessError(f"--chabsa-archive {chabsa_archive} is not a zip archive; download {CHABSA_URL}")
        self.workdir: Optional[str] = None
        self.names: Dict[str, str] = {}  # task -> the lm-eval task name we generated
        self._manager = None

    def task_prompt(self, task: str) -> str:
        """The task's prompt version for the chosen one: the same, or (as the harness's own run scripts choose)
        the nearest shorter one; chabsa has no 0.1.2/0.2.1 configs, so 1.0-0.2.1 runs chabsa-1.0-0.2."""
        version = self.prompt
        while version != "default" and not os.path.isfile(self._yaml_for(task, version)) and "." in version.rsplit("-", 1)[-1]:
            version = version.rsplit(".", 1)[0]
        return version

    def _yaml_for(self, task: str, version: str) -> str:
        name = task if version == "default" else f"{task}-{version}"
        return os.path.join(self.package, "tasks", task, f"{name}.yaml")

    def _task_yaml(self, task: str) -> str:
        return self._yaml_for(task, self.task_prompt(task))

    def convert(self, task: str) -> List[Dict[str, Any]]:
        """The test split as the clone's loading script yields it, encoded with the script's Features."""
        folder = os.path.join(self.package, "datasets", TASKS[task][0])
        scripts = [f for f in sorted(os.listdir(folder)) if f.endswith(".py") and f != "__init__.py"] if os.path.isdir(folder) else []
        if not scripts:
            raise FinHarnessError(f"the clone has no loading script in {folder}")
        import datasets

        module = _import_file(os.path.join(folder, scripts[0]), f"_finmerge_fin_{task}")
        builders = [v for v in vars(module).values()
                    if isinstance(v, type) and issubclass(v, datasets.GeneratorBasedBuilder) and v is not datasets.GeneratorBasedBuilder]
        if not builders:
            raise FinHarnessError(f"{folder}/{scripts[0]} defines no datasets.GeneratorBasedBuilder")
        builder = builders[0].__new__(builders[0])  # its methods only; datasets 5 cannot run it as a builder
        features = builder._info().features
        downloads = _LocalDownloads(folder, {CHABSA_URL: self.chabsa_archive}, self.workdir or tempfile.gettempdir())
        splits = [s for s in builder._split_generators(downloads) if str(s.name) == "test"]
        if not splits:
            raise FinHarnessError(f"{folder}/{scripts[0]} has no test split")
        try:
            with _pandas_2_strings():
                return [features.encode_example(_as_columns(features, example)) if features else example
                        for _, example in builder._generate_examples(**splits[0].gen_kwargs)]
        except ImportError as error:  # cpa_audit reads an .xlsx through pandas, which needs openpyxl
            raise FinHarnessError(f"the clone's {folder}/{scripts[0]} needs a package that is not installed: "
                                  f"{str(error).splitlines()[0]} (cpa_audit: pip install openpyxl)") from None

    def task_config(self, task: str, data_file: str) -> Dict[str, Any]:
        config = _load_task_yaml(self._task_yaml(task))
        for key in ("dataset_path", "dataset_name", "dataset_kwargs", "metric_list", "group", "tag"):
            config.pop(key, None)
        metric = TASKS[task][1]
        aggregation = CHABSA_F1 if metric == "f1" else "mean"
        config.update(task=self.names[task], dataset_path="json", dataset_kwargs={"data_files": {"test": data_file}},
                      test_split="test", training_split=None, validation_split=None,
                      metric_list=[{"metric": metric, "aggregation": aggregation, "higher_is_better": True}])
        return config

    def prepare(self) -> str:
        """Convert the data and write the task configs into a new temporary folder; returns it."""
        self.workdir = tempfile.mkdtemp(prefix="finmerge-fin-harness-")
        for task in self.tasks:
            self.names[task] = f"finmerge_fin_{task}"
            task_dir = os.path.join(self.workdir, "tasks", task)
            os.makedirs(task_dir)
            data_file = os.path.join(self.workdir, f"{task}.jsonl")
            with open(data_file, "w", encoding="utf-8") as handle:
                for row in self.convert(task):
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            utils = os.path.join(self.package, "tasks", task, "utils.py")
            if os.path.isfile(utils):  # the prompt functions are read from the clone at run time
                os.symlink(utils, os.path.join(task_dir, "utils.py"))
            with open(os.path.join(task_dir, f"{self.names[task]}.yaml"), "w", encoding="utf-8") as handle:
                yaml.dump(self.task_config(task, data_file), handle, Dumper=_TaskDumper, allow_unicode=True, sort_keys=False)
        return self.workdir

    def task_manager(self):
        """Only our generated tasks: indexing lm-eval's thousands of built-in task files costs a minute on 2 cores."""
        from lm_eval.tasks import TaskManager

        _register_chabsa_f1()
        if self._manager is None:
            self._manager = TaskManager(include_path=os.path.join(self.workdir, "tasks"), include_defaults=False)
        return self._manager

    def rendered(self, task: str) -> List[Dict[str, Any]]:
        """What lm-eval will ask for every document of `task`: {text, choices, target} (a check of the conversion)."""
        loaded = self.task_manager().load([self.names[task]])["tasks"][self.names[task]]
        return [{"text": loaded.doc_to_text(doc), "choices": loaded.doc_to_choice(doc), "target": loaded.doc_to_target(doc)}
                for doc in loaded.test_docs()]

    def run(self, model_path: str, batch_size: int = 8, device: str = "cpu", dtype: str = "float32",
            trust_remote_code: bool = False) -> Dict[str, Any]:
        """{"prompt", "metrics": {task: metric}, "scores": {task: value}, "average"} for one checkpoint."""
        try:
            import lm_eval
        except ImportError as error:
            raise FinHarnessError("--fin-harness needs EleutherAI lm-evaluation-harness: pip install 'finmerge[harness]'") from error
        from finmerge.evaluation.harness import hf_model_args, lm_eval_device

        if self.workdir is None:
            self.prepare()
        results = lm_eval.simple_evaluate(
            model="hf", model_args=hf_model_args(model_path, device, dtype, trust_remote_code),
            tasks=[self.names[t] for t in self.tasks], num_fewshot=0, batch_size=batch_size,
            task_manager=self.task_manager(), device=lm_eval_device(device),
        )["results"]
        scores = {task: float(results[self.names[task]][f"{TASKS[task][1]},none"]) for task in self.tasks}
        return {"prompt": self.prompt, "prompts": {t: self.task_prompt(t) for t in self.tasks},
                "metrics": {t: TASKS[t][1] for t in self.tasks}, "scores": scores,
                "average": sum(scores.values()) / len(scores)}

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir, self._manager = None, None
