"""The typed config schema and the cross-field checks.

The dataclasses below are registered in Hydra's ConfigStore as `base_config`; `conf/train.yaml` lists it
first in its defaults, so every YAML file and every command-line override is merged into these typed
nodes: a misspelled key or a wrong type fails at compose time with Hydra's own message.
`check(cfg)` then runs the checks that span several fields, before any model is loaded.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from datetime import datetime
from dataclasses import dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, get_origin, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .errors import UserError


@dataclass
class ModelConfig:
    name_or_path: str = MISSING  # hub id or local folder
    embedded: Optional[str] = None  # a pip package that ships this model as GGUF (used when no local folder)
    gguf_file: Optional[str] = None  # the GGUF file inside that package
    dtype: str = "bfloat16"  # weights and compute dtype: bfloat16 | float16 | float32
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | flex_attention
    trust_remote_code: bool = False
    revision: Optional[str] = None
    adapter: Optional[str] = None  # start from this LoRA adapter: a run dir, final_model/ or checkpoint-N


@dataclass
class LoraConfig:
    r: int = 16
    alpha: Optional[int] = None  # None: 2 x r (32 at r=16), so the scale alpha/r stays 2 when r changes
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    bias: str = "none"
    use_rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r (rank-stable with a fixed alpha: set one)
    use_dora: bool = False  # DoRA: weight-decomposed LoRA (a learned magnitude per output; slower steps)
    # any other peft.LoraConfig argument, passed as is: +lora.peft_args.layers_to_transform=[0,1]
    peft_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizationConfig:
    bits: int = 4  # 4 | 8 | 16 (16 = no quantization)
    quant_type: str = "nf4"  # nf4 | fp4 (4-bit only)
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class ColumnsConfig:
    """The names of our fields in the input files (e.g. data.columns.question=prompt for a CSV), or a list of names
    whose texts are joined, one per line ('data.columns.question=[instruction,input]' for Alpaca's records)."""
    question: Any = "question"
    answer: Any = "answer"
    source: Any = "source"


@dataclass
class DataConfig:
    # a file (JSON, JSONL, CSV, TSV, Parquet), a folder (of such files, or a save_to_disk one), a glob, or a list
    train_path: Any = "data/training_data/sft_sample.json"
    # auto: the file beside a single training file named <name>_val<suffix> (sft_sample_val.json here), if there is
    # one; null (or auto without one): split off val_fraction of the training data (0: no validation)
    val_path: Any = "auto"
    val_fraction: float = 0.0
    split_by: str = "record"  # record | source (every record of a source on the same side)
    dedup: bool = True  # drop exact and normalized (case, whitespace, punctuation) duplicates
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 1024
    overlong: str = "truncate"  # truncate (the answer, never the question) | drop | error
    # a chat transcript of several exchanges: all (every reply trains, each after the conversation before it) | each
    # (as all, each reply in a row of its own: the conversation before it rendered as chat sends it, which templates
    # that drop earlier replies' reasoning, Qwen3's, need) | last (its last reply alone; the earlier ones are context)
    train_replies: str = "all"
    cache: bool = True  # reuse prepared (tokenized) data when files, tokenizer and options are unchanged
    template: str = "chat"
    system_prompt: Optional[str] = None  # null: the template's own default
    template_files: List[str] = field(default_factory=list)  # extra YAML files/folders (conf/templates/ is always read)


@dataclass
class TrainConfig:
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    # LoRA+ (PEFT's create_loraplus_optimizer): the B matrices learn at lr x this ratio (16 in the paper), the A
    # matrices at lr; null: one learning rate for both
    loraplus_lr_ratio: Optional[float] = None
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # the library default since torch 2.8 (what plain TRL uses): one fused kernel per step instead of a dozen
    # foreach kernels launched from Python (5 ms of host time per step on a 7B model, BENCHMARKS.md)
    optim: str = "adamw_torch_fused"
    gradient_checkpointing: bool = True
    # Pack whole samples into rows of up to data.max_length tokens (best-fit decreasing) and train without
    # padding; samples never attend to each other (position ids restart per sample; tested). With packing,
    # train.batch_size counts packed rows.
    packing: bool = False
    # Without packing: each batch's samples are laid end to end in one row, with no padding (same samples per
    # step as padded batches, so the same training objective; samples are kept apart the same way).
    padding_free: bool = True
    pad_to_multiple_of: Optional[int] = None  # fewer distinct shapes (for compiled attention kernels)
    # torch.compile each decoder layer in place (one graph, reused by every layer): fuses the elementwise work
    # around the matrix products (norms, rotary, SwiGLU, LoRA scale-and-add, casts) and cuts kernel launches.
    # Costs a compile on the first steps (and for each new batch shape); pays on GPUs (BENCHMARKS.md).
    compile: bool = False
    # passed to torch.compile(options=...): Inductor settings such as {coordinate_descent_tuning: true}
    compile_options: Dict[str, Any] = field(default_factory=dict)
    # How gradient checkpointing meets the compiled layers: traced (torch.compile traces through the checkpoint and
    # recomputes only what the backward needs) | around (the checkpoint replays the whole compiled layer) | auto
    # (traced from torch 2.12, around before; sft_recipes/trainer.py)
    compile_checkpoint: str = "auto"
    # Move what the backward pass keeps (with gradient checkpointing: each layer's input) to pinned CPU memory
    # during the forward and back during the backward, on a side stream that overlaps the compute (TRL's
    # activation offloading). Frees room for bigger batches on one GPU; CUDA only.
    activation_offloading: bool = False
    on_nonfinite: str = "stop"  # a NaN/inf gradient: stop (last good checkpoint kept) | skip (drop that step)
    logging_steps: int = 5
    save_steps: Optional[int] = None  # checkpoint (and validation) interval; null: 50 steps, or a fifth of a shorter run
    save_total_limit: Optional[int] = 3
    eval_steps: int = 0  # 0: evaluate at every save
    # What final_model/ holds: the weights of the last step, or those of the checkpoint with the lowest validation
    # loss (needs validation data, evaluated at every save). Either way the best checkpoint is never rotated away.
    final_model: str = "last"  # last | best
    early_stopping_patience: int = 0  # stop after this many validations in a row without a lower loss (0: never)
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    # any other trl.SFTConfig / TrainingArguments argument, passed as is: +train.sft_args.neftune_noise_alpha=5
    sft_args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    after_train: bool = False  # run `python -m sft_recipes.evaluate` on the run when training ends
    max_new_tokens: int = 256
    limit: int = 0  # evaluate only the first N validation records (0: all)
    samples: int = 0  # after each validation, greedy answers to the first N validation questions (RUN/samples.md)
    repetition_penalty: float = 1.0  # for those answers and after_train's (1: none; 1.1 curbs a small model's loops)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 42
    dry_run: bool = False
    resume_from: Optional[str] = None  # null | auto | a run dir | a checkpoint-N folder
    output_dir: Optional[str] = "${hydra:runtime.output_dir}"  # (null outside a run: --cfg job --resolve)
    debug: bool = False  # show tracebacks for errors we explain


_run_dirs: dict = {}


def run_dir(root: str, resume_from) -> str:
    """hydra.run.dir (and hydra.sweep.dir, with resume_from null): a new timestamped folder under root, or the run
    that resume_from continues in place: for resume_from=auto the newest run there that has a checkpoint (so the same
    command continues the stopped run), for resume_from=RUN (or RUN's newest checkpoint) that run."""
    key = (root, resume_from)
    if key not in _run_dirs:
        from .resume import continued_run, runs_with_checkpoint

        if resume_from == "auto":
            newest = (runs_with_checkpoint(root) or [None])[-1]
        else:
            newest = continued_run(resume_from) if resume_from else None
        started = datetime.now()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process of a launch: the launcher's start time
            import psutil

            started = datetime.fromtimestamp(psutil.Process(os.getppid()).create_time())
        _run_dirs[key] = str(newest) if newest else claim(f"{root}/{started:%Y-%m-%d_%H-%M-%S}")
    return _run_dirs[key]


def claim(path: str) -> str:
    """Make the new run's folder, or `path_2`, `path_3`, ... where another run took it: runs started in the same
    second (a shell loop starting several) each get their own. The processes of one launch share the folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return path
    candidate = path
    for n in range(2, 1000):
        try:
            Path(candidate).mkdir(parents=True)
            return candidate
        except FileExistsError:
            candidate = f"{path}_{n}"
        except OSError:  # (an unwritable folder: the run reports it)
            return candidate
    return candidate


def register() -> None:
    """The schema as `base_config` in Hydra's ConfigStore, and the `sft_run_dir` resolver of conf/train.yaml."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("sft_run_dir", run_dir, replace=True)


# Names other tools use for our settings (TRL's and transformers' script arguments, PEFT's, other trainers'), with the
# setting that holds each here; the TRL names that sft_recipes/build.py sets from the config are known there too
ALIASES = {"max_seq_length": "data.max_length", "sequence_len": "data.max_length", "cutoff_len": "data.max_length",
           "model_name_or_path": "model.name_or_path", "model_name": "model.name_or_path", "torch_dtype": "model.dtype",
           "lora_r": "lora.r", "lora_rank": "lora.r", "lora_target_modules": "lora.target_modules",
           "lora_target": "lora.target_modules", "dataset_name": "data.train_path", "dataset": "data.train_path",
           "train_file": "data.train_path", "validation_file": "data.val_path", "resume_from_checkpoint": "resume_from",
           "bf16": "model.dtype=bfloat16", "fp16": "model.dtype=float16", "load_in_4bit": "quantization=nf4",
           "load_in_8bit": "quantization=int8", "num_epochs": "train.epochs", "micro_batch_size": "train.batch_size",
           "train_data": "data.train_path", "no_4bit": "quantization=none"}  # (the last two: train_sft.py's flags)


@lru_cache(maxsize=None)
def settings(cls=Config, prefix: str = "") -> Dict[str, Any]:
    """Every key of the schema, dotted (train.lr), with its kind: dict for one that takes keys of its own
    (train.sft_args.NAME), list for a list (lora.target_modules), else its type (bool, int, Optional[str], ...)."""
    keys = {}
    for f in fields(cls):
        hint = get_type_hints(cls)[f.name]
        if is_dataclass(hint):
            keys |= settings(hint, f"{prefix}{f.name}.")
        else:
            keys[prefix + f.name] = get_origin(hint) if get_origin(hint) in (dict, list) else hint
    return keys


def is_setting(key: str) -> bool:
    known = settings()
    parts = key.split(".")
    return key in known or any(known.get(".".join(parts[:i])) is dict for i in range(1, len(parts)))


def extra_keys(node, prefix: str = "") -> List[str]:
    """The keys of a composed config that are not settings (what a +key=value override added)."""
    known, extra = settings(), []
    for name in node:
        key = f"{prefix}{name}"
        if key not in known and OmegaConf.is_dict(node.get(name)) and any(k.startswith(f"{key}.") for k in known):
            extra += extra_keys(node.get(name), f"{key}.")
        elif key not in known:
            extra.append(key)
    return extra


def meant(key: str, value: Any) -> List[str]:
    """The settings that `key=value`, a key that the schema lacks, most likely meant (as overrides): the one that
    another tool's name stands for, the ones with its last part (lr: train.lr), or the closest in spelling; else an
    argument of TRL's SFTConfig or PEFT's LoraConfig that the config does not set, passed through as is."""
    from .build import CONFIG_KEYS, LORA_KEYS

    name = key.rsplit(".", 1)[-1]
    known = list(settings())
    theirs = ALIASES | {k: v for k, v in (LORA_KEYS | CONFIG_KEYS).items() if re.fullmatch(r"[a-z_.]+(=\w+)?", v)}
    if key.startswith("data.columns."):  # (it maps our fields to the file's names, not the other way round)
        found = [f"data.columns.question={name}", f"data.columns.answer={name}"]
    else:
        found = ([theirs[name]] if name in theirs else [k for k in known if k.rsplit(".", 1)[-1] == name]
                 or [theirs[n] for n in difflib.get_close_matches(name, list(theirs), n=1, cutoff=0.8)]
                 + difflib.get_close_matches(key, known, n=2, cutoff=0.75))
    found = [m if "=" in m else f"{m}={value}" for m in dict.fromkeys(found)]
    if not found:
        from peft import LoraConfig
        from trl import SFTConfig

        for target, owner in (("train.sft_args", SFTConfig), ("lora.peft_args", LoraConfig)):
            if name in {f.name for f in fields(owner)}:
                return [f"+{target}.{name}={value}"]
    return found[:3]


def not_a_setting(key: str, value: Any, plus: str = "") -> str:
    """What to say of `key=value`, a key that the schema lacks, with the settings it most likely meant."""
    return (f"{plus}{key}={value}: {key} is not a setting"
            + (f" (did you mean {' or '.join(found)}?)" if (found := meant(key, value)) else "")
            + (f"; a {plus} adds a key that nothing reads (except under train.sft_args, lora.peft_args and "
               "train.compile_options)" if plus else "") + ". `python -m sft_recipes --help` lists every setting.")


# Hydra's own command-line flags; any other --flag is another tool's way of setting a value
HYDRA_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--resolve", "--package", "-p", "--run",
               "-r", "--multirun", "-m", "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def check_overrides(argv, groups) -> None:
    """Before Hydra composes: a command-line key that is not a setting (a typo, or another tool's name for one) is
    refused with the ones it most likely meant; Hydra's own message would suggest adding it with +, after which it
    would be read by nothing. `groups`: the config groups (model=..., +experiment=... where a config dir has one)."""
    problems, flags = [], []
    for n, arg in enumerate(argv):
        if arg.startswith("--") and arg.split("=", 1)[0] not in HYDRA_FLAGS:  # (trl sft --learning_rate 1e-4)
            name, sep, value = arg[2:].partition("=")
            if not sep and n + 1 < len(argv) and not argv[n + 1].startswith("-") and "=" not in argv[n + 1]:
                arg, value = f"{arg} {argv[n + 1]}", argv[n + 1]
            key = name.replace("-", "_")
            found = [f"{key}={value or 'VALUE'}"] if is_setting(key) else meant(key, value or "VALUE")
            if not value:  # a flag alone: true for a yes/no setting (--dry-run: dry_run=true)
                found = [f"{f.split('=')[0]}=true" if settings().get(f.split("=")[0]) is bool else f for f in found]
            flags.append(f"{arg} is {' or '.join(found)}" if found else f"{arg} is not a setting")
            continue
        m = re.fullmatch(r"(\+{0,2})([A-Za-z_][\w.]*)=(.*)", arg, re.DOTALL)
        if not m or m[2] == "hydra" or m[2].startswith("hydra.") or m[2] in groups:
            continue
        plus, key, value = m.groups()
        if key == "output_dir":
            problems.append(f"{arg}: a run's folder is chosen with hydra.run.dir={value} (a sweep's with "
                            f"hydra.sweep.dir={value}); output_dir follows it.")
        elif not is_setting(key):
            problems.append(not_a_setting(key, value, plus))
        elif settings().get(key) is list and not re.match(r"\[|null$|\w+\(", value):  # ([a,b], null, choice(...))
            problems.append(f"{arg}: {key} is a list; write {key}=[{value}] (several: '{key}=[a,b]', quoted for the "
                            "shell).")
    if flags:
        problems.insert(0, f"Settings are given as key=value (Hydra's overrides), not as --flags: {'; '.join(flags)}"
                           " (`python -m sft_recipes --help` lists them).")
    if problems:
        raise UserError(" ".join(problems))


DTYPES = ("bfloat16", "float16", "float32")


def recorded(cfg, resolve: bool = True) -> str:
    """The config as YAML without output_dir (where the run is, not what it is; a Hydra interpolation)."""
    return OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "output_dir"]), resolve=resolve)


def report_problems(names) -> list:
    """train.report_to: each name one that transformers knows, with its package installed (else Trainer stops with a
    traceback once the model has loaded)."""
    from transformers.integrations import integration_utils

    known = sorted(integration_utils.INTEGRATION_TO_CALLBACK)
    ready = integration_utils.get_available_reporting_integrations()
    problems = [f"train.report_to: {name} is not one of {', '.join(known)}, none or all." for name in names
                if name not in known]
    if missing := [name for name in names if name in known and name not in ready]:
        problems.append(f"train.report_to: {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                        f"installed here; install {'it' if len(missing) == 1 else 'them'} or leave "
                        f"{'it' if len(missing) == 1 else 'them'} out (train.report_to=[] logs to training_log.txt "
                        "only).")
    return problems


def check(cfg: Config) -> None:
    """Cross-field checks that need no model. Each message names the override that fixes it."""
    problems = [not_a_setting(key, OmegaConf.select(cfg, key)) for key in extra_keys(cfg)]
    if cfg.model.dtype not in DTYPES:
        problems.append(f"model.dtype={cfg.model.dtype} is not one of {', '.join(DTYPES)}.")
    q = cfg.quantization
    if q.bits not in (4, 8, 16):
        problems.append(f"quantization.bits={q.bits} must be 4, 8 or 16 (use quantization=nf4|int8|none).")
    if q.bits == 4 and q.quant_type not in ("nf4", "fp4"):
        problems.append(f"quantization.quant_type={q.quant_type} must be nf4 or fp4.")
    if q.compute_dtype not in DTYPES:
        problems.append(f"quantization.compute_dtype={q.compute_dtype} is not one of {', '.join(DTYPES)}.")
    if q.bits in (4, 8) and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("quantization needs the bitsandbytes package: pip install bitsandbytes, "
                        "or train in full precision with quantization=none.")
    if cfg.lora.r <= 0 or (cfg.lora.alpha is not None and cfg.lora.alpha <= 0):
        problems.append("lora.r and lora.alpha must be positive.")
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout={cfg.lora.dropout} must be in [0, 1).")
    if cfg.lora.bias not in ("none", "all", "lora_only"):
        problems.append(f"lora.bias={cfg.lora.bias} must be none, all or lora_only.")
    if any(m in ("lm_head", "embed_tokens") for m in cfg.lora.target_modules):
        problems.append("LoRA on lm_head/embed_tokens is not supported by PEFT with TRL; "
                        "remove it from lora.target_modules (e.g. lora=default or lora=all_linear).")
    if cfg.model.adapter and cfg.lora.peft_args:
        problems.append("lora.peft_args has no effect with model.adapter: the adapter's own LoRA settings train.")
    t = cfg.train
    for name in ("batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit"):
        if getattr(t, name) is not None and getattr(t, name) <= 0:
            problems.append(f"train.{name}={getattr(t, name)} must be positive"
                            + (" (null keeps every checkpoint)." if name == "save_total_limit" else "."))
    if t.pad_to_multiple_of is not None and t.pad_to_multiple_of <= 0:
        problems.append(f"train.pad_to_multiple_of={t.pad_to_multiple_of} must be positive (null: no rounding).")
    if t.eval_steps < 0:
        problems.append(f"train.eval_steps={t.eval_steps} must be 0 (validate at every save) or positive.")
    if not 0 <= t.warmup_ratio < 1:  # (transformers reads a warmup of 1 or more as a number of steps)
        problems.append(f"train.warmup_ratio={t.warmup_ratio} is a share of the optimizer steps: it must be in [0, 1).")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay={t.weight_decay} must be 0 or positive.")
    if not 0 <= cfg.seed < 2**32:  # (numpy's seeds)
        problems.append(f"seed={cfg.seed} must be between 0 and {2**32 - 1}.")
    if t.compile_options and not t.compile:
        problems.append("train.compile_options only apply with train.compile=true.")
    if t.compile_checkpoint not in ("auto", "traced", "around"):
        problems.append(f"train.compile_checkpoint={t.compile_checkpoint} must be auto, traced or around.")
    if t.final_model not in ("last", "best"):
        problems.append(f"train.final_model={t.final_model} must be last or best.")
    if t.early_stopping_patience < 0:
        problems.append(f"train.early_stopping_patience={t.early_stopping_patience} must be 0 (off) or positive.")
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    for key, name, names in (("train.optim", t.optim, OptimizerNames), ("train.scheduler", t.scheduler, SchedulerType)):
        if name not in (known := [n.value for n in names]):
            close = difflib.get_close_matches(name, known, n=3)
            problems.append(f"{key}={name} is not {'an optimizer' if key == 'train.optim' else 'a schedule'} "
                            "transformers knows"
                            + (f" (did you mean {' or '.join(close)}?)." if close else f": {', '.join(known)}."))
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = cfg.model.attn_implementation  # (a name with a "/" is a kernel from the hub)
    if "/" not in attn and attn not in (known := ["eager", *(k for k in ALL_ATTENTION_FUNCTIONS if "|" not in k)]):
        problems.append(f"model.attn_implementation={attn} is not one of {', '.join(known)}.")
    if report := [name for name in t.report_to if name not in ("none", "all")]:
        problems += report_problems(report)
    wants = [k for k, on in (("train.final_model=best", t.final_model == "best"),
                             (f"train.early_stopping_patience={t.early_stopping_patience}",
                              t.early_stopping_patience > 0),
                             ("eval.after_train=true", cfg.eval.after_train),
                             (f"eval.samples={cfg.eval.samples}", cfg.eval.samples > 0)) if on]
    from .data import data_specs, expand

    val_spec = data_specs(cfg.data.train_path, cfg.data.val_path)[1]
    if wants and val_spec is None and cfg.data.val_fraction <= 0:
        problems.append(f"{' and '.join(wants)} need{'s' if len(wants) == 1 else ''} validation data: set "
                        "data.val_path=FILE, or data.val_fraction=0.1 (a share of the training data).")
    if cfg.eval.max_new_tokens <= 0 or cfg.eval.limit < 0:
        problems.append(f"eval.max_new_tokens={cfg.eval.max_new_tokens} must be positive and eval.limit="
                        f"{cfg.eval.limit} 0 (all) or positive.")
    if cfg.eval.repetition_penalty <= 0:
        problems.append(f"eval.repetition_penalty={cfg.eval.repetition_penalty} must be positive (1: none).")
    if cfg.eval.samples < 0:
        problems.append(f"eval.samples={cfg.eval.samples} must be 0 (off) or positive.")
    elif cfg.eval.samples and t.compile:
        problems.append("eval.samples generates answers during training, which would recompile the compiled "
                        "layers for every new length: set train.compile=false, or eval.samples=0.")
    elif cfg.eval.samples and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("eval.samples generates in one process only; set eval.samples=0 for a multi-process run "
                        "(python -m sft_recipes.evaluate runs after it).")
    if t.final_model == "best" and t.eval_steps not in (0, t.save_steps):
        problems.append("train.final_model=best picks among the checkpoints, so it validates at every save: set "
                        "train.eval_steps=0 (validation at every train.save_steps).")
    if t.on_nonfinite not in ("stop", "skip"):
        problems.append(f"train.on_nonfinite={t.on_nonfinite} must be stop or skip.")
    if t.lr <= 0:
        problems.append(f"train.lr={t.lr} must be positive.")
    if t.loraplus_lr_ratio is not None and t.loraplus_lr_ratio <= 0:
        problems.append(f"train.loraplus_lr_ratio={t.loraplus_lr_ratio} must be positive (null: off).")
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append("set train.epochs > 0 or train.max_steps > 0.")
    d = cfg.data
    if d.max_length < 16:
        problems.append(f"data.max_length={d.max_length} is too small (at least 16).")
    if d.overlong not in ("truncate", "drop", "error"):
        problems.append(f"data.overlong={d.overlong} must be truncate, drop or error.")
    if d.train_replies not in ("all", "each", "last"):
        problems.append(f"data.train_replies={d.train_replies} must be all (every reply of a conversation), each "
                        "(every reply, in a row of its own) or last.")
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction={d.val_fraction} must be in [0, 1).")
    if d.split_by not in ("record", "source"):
        problems.append(f"data.split_by={d.split_by} must be record or source.")
    for key, names in d.columns.items():
        names = OmegaConf.to_container(names) if OmegaConf.is_list(names) else names
        if not (isinstance(names, str) and names or isinstance(names, list) and names
                and all(isinstance(n, str) and n for n in names)):
            problems.append(f"data.columns.{key}={names} must be a field name, or a list of names whose texts "
                            f"are joined ('data.columns.{key}=[a,b]').")
    for key, spec in (("train_path", d.train_path), ("val_path", val_spec)):
        if spec is None and key == "val_path":
            continue
        if not isinstance(spec, str) and not (OmegaConf.is_list(spec) or isinstance(spec, list)):
            problems.append(f"data.{key} must be a path, a glob or a list of them.")
            continue
        try:
            expand(list(spec) if not isinstance(spec, str) else spec)
        except UserError as e:
            fix = (" Set data.val_path=null to split off data.val_fraction of the training data instead."
                   if key == "val_path" else " That is the default, the sample data in a clone of sft-recipes: give "
                   "your own with data.train_path=FILE." if spec == DataConfig.train_path else "")
            problems.append(f"data.{key}: {e} Relative paths start from {os.getcwd()}.{fix}")
    if cfg.resume_from not in (None, "auto") and not Path(cfg.resume_from).is_dir():
        problems.append(f"resume_from={cfg.resume_from} is not a folder: give a run dir or one of its checkpoint-N "
                        "folders, or use resume_from=auto for the newest run under outputs/.")
    import torch

    machine = []  # what this machine cannot run: a dry run (planning a GPU run elsewhere) only warns
    if cfg.train.activation_offloading and not torch.cuda.is_available():
        machine.append("train.activation_offloading=true needs a CUDA GPU (it copies activations to pinned CPU "
                       "memory on a CUDA stream): set train.activation_offloading=false "
                       "(or a preset other than gpu_fast).")
    if cfg.model.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        machine.append("flex attention has no backward pass on the CPU: use model.attn_implementation=sdpa "
                       "(or a preset other than gpu_fast).")
    flash = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    if (package := flash.get(cfg.model.attn_implementation)) and (
            not torch.cuda.is_available() or importlib.util.find_spec(package) is None):
        machine.append(f"model.attn_implementation={cfg.model.attn_implementation} needs a CUDA GPU and the "
                       f"{package} package: use model.attn_implementation=sdpa (the default).")
    if torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        machine.append(f"{torch.cuda.device_count()} GPUs are visible but this is a single-process run: "
                       "launch with `accelerate launch -m sft_recipes ...`, or pick one GPU with CUDA_VISIBLE_DEVICES=0.")
    if cfg.dry_run and not problems:
        for line in machine:
            print(f"warning: not on this machine: {line}")
    elif problems or machine:
        raise UserError("Invalid configuration: " + " ".join(problems + machine))
