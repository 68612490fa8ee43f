"""`python -m sft_recipes [overrides]`: the Hydra app that runs one fine-tuning (or a sweep with -m)."""
import shutil
import sys
from pathlib import Path

import hydra

from . import conf_dir, config
from .errors import UserError

config.register()


@hydra.main(config_path=conf_dir(), config_name="train", version_base="1.3")
def main(cfg) -> None:
    from .train import run

    try:
        run(cfg)
    except UserError as e:
        if cfg.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        _remove_if_only_hydra(Path(cfg.output_dir))
        sys.exit(e.exit_code)


def _remove_if_only_hydra(run_dir: Path) -> None:
    """A run that failed before training leaves no run dir behind (Hydra made it, with only its own files)."""
    if run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
