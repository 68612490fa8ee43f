"""What a run tells the user: the training log file, the loss plot, metrics.json and the dry-run report."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class TrainingLog(TrainerCallback):
    """One line per logging step in training_log.txt: step, loss, lr, grad norm, non-pad tokens/s. The speed counts
    the time inside the optimizer steps only, so validations and checkpoints do not lower it. The last step is
    logged too (Trainer logs every `logging_steps` only), so the final train loss includes the last step."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.step_s = 0.0  # seconds spent inside optimizer steps
        self.started = None  # when the current step began
        self.first = self.last = None  # (step_s, num_tokens) at the first and the previous log with a token count
        self.line = None  # the newest line (None for a log without a loss), also shown under the progress bar

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            with self.path.open("a") as f:
                f.write(f"# training starts at step {state.global_step} of {state.max_steps}\n")

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.started is not None:
            self.step_s += time.perf_counter() - self.started
            self.started = None
        if state.max_steps and state.global_step >= state.max_steps and args.logging_strategy == "steps":
            control.should_log = True

    @property
    def tokens_per_s(self) -> Optional[float]:
        """Non-pad tokens per second of step time from the first log to the last (the first steps' warm-up left out)."""
        if self.first and self.last and self.last[0] > self.first[0]:
            return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        tokens, speed = logs.get("num_tokens"), ""
        if tokens is not None:
            if self.last and self.step_s > self.last[0]:
                speed = f" tokens/s={(tokens - self.last[1]) / (self.step_s - self.last[0]):.1f}"
            self.last = (self.step_s, tokens)
            self.first = self.first or self.last
        parts = [f"step={state.global_step}", f"epoch={state.epoch or 0:.2f}"]
        for key, name in (("loss", "loss"), ("eval_loss", "eval_loss"), ("learning_rate", "lr"),
                          ("grad_norm", "grad_norm")):
            if key in logs:
                parts.append(f"{name}={logs[key]:.4g}")
        self.line = " ".join(parts) + speed if len(parts) > 2 else None  # (not the end-of-training summary)
        if self.line:
            with self.path.open("a") as f:
                f.write(self.line + "\n")


class Progress(ProgressCallback):
    """Trainer's progress bars, with each log shown as training_log.txt's line instead of a Python dict."""

    def __init__(self, log: TrainingLog):
        super().__init__()
        self.log = log

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and self.log.line:
            self.training_bar.write(self.log.line)


class LogLines(TrainerCallback):
    """Without a terminal (a Slurm or nohup log, a pipe): no progress bars; each log is printed as training_log.txt's
    line with the steps done and the time left."""

    def __init__(self, log: TrainingLog):
        self.log = log
        self.start = None  # (time, step) when this process began training

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = (time.perf_counter(), state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not self.log.line or self.start is None:
            return
        began, first = self.start
        done, left = state.global_step - first, state.max_steps - state.global_step
        eta = f", {duration((time.perf_counter() - began) / done * left)} left" if done and left else ""
        print(f"{self.log.line} [{state.global_step}/{state.max_steps}{eta}]", flush=True)


def duration(seconds: float) -> str:
    """1:02:03, 2:03 or 3 s."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}" if s >= 60 \
        else f"{s} s"


class SampleAnswers(TrainerCallback):
    """eval.samples=N: after each validation, greedy answers to the first N validation questions (prompted as in
    training), appended to RUN/samples.md with the references. Generation reads no random state and leaves the model
    in training mode, so the run trains the same with or without it (tested)."""

    def __init__(self, records, conversations, tokenizer, max_new_tokens: int, path: Path,
                 repetition_penalty: float = 1.0):
        from .runs import sampling_args

        self.records, self.conversations, self.max_new_tokens = records, conversations, max_new_tokens
        self.tok, self.path, self.greedy = tokenizer, Path(path), sampling_args(repetition_penalty=repetition_penalty)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        from .runs import generate

        training = model.training
        model.eval()
        try:
            answers = generate(model, self.tok, self.conversations, self.max_new_tokens, sampling=self.greedy,
                               use_cache=True)
        finally:
            model.train(training)
        cell = lambda text: text.replace("\n", " ")  # noqa: E731
        loss = (kwargs.get("metrics") or {}).get("eval_loss")
        lines = [f"## step {state.global_step}" + (f" (validation loss {loss:.4f})" if loss is not None else ""), ""]
        for r, (answer, stopped) in zip(self.records, answers):
            lines += question_lines(r.question, r.history_messages(), cell, r.system) + [
                f"- reference: {cell(r.answer)}",
                f"- answer{'' if stopped else ' (cut at eval.max_new_tokens)'}: {cell(answer)}", ""]
        with self.path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def question_lines(question: str, history: List[dict], cell, system: Optional[str] = None) -> List[str]:
    """A question in samples.md or an evaluation report: after its own system message and the earlier turns of its
    conversation (a chat transcript's), quoted."""
    own = [{"role": "system", "content": system}] if system is not None else []
    earlier = [f"> {m['role']}: {cell(m['content'])}" for m in own + list(history)]
    return earlier + [""] * bool(earlier) + [f"**Q:** {cell(question)}", ""]


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


def mean_train_loss(history: list) -> Optional[float]:
    """The mean training loss over every step of the run, from its logs (each the mean of the steps since the one
    before). Trainer's own figure covers only the steps this process trained: after a resume, not the earlier ones."""
    total, last = 0.0, 0
    for h in history:
        if "loss" in h and h["step"] > last:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return total / last if last else None


def write_metrics(trainer, path: Path, wall_s: float, peak_bytes: int,
                  tokens_per_s: Optional[float]) -> dict:
    state = trainer.state
    history = state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None  # checkpoint-N
    metrics = {
        "global_step": state.global_step,
        "max_steps": state.max_steps,  # planned: fewer in global_step when early stopping ended the run
        # whose weights final_model/ holds: the last step, or the best checkpoint's (train.final_model=best)
        "final_model_step": int(best.split("-")[1]) if best and trainer.args.load_best_model_at_end
        else state.global_step,
        "best_checkpoint": best,
        "final_train_loss": losses[-1] if losses else None,
        "mean_train_loss": mean_train_loss(history),
        "best_eval_loss": min(evals) if evals else None,
        "final_eval_loss": evals[-1] if evals else None,
        "trained_tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,  # non-pad, in step time
        "wall_s": round(wall_s, 1),
        "peak_memory_gib": round(peak_bytes / 2**30, 3),
    }
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def memory_estimate(cfg, model_path: str, seq_len: int, model=None):
    """(trainable, total parameters, estimated peak bytes per term), from the model config: no weights loaded.
    `model`: the weightless PEFT model of this config, if one was built already."""
    import torch
    from peft import get_peft_model

    from . import build, estimate
    from .models import attention, meta_model

    if model is None:
        model = get_peft_model(meta_model(model_path, cfg.model.trust_remote_code), build.lora_config(cfg.lora))
    base = model.get_base_model()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    q, t = cfg.quantization, cfg.train
    dtype = q.compute_dtype if q.bits == 4 else cfg.model.dtype
    parts = estimate.estimate(base, trainable, q.bits, dtype, t.batch_size, seq_len, t.gradient_checkpointing,
                              q.double_quant, t.activation_offloading,
                              attention(type(base), cfg.model.attn_implementation),
                              build.padding_free(t), torch.cuda.is_available())
    return trainable, total, parts


def length_histogram(stats, max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(stats.lengths, bins=40, color="#4477aa")
    ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"data.max_length={max_length}")
    ax.set_xlabel("tokens per record (prompt + answer)")
    ax.set_ylabel("records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def data_report(cfg, data, plan: str, advice: Optional[str], params, parts, path: Path) -> None:
    """data_report.md: files, duplicates, leaks, lengths, truncation, steps and the memory estimate."""
    from .estimate import table

    rep = data.report
    lines = ["# Data report", "", "| file | records | notes |", "| --- | --- | --- |"]
    lines += [f"| {f['path']} | {f['records']} | {'; '.join(f['warnings'])} |" for f in rep["files"]]
    dup = rep["duplicates"]
    lines += ["", "## Cleaning", "",
              f"- duplicates dropped: {dup['exact']} exact, {dup['normalized']} normalized; "
              f"{dup['conflicting']} question(s) with different answers kept" if dup else "- deduplication off",
              f"- validation questions also in training: {rep['leak_count']}"
              + (f" (e.g. {rep['leaks'][0]})" if rep["leaks"] else "")]
    lines += [f"- warning: {w}" for w in rep["warnings"]]
    lines += ["", f"## Lengths (tokens per record, data.max_length={cfg.data.max_length}, "
              f"data.overlong={cfg.data.overlong})", "",
              "| split | records | kept | p50 | p90 | p99 | max | over max_length | truncated | dropped |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, st in (("train", data.train_stats), ("validation", data.val_stats)):
        if st:
            s = st.summary()
            lines.append(f"| {name} | {s['records']} | {s['kept']} | {s['tokens_p50']} | {s['tokens_p90']} | "
                         f"{s['tokens_p99']} | {s['tokens_max']} | {s['over_max_length']} | {s['truncated']} | "
                         f"{s['dropped']} |")
    lines += ["", "![token lengths](token_lengths.png)", "",
              "## Training", "",
              f"- optimizer steps: {plan}", *([f"- warning: {advice}"] if advice else []),
              f"- trainable parameters: {params[0]:,} of {params[1]:,} ({100 * params[0] / params[1]:.3f} %)",
              "", "## Estimated peak memory (from the model config; no weights loaded)", "",
              "| term | estimate |", "| --- | --- |", table(parts), ""]
    path.write_text("\n".join(lines))


def data_summary(name: str, stats) -> str:
    s = stats.summary()
    rows = f" ({stats.rows} rows, one per reply)" if stats.train_replies == "each" else ""
    return (f"{name}: {s['records']} record{'' if s['records'] == 1 else 's'}{rows}, kept {s['kept']}; tokens per "
            f"record p50={s['tokens_p50']} p90={s['tokens_p90']} p99={s['tokens_p99']} max={s['tokens_max']}; "
            f"{s['over_max_length']} over max_length ({s['truncated']} truncated, {s['dropped']} dropped); "
            f"{s['trained_tokens']} trained tokens" + (f"; {s['conversations']} conversation(s) of several exchanges, "
                                                       f"{replies(stats)}" if s["conversations"] else ""))


def replies(stats) -> str:
    """Which replies of a conversation train (data.train_replies)."""
    return {"all": "every reply trained", "each": "every reply trained, each in a row of its own after the "
            "conversation before it (data.train_replies=each)"}.get(
        stats.train_replies, "the last reply trained (data.train_replies=last)")


def write_data_stats(data, path: Path) -> None:
    """Counts a user may need later: kept, truncated, dropped, duplicates, leaks; token length percentiles."""
    path.write_text(json.dumps({"train": data.train_stats.summary(),
                                "validation": data.val_stats.summary() if data.val_stats else None,
                                **{k: v for k, v in data.report.items() if k != "files"},
                                "files": data.report["files"]}, indent=2) + "\n")
