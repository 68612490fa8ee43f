"""`python -m sft_recipes [overrides]`: the Hydra app that runs one fine-tuning (or a sweep with -m)."""
import sys
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import OmegaConf

from . import conf_dir, config
from .errors import UserError

_run_dirs = {}


def run_dir(root: str, resume_from) -> str:
    """hydra.run.dir: a new timestamped folder under root, or, for resume_from=auto, the newest run there
    that has a checkpoint (so the same command continues the stopped run in place)."""
    key = (root, resume_from)
    if key not in _run_dirs:
        from .train import last_checkpoint

        runs = [p for p in Path(root).glob("*") if p.is_dir() and last_checkpoint(p)] if resume_from == "auto" else []
        newest = max(runs, key=lambda p: p.stat().st_mtime, default=None)
        _run_dirs[key] = str(newest) if newest else f"{root}/{datetime.now():%Y-%m-%d_%H-%M-%S}"
    return _run_dirs[key]


config.register()
OmegaConf.register_new_resolver("sft_run_dir", run_dir, replace=True)


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg) -> None:
    from .train import run

    try:
        run(cfg)
    except UserError as e:
        if cfg.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
