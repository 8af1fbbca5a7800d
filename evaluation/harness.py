"""EleutherAI lm-evaluation-harness tasks for `finmerge eval --harness-tasks` (the `harness` extra).

This is how japanese-lm-fin-harness scores models (it is built on lm-eval): with a GPU, point
`include_path` at its task folder and name its tasks. Offline, any task whose data is local works.
"""

from typing import Dict, List, Optional

PRIMARY_METRICS = ("acc", "f1", "exact_match", "acc_norm")


class HarnessUnavailable(RuntimeError):
    """lm-eval is not installed."""


def run_harness(model_path: str, tasks: List[str], include_path: Optional[str] = None, num_fewshot: int = 0,
                batch_size: int = 8, trust_remote_code: bool = False) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate on a local checkpoint (CPU or CUDA)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise HarnessUnavailable("--harness-tasks needs EleutherAI lm-evaluation-harness: pip install 'finmerge[harness]'") from error
    import torch

    model_args = f"pretrained={model_path},dtype=float32,trust_remote_code={trust_remote_code}"
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot, batch_size=batch_size,
        task_manager=TaskManager(include_path=include_path), device="cuda" if torch.cuda.is_available() else "cpu",
    )["results"]
    return {task: {key.split(",")[0]: value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and not key.split(",")[0].endswith("_stderr")}
            for task, metrics in results.items()}


def primary_metric(metrics: Dict[str, float]) -> Optional[str]:
    return next((m for m in PRIMARY_METRICS if m in metrics), None)
