"""What a run tells the user: the training log file, the loss plot, metrics.json and the dry-run report."""
from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback


class TrainingLog(TrainerCallback):
    """One line per logging step in training_log.txt: step, loss, lr, grad norm, trained tokens/s."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.last = None  # (time, num_tokens) at the previous log

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(f"# training starts at step {state.global_step} of {state.max_steps}\n")
        self.last = (time.perf_counter(), None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), logs.get("num_tokens")
        speed = ""
        if tokens is not None and self.last and self.last[1] is not None and now > self.last[0]:
            speed = f" tokens/s={(tokens - self.last[1]) / (now - self.last[0]):.1f}"
        if tokens is not None:
            self.last = (now, tokens)
        parts = [f"step={state.global_step}", f"epoch={state.epoch or 0:.2f}"]
        for key, name in (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"),
                          ("grad_norm", "grad_norm")):
            if key in logs:
                parts.append(f"{name}={logs[key]:.4g}")
        if len(parts) > 2:  # skip the end-of-training summary, which has none of these
            with self.path.open("a") as f:
                f.write(" ".join(parts) + speed + "\n")


def plot_loss(log_history, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_metrics(trainer, train_result, path: Path, wall_s: float) -> dict:
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    metrics = {
        "global_step": trainer.state.global_step,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": train_result.training_loss,
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
        "trained_tokens_per_s": None,
        "wall_s": round(wall_s, 1),
    }
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    runtime = train_result.metrics.get("train_runtime")
    if tokens and runtime:
        metrics["trained_tokens_per_s"] = round(tokens[-1] / runtime, 1)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def trainable_parameters(model_path: str, lora_cfg, trust_remote_code: bool = False):
    """(trainable, total) parameters of base + LoRA, computed on the meta device: no weights are loaded."""
    from peft import get_peft_model

    from .models import meta_model

    model = get_peft_model(meta_model(model_path, trust_remote_code), lora_cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def data_summary(name: str, stats) -> str:
    s = stats.summary()
    return (f"{name}: {s['records']} records, kept {s['kept']}; tokens per record p50={s['tokens_p50']} "
            f"p90={s['tokens_p90']} max={s['tokens_max']}; {s['over_max_length']} over max_length "
            f"({s['truncated']} truncated, {s['dropped']} dropped); {s['trained_tokens']} trained tokens")
