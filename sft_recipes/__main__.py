"""`python -m sft_recipes [overrides]`: the Hydra app that runs one fine-tuning (or a sweep with -m)."""
import os
import re
import shutil
import sys
from pathlib import Path

import hydra

from . import conf_dir, config
from .errors import UserError

config.register()
_task_started = False
_failed_jobs = []  # a sweep's jobs that ended with an error (the sweep goes on; the command's exit status says so)
_hydra_files = {}  # a resumed run's .hydra/ files before Hydra rewrites them, put back if the run is refused


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg):
    """One run; returns its best validation loss (what a search sweeper such as Optuna minimizes)."""
    global _task_started
    _task_started = True
    import json

    from hydra.core.hydra_config import HydraConfig

    from .train import in_sweep, run

    if HydraConfig.get().job.chdir:  # hydra.job.chdir=true: paths stay the user's (every file goes to cfg.output_dir)
        os.chdir(hydra.utils.get_original_cwd())

    try:
        metrics_file = Path(cfg.output_dir) / "metrics.json"
        if run(cfg) is not None and metrics_file.exists():  # (other processes of a launch write nothing)
            metrics = json.loads(metrics_file.read_text())
            return metrics["best_eval_loss"] if metrics["best_eval_loss"] is not None else metrics["final_train_loss"]
    except UserError as e:
        if cfg.debug:
            raise
        print(f"error: {e}" if e.exit_code else str(e), file=sys.stderr if e.exit_code else sys.stdout)
        if in_sweep():  # the other jobs still run; the summary lists a failed one with its error
            if e.exit_code:
                (Path(cfg.output_dir) / "error.txt").write_text(f"{e}\n")
                _failed_jobs.append(cfg.output_dir)
            return None
        _leave_as_found(Path(cfg.output_dir))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # a Ctrl-C before training (during training the first one saves and stops: Guard)
        if cfg.debug:
            raise
        stopped(Path(cfg.output_dir))
    except Exception:  # a crash: the traceback, with the resumed run's .hydra/ files as they were
        if not in_sweep():
            _leave_as_found(Path(cfg.output_dir))
        raise


def stopped(out: Path) -> None:
    """Ctrl-C outside the training steps: one line on what is kept, no traceback, exit status 130."""
    from .train import what_is_kept

    _leave_as_found(out)
    if not out.is_dir():
        print("Stopped by Ctrl-C before training; nothing was written.", file=sys.stderr)
    else:
        print(f"Stopped by Ctrl-C. {what_is_kept(out)}", file=sys.stderr)
    sys.exit(130)


def _leave_as_found(run_dir: Path) -> None:
    """A run that stopped before training: a resumed run's .hydra/ files as they were, and no run dir left behind
    for a new one (Hydra made it, with only its own files)."""
    for path, content in _hydra_files.items():
        path.write_bytes(content)
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent  # outputs/, when made for this run alone (not a folder of the user's, a mount point)
        if parent.resolve() == Path("outputs").resolve() and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def precheck(argv) -> None:
    """Before Hydra writes into the run dir (it rewrites .hydra/ there): refuse a folder that already holds a
    run unless resuming (a dry run too), and one that cannot be written."""
    from .resume import hold, refuse_finished

    value = lambda key: next((a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")), None)  # noqa: E731
    resuming = value("resume_from") not in (None, "null")
    dry_run = (value("dry_run") or "").lower() in ("true", "yes", "on")
    if resuming and dry_run:
        raise UserError("dry_run=true plans a new run; it does not combine with resume_from (a resumed run continues "
                        "with the settings its checkpoint holds): drop one of them.")
    if "-m" in argv or "--multirun" in argv or os.environ.get("RANK", "0") != "0":
        return  # (a sweep checks its jobs itself; other processes of a launch leave this to the main one)
    run_dir = value("hydra.run.dir")
    if run_dir is None and resuming:  # what hydra.run.dir resolves to (conf/train.yaml): a new run's folder is made
        run_dir = config.run_dir("outputs", value("resume_from"))
    if run_dir is None:
        return
    if resuming:
        _hydra_files.update({p: p.read_bytes() for p in (Path(run_dir) / ".hydra").glob("*.yaml")})
    else:
        refuse_finished(Path(run_dir), dry_run)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(run_dir) / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write to the run dir {run_dir} ({e.strerror}); choose another hydra.run.dir.") from None
    if not dry_run:
        hold(Path(run_dir))


def groups(argv) -> set:
    """The config groups: the folders of conf/ and of a --config-dir (model=..., or a user's +experiment=...)."""
    dirs = [conf_dir(), *(b for a, b in zip(argv, argv[1:]) if a in ("--config-dir", "-cd")),
            *(a.split("=", 1)[1] for a in argv if a.startswith("--config-dir="))]
    return {p.name for d in dirs if Path(d).is_dir() for p in Path(d).iterdir() if p.is_dir()}


def cli() -> None:
    """The console entry point: config errors (Hydra's, before the run starts) exit with status 2 like ours."""
    argv = sys.argv[1:]
    if "debug=true" in argv:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if os.environ.get("RANK", "0") != "0":  # the other processes of a launch: the main one reports (errors still do)
        sys.stdout = open(os.devnull, "w")
    try:
        if home := next((a for a in argv if re.match(r"[\w.+]+=~", a)), None):  # (Hydra's message: a lexer's)
            key, value = home.split("=", 1)
            raise UserError(f"{home}: Hydra reads a ~ at the start of a value as its own syntax, and no shell "
                            f"expands it there; write {key}=$HOME{value[1:]} (or quote it: \"{key}='{value}'\").")
        config.check_overrides(argv, groups(argv))
        precheck(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _task_started:
            sys.exit(UserError.exit_code)
        raise
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} sweep job(s) failed: " + ", ".join(_failed_jobs)
              + " (each holds its error.txt)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    cli()
