"""A sweep's results at a glance: `python -m sft_recipes.sweep_report SWEEP_DIR`.

Writes SWEEP_DIR/summary.csv, summary.md (one row per job: its overrides and metrics, best validation loss
first) and summary.png (the validation loss curves of all jobs on one plot). Runs by itself at the end of
every `-m` sweep (the Hydra callback below, named in conf/train.yaml).
"""
from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path
from typing import List

import yaml
from hydra.experimental.callback import Callback

METRICS = ("best_eval_loss", "final_eval_loss", "final_train_loss", "trained_tokens_per_s", "peak_memory_gib",
           "wall_s", "global_step", "final_model_step")
# the fine-tuned model's answers, where eval.after_train ran
ANSWERS = ("rouge_l", "token_f1", "stopped_at_end_of_turn", "words")


def eval_curve(job: Path) -> List[tuple]:
    """(step, validation loss) pairs from the job's training_log.txt."""
    log = job / "training_log.txt"
    points = []
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "eval_loss" in fields:
            points.append((int(fields["step"]), float(fields["eval_loss"])))
    return points


def collect(sweep_dir: Path) -> List[dict]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").exists()),
                      key=lambda p: (len(p.name), p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
        metrics_file = job / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
        answers = job / "eval" / "metrics.json"
        answers = json.loads(answers.read_text())["fine_tuned"] if answers.exists() else {}
        error = job / "error.txt"
        status = (f"failed: {error.read_text().strip()[:120]}" if error.exists() else
                  "done" if metrics else "failed or unfinished")
        rows.append({"job": job.name, "status": status,
                     "overrides": " ".join(o for o in overrides if not o.startswith("hydra.")),
                     **{k: metrics.get(k) for k in METRICS}, **{k: answers.get(k) for k in ANSWERS},
                     "curve": eval_curve(job)})
    if len(rows) > 1:  # show what differs between jobs, not the overrides they share
        common = set.intersection(*(set(r["overrides"].split()) for r in rows))
        for r in rows:
            r["overrides"] = " ".join(o for o in r["overrides"].split() if o not in common)
    rank = lambda r: (r["best_eval_loss"] is None, r["best_eval_loss"] or 0, r["final_train_loss"] or 0)  # noqa: E731
    return sorted(rows, key=rank)


def write(sweep_dir, rows: List[dict]) -> None:
    sweep_dir = Path(sweep_dir)
    answers = ANSWERS if any(r["rouge_l"] is not None for r in rows) else ()
    columns = ["job", "status", "overrides", *METRICS, *answers]
    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Sweep {sweep_dir}", "", f"{len(rows)} job(s), best validation loss first.", "",
             "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", "![validation loss](summary.png)", ""]
    (sweep_dir / "summary.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), "o-", label=f"{r['job']}: {r['overrides']}"[:60])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    if any(r["curve"] for r in rows):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no validation loss logged", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(sweep_dir / "summary.png", dpi=100)
    plt.close(fig)


def summarize(sweep_dir) -> List[dict]:
    rows = collect(Path(sweep_dir))
    write(sweep_dir, rows)
    return rows


def jobs(config) -> List[List[str]]:
    """The overrides of each job of a basic sweep (-m), as Hydra's BasicSweeper splits them: the sweep's
    hydra.sweeper.params, then the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


class SummaryCallback(Callback):
    """Hydra callback: check every job's config before the first one trains, and write the summary when a
    multirun ends."""

    def on_multirun_start(self, config, **kwargs) -> None:
        """A bad value in the last job of a long sweep fails now, before the first job trains, not hours later. (A
        search sweeper such as Optuna picks its jobs as it goes: each is checked when it starts.)"""
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return
        from hydra import compose

        from . import config as schema
        from .errors import UserError
        from .resume import holds_run

        failed, every, taken = {}, jobs(config), []  # {message: the jobs it applies to}
        common = set.intersection(*map(set, every))
        for n, job in enumerate(every):
            try:
                cfg = compose(config.hydra.job.config_name, overrides=job)
                if not cfg.resume_from:  # (a resumed job is checked with the settings its checkpoint holds)
                    schema.check(cfg)
            except UserError as e:
                failed.setdefault(str(e), []).append(f"job {n} ({' '.join(o for o in job if o not in common)})")
                continue
            if not cfg.resume_from and holds_run(Path(config.hydra.sweep.dir) / str(n)):
                taken.append(str(n))
        problems = [f"{'every job' if len(names) == len(every) else ', '.join(names)}: {message}"
                    for message, names in failed.items()]
        if taken:  # (Hydra would rewrite their .hydra/ files, and each job would fail)
            problems.append(f"{config.hydra.sweep.dir} already holds the runs of job(s) {', '.join(taken)}. Continue "
                            "the sweep with resume_from=auto (finished jobs stay as they are), or start it in another "
                            "folder (hydra.sweep.dir=...).")
        if problems:
            print("error: the sweep was not started; " + " ".join(problems), file=sys.stderr)
            sys.exit(UserError.exit_code)

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            rows = summarize(sweep_dir)
            print(f"Sweep summary ({len(rows)} jobs): {sweep_dir / 'summary.md'}")
            if (best := rows[0] if rows else None) and best["status"] == "done" and best["best_eval_loss"] is not None:
                print(f"Lowest validation loss: job {best['job']} ({best['overrides'] or 'the only job'}), "
                      f"{best['best_eval_loss']:.4f}. Ask it questions: python -m sft_recipes.chat "
                      f"run_dir={shlex.quote(str(sweep_dir / best['job']))}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m sft_recipes.sweep_report SWEEP_DIR", file=sys.stderr)
        return 2
    rows = summarize(argv[0])
    print(Path(argv[0], "summary.md").read_text())
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
