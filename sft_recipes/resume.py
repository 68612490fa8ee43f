"""Runs that stop and go on: finding the last complete checkpoint, refusing to write over a finished run, and
resuming with the settings the checkpoint was trained with (each checkpoint holds them in run_config.yaml)."""
from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import OmegaConf

from . import config
from .errors import UserError

# Light on imports (no torch): the CLI checks a run dir with these before Hydra starts.
COMPLETE = "COMPLETE"  # written last into a checkpoint or final_model folder, before it is renamed into place
RUN_CONFIG = "run_config.yaml"  # in each checkpoint: the config it was trained with (a resumed run keeps it)
DATA_DIGEST = "data.sha256"  # in each checkpoint: prepare.data_digest of the data files it was trained on
OVERRIDES = "overrides.yaml"  # in each checkpoint: the overrides that made the run (a resume's .hydra keeps them)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(run_dir: Path, warn: bool = False) -> Optional[Path]:
    """The newest complete checkpoint-N folder of a run dir (one with its completion marker)."""
    found = []
    for p in Path(run_dir).glob("checkpoint-*"):
        if not (m := CHECKPOINT.match(p.name)):
            continue
        if (p / COMPLETE).exists():
            found.append((int(m.group(1)), p))
        elif warn:
            print(f"warning: ignoring {p}: it has no {COMPLETE} marker (a save that was cut short)")
    return max(found)[1] if found else None


def runs_with_checkpoint(root) -> List[Path]:
    """The run dirs under root that hold a complete checkpoint, oldest first (the last is what resume_from=auto
    continues)."""
    runs = [p for p in Path(root).glob("*") if p.is_dir() and last_checkpoint(p)]
    return sorted(runs, key=lambda p: p.stat().st_mtime)


def holds_run(run_dir: Path) -> bool:
    """Whether a folder already holds a training run's results: a checkpoint or the final model. (A run that stopped
    before its first checkpoint left none: its command starts it again there, its log going on. One that is still
    training there is refused by its lock, `hold`.)"""
    d = Path(run_dir)
    return (d / "final_model").exists() or any(d.glob("checkpoint-*"))


def refuse_finished(run_dir: Path, dry_run: bool = False) -> None:
    """A new run (or a dry run, which writes its report and .hydra/ there) never writes into a folder that already
    holds one."""
    if holds_run(run_dir):
        raise UserError(f"{run_dir} already holds a run; nothing was changed. " + (
            "A dry run writes its report and config there: give it another folder (hydra.run.dir=...), or none."
            if dry_run else "Continue it with resume_from=auto, or start a new one in another folder "
            "(hydra.run.dir=...)."))


_held = {}  # run dir -> the open folder this process holds locked


def hold(run_dir: Path) -> None:
    """One process trains in a run dir at a time (a resume started while the run still trains would write the same
    checkpoints): an exclusive lock on the folder for the rest of this process's life, lifted by the system however
    the process ends. Where the file system has no locks, nothing is checked."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return
    key = os.path.realpath(run_dir)
    if key in _held:
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise UserError(f"{run_dir} is in use: another process is training in it; nothing was changed. Wait for "
                            "it to end, or stop it (Ctrl-C saves a checkpoint), then continue with resume_from=auto."
                            ) from None
        return
    _held[key] = fd


@contextlib.contextmanager
def holding(run_dir: Path):
    """hold(run_dir) while the block runs (a sweep's process moves on to other run dirs)."""
    hold(run_dir)
    try:
        yield
    finally:
        if (fd := _held.pop(os.path.realpath(run_dir), None)) is not None:
            os.close(fd)


def finished(run_dir: Path, checkpoint: Path, steps: int) -> bool:
    """Whether resuming from `checkpoint` has nothing left to do: the run wrote final_model/ and metrics.json at that
    checkpoint's step, and this command plans no more steps than it did (a run stopped early stays stopped)."""
    metrics = Path(run_dir) / "metrics.json"
    if not (metrics.exists() and (Path(run_dir) / "final_model" / COMPLETE).exists()):
        return False
    m = json.loads(metrics.read_text())
    step = int(CHECKPOINT.match(checkpoint.name).group(1))
    return m.get("global_step") == step and steps <= m.get("max_steps", step)


# What a resumed run may set to new values: how long it runs, what it logs and saves, how it computes (not what).
MAY_CHANGE_ON_RESUME = {
    "train.epochs", "train.max_steps", "train.logging_steps", "train.save_steps", "train.save_total_limit",
    "train.eval_steps", "train.report_to", "train.on_nonfinite", "train.early_stopping_patience", "train.final_model",
    "train.compile", "train.compile_options", "train.compile_checkpoint", "train.activation_offloading",
    "train.gradient_checkpointing", "model.attn_implementation", "data.cache", "eval"}
NOT_KEPT = ("resume_from", "dry_run", "debug")  # about this command, not about the run
PATH_KEYS = ("data.train_path", "data.val_path", "data.template_files", "model.name_or_path", "model.adapter")


def each_path(value, fn):
    """fn applied to a path, or to each path of a list; anything else (null) as it is."""
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return [each_path(v, fn) for v in value]
    return fn(value) if isinstance(value, str) else value


def map_paths(cfg, fn) -> None:
    """fn applied to every path the config names (PATH_KEYS: data and template files, the model folder, an adapter)."""
    for key in PATH_KEYS:
        if (v := OmegaConf.select(cfg, key)) is not None:
            OmegaConf.update(cfg, key, each_path(v, fn), merge=False)


def absolute(path: str) -> str:
    """A relative path that exists from here, made absolute; any other as it is."""
    return os.path.abspath(path) if not os.path.isabs(path) and glob.glob(path) else path


def expand_home(cfg) -> None:
    """A path that starts with ~ ('~/qa.json', quoted on the command line) means the home folder, as in a shell."""
    map_paths(cfg, os.path.expanduser)


def run_config(cfg) -> str:
    """RUN_CONFIG's text: the config with its relative paths that exist here (data files, a model folder) made
    absolute, so that a resume from another folder trains on the same files."""
    cfg = copy.deepcopy(cfg)
    map_paths(cfg, absolute)
    return config.recorded(cfg)


def data_changed(checkpoint: Path, digest: str) -> Optional[str]:
    """A warning when the data files' contents differ from those the checkpoint was trained on (same paths, other
    records: a fix, say); the resumed run goes on with the new ones."""
    saved = checkpoint / DATA_DIGEST
    if not saved.exists() or saved.read_text().strip() == digest:
        return None
    return (f"the data files changed since {checkpoint.name} was saved: the run goes on with their records as they are "
            "now, in a new order (this epoch may repeat some and leave out others); to train on them from the start, "
            f"start a new run with model.adapter={checkpoint}")


def settings(plain: dict) -> dict:
    """A config (as plain YAML data) as {"group.key": value}."""
    flat = {}
    for group, value in plain.items():
        if group not in NOT_KEPT:
            flat.update({f"{group}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {group: value})
    return flat


def keep_trained_settings(cfg, checkpoint: Path):
    """A resumed run continues with the settings its checkpoint was trained with (RUN_CONFIG): `resume_from=auto`
    alone continues a run made with any overrides. On the command line it may set what MAY_CHANGE_ON_RESUME names
    (e.g. train.max_steps to train longer); another value for anything else is refused, since the checkpoint's
    adapter, optimizer state and data order belong to the old one. Called without Hydra's command line (the compose
    API), it keeps only what may not change."""
    from hydra.core.hydra_config import HydraConfig

    if not (checkpoint / RUN_CONFIG).exists():  # a checkpoint from before this file: resumed as configured
        return cfg
    saved = settings(yaml.safe_load((checkpoint / RUN_CONFIG).read_text()))
    saved.update({k: each_path(saved[k], absolute) for k in PATH_KEYS if k in saved})  # (kept relative before)
    now = settings(yaml.safe_load(run_config(cfg)))  # (data.train_path=qa.json is the file the run saved absolute)
    changed = {k: v for k, v in saved.items() if k in now and now[k] != v}
    may_change = lambda k: k in MAY_CHANGE_ON_RESUME or k.split(".")[0] in MAY_CHANGE_ON_RESUME  # noqa: E731
    set_here = set_on_command_line if HydraConfig.initialized() else may_change
    if clash := [k for k in changed if set_here(k) and not may_change(k)]:
        raise UserError(f"{checkpoint} was trained with " + ", ".join(f"{k}={value(changed[k])}" for k in clash)
                        + "; this command sets " + ", ".join(f"{k}={value(now[k])}" for k in clash) + ". A resumed "
                        "run keeps the settings it was trained with (it may change how long it runs, logging, saving, "
                        "validation and compilation): drop the override, or start a new run without resume_from (with "
                        f"model.adapter={checkpoint} it starts from this checkpoint's adapter).")
    if kept := {k: v for k, v in changed.items() if not set_here(k)}:
        for k, v in kept.items():  # a typed group of keys (data.columns) takes the saved values; a dict is replaced
            node = OmegaConf.select(cfg, k)
            OmegaConf.update(cfg, k, v, merge=OmegaConf.is_dict(node) and OmegaConf.get_type(node) is not dict)
        print("Resuming with the settings the run was trained with: "
              + ", ".join(f"{k}={value(v)}" for k, v in kept.items()))
        if HydraConfig.initialized() and os.environ.get("RANK", "0") == "0":
            hydra = HydraConfig.get()  # Hydra rewrote the run's config.yaml, which evaluate/chat/merge read
            if hydra.output_subdir:
                OmegaConf.save(cfg, Path(hydra.runtime.output_dir) / hydra.output_subdir / "config.yaml")
    return cfg


def override_key(override: str) -> str:
    """The key a command-line override sets ("+train.sft_args.x=1": "train.sft_args.x"; "lora=all_linear": "lora")."""
    return override.split("=")[0].lstrip("+~")


def run_overrides(checkpoint: Optional[Path]) -> list:
    """The command-line overrides that made this run: on resume those its checkpoint saved (OVERRIDES), then what
    this command changes (train.max_steps=16), not resume_from. Hydra wrote this command's alone into the run's
    .hydra/overrides.yaml, which a resume puts right (the record that sweep_report's table shows)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    hydra = HydraConfig.get()
    now = [o for o in hydra.overrides.task if override_key(o) != "resume_from"]
    saved = checkpoint / OVERRIDES if checkpoint else None
    if not (saved and saved.exists()):
        return now
    given = {override_key(o) for o in now}
    kept = [o for o in yaml.safe_load(saved.read_text()) or [] if override_key(o) not in given] + now
    if hydra.output_subdir and os.environ.get("RANK", "0") == "0" and kept != list(hydra.overrides.task):
        (Path(hydra.runtime.output_dir) / hydra.output_subdir / "overrides.yaml").write_text(yaml.safe_dump(kept))
    return kept


def set_on_command_line(key: str) -> bool:
    """Whether this command's overrides set `key` ("group.name"): by name, or by choosing its group (model=, lora=,
    quantization=; preset= sets train.* and data.*). False outside Hydra's command line (the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    given = {override_key(o) for o in HydraConfig.get().overrides.task}
    group = key.split(".")[0]
    return (key in given or group in given or any(g.startswith(f"{key}.") for g in given)  # data.columns.question=
            or ("preset" in given and group in ("train", "data")))


def value(v) -> str:
    """A value as an override writes it (null, true, [a,b])."""
    return v if isinstance(v, str) else json.dumps(v)


def checkpoint_of(path) -> Optional[Path]:
    """What resume_from=PATH resumes from: PATH when it is a complete checkpoint, else the newest complete checkpoint
    of the run dir PATH (or of RUN, for RUN/final_model)."""
    path = Path(path)
    if (path / COMPLETE).exists() and (path / "trainer_state.json").exists():
        return path
    return last_checkpoint(path.parent if path.name == "final_model" else path)


def continued_run(path) -> Optional[Path]:
    """The run dir that resume_from=PATH continues in place: the run of PATH's checkpoint when that is the run's
    newest. None for an older checkpoint: it continues in a new run dir, so the run's later steps stay as they are."""
    checkpoint = checkpoint_of(path)
    return checkpoint.parent if checkpoint and last_checkpoint(checkpoint.parent) == checkpoint else None


def resume_point(cfg, out: Path) -> Optional[Path]:
    """The checkpoint this run continues (resume_from), or None for a new run (refused in a folder holding one)."""
    if not cfg.resume_from:
        if os.environ.get("RANK", "0") == "0":
            refuse_finished(out)
        return None
    if cfg.resume_from == "auto":
        checkpoint = last_checkpoint(out, warn=True)
        print(f"Resuming from {checkpoint}" if checkpoint else f"resume_from=auto: no checkpoint in {out}, "
              "starting from step 0")
        return checkpoint
    checkpoint = checkpoint_of(cfg.resume_from)
    if not checkpoint:
        last_checkpoint(Path(cfg.resume_from), warn=True)  # names the folders that were cut short, if any
        held = runs_with_checkpoint(cfg.resume_from)
        raise UserError(f"resume_from={cfg.resume_from} is neither a complete checkpoint (a checkpoint-N folder with "
                        f"its {COMPLETE} marker) nor a run dir holding one."
                        + (f" It holds {len(held)} run(s) that do: give one, e.g. the newest: resume_from="
                           f"{held[-1]}" + (" (or resume_from=auto)." if Path(cfg.resume_from).name == "outputs"
                                                   else ".") if held else ""))
    if checkpoint.parent.resolve() == out.resolve():
        print(f"Resuming from {checkpoint}")
    else:
        print(f"Resuming from {checkpoint} in a new run dir, {out}; {checkpoint.parent} stays as it is"
              + (f" (its newest checkpoint is {newest.name})" if (newest := last_checkpoint(checkpoint.parent))
                 and newest != checkpoint else ""))
    return checkpoint
