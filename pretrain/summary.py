"""What a finished run reports: held-out perplexity, the loss curve (and its plot), training_summary.json."""

import math
import os
from typing import Any, Dict, List, Optional


def loss_curve(log_history: List[Dict[str, Any]]) -> List[Dict[str, float]]:
    return [{"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
            for e in log_history if "loss" in e and "step" in e]


def plot_loss(curve: List[Dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o" if len(curve) < 40 else None)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats/token)")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def perplexity(trainer, dataset) -> Optional[Dict[str, float]]:
    """exp(mean next-token loss) over the held-out blocks. All blocks have the same length and no
    padding, so Trainer.evaluate's batch-size-weighted mean of batch losses is the per-token mean."""
    if dataset is None or len(dataset) == 0:
        return None
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix="heldout")
    loss = float(metrics["heldout_loss"])
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def plot_title(summary: Dict[str, Any]) -> str:
    before, after = summary["heldout_before"], summary["heldout_after"]
    if before and after:
        return (f"held-out perplexity {before['perplexity']:.3g} -> {after['perplexity']:.3g} "
                f"({summary['tokens_seen']:,} tokens, {summary['steps']} steps)")
    return f"{summary['tokens_seen']:,} tokens, {summary['steps']} steps (no held-out text)"


def heldout_note(before, eval_fraction: float) -> Optional[str]:
    if before:
        return None
    if eval_fraction > 0:
        return "no held-out block: the held-out documents hold fewer than seq_len tokens (raise eval_fraction)"
    return "eval_fraction is 0"


PLOT_FILE = "loss_curve.png"


def write_plot(summary: Dict[str, Any], output: str) -> None:
    plot_loss(summary["loss_curve"], os.path.join(output, PLOT_FILE), plot_title(summary))
