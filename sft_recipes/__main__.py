"""`python -m sft_recipes [overrides]`: the Hydra app that runs one fine-tuning (or a sweep with -m)."""
import sys

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
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
