"""EleutherAI lm-evaluation-harness tasks for `finmerge eval --harness-tasks` (the `harness` extra).

This is how japanese-lm-fin-harness scores models (it is built on lm-eval): with a GPU, point
`include_path` at its task folder and name its tasks. Offline, any task whose data is local works.
"""

from typing import Dict, List, Optional

from finmerge.safety.errors import InputError

PRIMARY_METRICS = ("acc", "f1", "exact_match", "acc_norm")


class HarnessUnavailable(InputError):
    """lm-eval is not installed."""


def hf_model_args(model_path: str, device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False) -> Dict:
    """lm-eval's `hf` model settings for finmerge's --device/--dtype ("auto" device: accelerate spreads the model)."""
    from finmerge.evaluation.devices import DTYPES
    from finmerge.safety.dtypes import dtype_name

    args = {"pretrained": model_path, "dtype": dtype_name(dtype, DTYPES), "trust_remote_code": trust_remote_code}
    if device == "auto":
        args["parallelize"] = True
    return args


def lm_eval_device(device: str) -> Optional[str]:
    return None if device == "auto" else device


def run_harness(model_path: str, tasks: List[str], include_path: Optional[str] = None, num_fewshot: int = 0,
                batch_size: int = 8, trust_remote_code: bool = False, device: str = "cpu",
                dtype: str = "float32") -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate on a local checkpoint."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise HarnessUnavailable("--harness-tasks needs EleutherAI lm-evaluation-harness: pip install 'finmerge[harness]'") from error
    results = lm_eval.simple_evaluate(
        model="hf", model_args=hf_model_args(model_path, device, dtype, trust_remote_code), tasks=tasks,
        num_fewshot=num_fewshot, batch_size=batch_size, task_manager=TaskManager(include_path=include_path),
        device=lm_eval_device(device),
    )["results"]
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not key.split(",")[0].endswith("_stderr")}
            for task, metrics in results.items()}


def primary_metric(metrics: Dict[str, float]) -> Optional[str]:
    return next((m for m in PRIMARY_METRICS if m in metrics), None)
