"""sft-recipes: supervised fine-tuning (LoRA / 4-bit QLoRA) of a language model on question/answer data."""
import logging
import os
from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> str:
    """The Hydra config tree: $SFT_RECIPES_CONF, else conf/ beside the package (a source checkout, an editable
    install), else the copy that a wheel installs inside it (sft_recipes/conf)."""
    here = Path(__file__).resolve().parent
    beside = here.parent / "conf"
    return os.environ.get("SFT_RECIPES_CONF") or str(beside if (beside / "train.yaml").exists() else here / "conf")


class _DropNoise(logging.Filter):
    """bitsandbytes tries to fetch an optional CPU kernel from a hub and warns when it cannot; its own
    built-in CPU path is used instead, and the user can do nothing about it, so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def terminal() -> bool:
    """Whether progress bars go to a terminal; into a file (a Slurm or nohup log, a pipe) they are lines instead."""
    import sys

    return sys.stderr.isatty()


def quiet_logs() -> None:
    import warnings

    if not terminal():  # transformers' "Loading weights" bar: a carriage-return line per update in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes"):
        logging.getLogger(name).addFilter(_DropNoise())


quiet_logs()
