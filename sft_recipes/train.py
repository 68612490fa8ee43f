"""One fine-tuning run, top to bottom: check, data, tokenizer, model, trainer, train, save, report."""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Optional

import yaml
from omegaconf import OmegaConf

from . import build, card, conf_dir, config, estimate, models, prepare, report, templates, terminal
from .errors import NothingToDo, UserError, no_space
from .resume import (DATA_DIGEST, OVERRIDES, RUN_CONFIG, data_changed, expand_home, finished, holding,
                     keep_trained_settings, last_checkpoint, refuse_finished, resume_point, run_config, run_overrides,
                     set_on_command_line, value)
from .trainer import NonFiniteError, publish


def oom_advice(cfg) -> str:
    """Concrete overrides that lower GPU memory for this run."""
    t, tips = cfg.train, []
    if t.batch_size > 1:
        tips.append(f"train.batch_size={t.batch_size // 2} train.grad_accum={t.grad_accum * 2} (same samples per step)")
    if cfg.data.max_length > 256:
        tips.append(f"data.max_length={cfg.data.max_length // 2} (the dry run shows how many records that truncates)")
    if cfg.quantization.bits != 4:
        tips.append("quantization=nf4 (4-bit weights)")
    if not t.gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true")
    tips.append("preset=low_memory")
    return "; ".join(tips)


@contextlib.contextmanager
def room_to_save(out: Path, trainer, checkpoint_size: int):
    """A save that finds the disk full: the partly written folder removed, one paragraph on what is kept and how
    to continue (instead of safetensors' or torch's traceback)."""
    try:
        yield
    except Exception as e:
        if not no_space(e):
            raise
        shutil.rmtree(out / ".staging", ignore_errors=True)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise UserError(f"No space left to save step {trainer.state.global_step} in {out} ({reason}); the partly "
                        f"written save was removed. A checkpoint of this run takes about "
                        f"{checkpoint_size / 2**20:,.1f} MB: free space, or keep fewer (train.save_total_limit=1). "
                        f"{what_is_kept(out)}") from None


def what_is_kept(out: Path) -> str:
    """After a run failed in training: its last complete checkpoint and the command that continues from it. With
    none, its own command starts it again (resume_from=auto would start from step 0 without the run's settings, which
    only a checkpoint holds)."""
    if (last := last_checkpoint(out)) or in_sweep():
        return f"The last complete checkpoint is {last or 'none yet'}. {continue_command(out)}"
    return "Nothing of the run is kept (no checkpoint yet): its command starts it again."


def in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def template_of(cfg) -> templates.Template:
    return templates.get(cfg.data.template, [str(Path(conf_dir()) / "templates"), *cfg.data.template_files])


def data_options(cfg) -> prepare.Options:
    d = cfg.data
    return prepare.Options(max_length=d.max_length, overlong=d.overlong, train_replies=d.train_replies, dedup=d.dedup,
                           val_fraction=d.val_fraction, split_by=d.split_by, seed=cfg.seed,
                           system_prompt=d.system_prompt, columns=OmegaConf.to_container(d.columns),
                           cache_dir=str(models.cache_root() / "data") if d.cache else None)


def data_paths(cfg):
    """(train spec, validation spec) as plain strings or lists; data.val_path=auto resolved (data.data_specs)."""
    from .data import data_specs

    plain = lambda spec: spec if spec is None or isinstance(spec, str) else list(spec)  # noqa: E731
    return data_specs(plain(cfg.data.train_path), plain(cfg.data.val_path))


def prepare_data(cfg, tokenizer) -> prepare.Prepared:
    """Load, validate, deduplicate, split and tokenize the data (see sft_recipes.prepare)."""
    template = template_of(cfg)
    template.apply_to(tokenizer)
    return prepare.prepare(*data_paths(cfg), tokenizer, template, data_options(cfg))


def adapter_leaks(cfg, data: prepare.Prepared) -> list:
    """With model.adapter: a warning when validation questions trained that adapter (or the ones it came from)."""
    from . import runs
    from .data import overlap

    if not (cfg.model.adapter and data.val_stats and (earlier := runs.ancestors(cfg))):
        return []
    val = prepare.load_and_split(*data_paths(cfg), data_options(cfg))[1]
    if not (seen := overlap([r for a in earlier for r in runs.training_records(a)], val)):
        return []
    return [f"{len(seen)} validation question(s) trained the adapter this run starts from (model.adapter="
            f"{cfg.model.adapter}; e.g. {seen[0].where}): the validation loss will be optimistic"]


# Fewer optimizer steps than this rarely take LoRA far from the base: on the sample data (112 records)
# preset=low_memory lora.r=32 reached a validation loss of 2.19 in 21 steps, 1.93 in 84 and 1.88 in 336
# (train.grad_accum 16, 4, 1; 4 to 5 1/2 minutes each on 2 CPU cores). README: "Few optimizer steps".
MIN_STEPS = 50


def within_context(cfg, model_path: str, data: prepare.Prepared) -> None:
    """Refuse samples longer than the positions the model was trained on (packed samples restart at position 0)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code).get_text_config()
    context = getattr(text, "max_position_embeddings", None)
    longest = max(min(cfg.data.max_length, s.summary()["tokens_max"]) for s in (data.train_stats, data.val_stats) if s)
    if context and longest > context:
        raise UserError(f"The longest record is {longest} tokens, but {cfg.model.name_or_path} was trained on at most "
                        f"{context} (max_position_embeddings in its config.json): set data.max_length={context} "
                        "(data.overlong says whether longer records are cut or left out).")


def lora_fits(cfg, model_path: str, peft_config):
    """PEFT's own checks of lora.target_modules (and lora.peft_args) on the model's architecture, before any weights
    load; a refusal names the model's linear layers. LoRA is kept to the language model of a model with other parts
    (a vision tower: models.beside_text), through `peft_config.exclude_modules`, which lora.peft_args may set instead.
    Returns that weightless PEFT model (None for an architecture that cannot be built without weights), which the dry
    run counts parameters on."""
    import copy
    import re

    from peft import get_peft_model

    try:
        meta = models.meta_model(model_path, cfg.model.trust_remote_code)
    except Exception:  # an architecture that cannot be built without weights: PEFT checks when the model loads
        return None
    left_out = models.beside_text(meta, peft_config.target_modules) if peft_config.exclude_modules is None else []
    if left_out:
        peft_config.exclude_modules = "(" + "|".join(map(re.escape, left_out)) + r")\..*"
        print(f"LoRA goes on the language model alone ({', '.join(left_out)} left out: text never runs through it)")
    outside = lambda n: any(n.startswith(part + ".") for part in left_out)  # noqa: E731
    names = [n for n, _ in meta.named_modules() if not outside(n)]
    layers = [n for n, _ in models.linear_layers(meta) if not outside(n)]
    linear = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in layers}))
    # the attention's own projections (Phi-3's qkv_proj and o_proj, GPT-2's c_attn and c_proj): what the default
    # q, k, v, o stands for on a model that names them otherwise
    attention = sorted({n.rsplit(".", 1)[-1] for n in layers if "attn" in n.lower() or "attention" in n.lower()})
    targets = value(list(cfg.lora.target_modules))
    # PEFT refuses only when no name matches (its rule: models.named_by): one misspelled name among several would
    # train no LoRA there, silently
    if missing := [t for t in cfg.lora.target_modules if t != "all-linear"
                   and not any(models.named_by(n, [t]) for n in names)]:
        on_attention = (f"; its attention's: lora.target_modules=[{','.join(attention)}]"
                        if attention and set(attention) != set(cfg.lora.target_modules) else "")
        where = " in its language model" if left_out else ""
        raise UserError(f"lora.target_modules={targets} names {', '.join(missing)}, which {cfg.model.name_or_path} has "
                        f"no layer of{where}: LoRA would not go there. The model's linear layers{where}: "
                        f"{linear}{on_attention} (lora=all_linear takes them all).")
    try:
        return get_peft_model(meta, copy.deepcopy(peft_config))
    except (ValueError, TypeError) as e:
        extra = f" and lora.peft_args {OmegaConf.to_container(cfg.lora.peft_args)}" if cfg.lora.peft_args else ""
        raise UserError(f"PEFT cannot put LoRA on {cfg.model.name_or_path} with lora.target_modules={targets}{extra}: "
                        f"{e} The model's linear layers: {linear} (lora=all_linear takes them all).") from None


def unquantized_experts(cfg, meta) -> Optional[str]:
    """4- and 8-bit quantization covers linear layers: a mixture-of-experts model whose experts transformers holds as
    fused 3-D tensors (Mixtral, Qwen3-MoE) keeps them, most of its weights, in model.dtype."""
    if meta is None or cfg.quantization.bits not in (4, 8):
        return None
    base = [p for name, p in meta.named_parameters() if "lora_" not in name]  # (meta: with its LoRA layers)
    fused = sum(p.numel() for p in base if p.ndim >= 3)
    if not fused:
        return None
    total = sum(p.numel() for p in base)
    gib = fused * estimate.DTYPE_BYTES[cfg.model.dtype] / 2**30
    return (f"quantization={'nf4' if cfg.quantization.bits == 4 else 'int8'} quantizes linear layers: this model's "
            f"experts, {fused:,} of its {total:,} parameters held as fused tensors that bitsandbytes does not quantize, "
            f"stay in {cfg.model.dtype} ({gib:,.2f} GiB; the dry run's memory estimate counts them so).")


class Plan(NamedTuple):
    steps: int  # optimizer steps in all
    text: str  # "21 (7 per epoch, 1 x 16 samples per step)"
    longest: int  # the longest row a step trains on
    advice: Optional[str]  # set when the run takes fewer than MIN_STEPS optimizer steps
    tokens_per_step: float = 0.0  # the tokens an optimizer step trains on, on average


def step_plan(cfg, data) -> Plan:
    """The optimizer steps the run will take, counted as Trainer counts them (each process takes batch_size
    rows a micro-step); with packing, the rows are TRL's packed rows of data.max_length."""
    t = cfg.train
    rows, longest = len(data.train), min(cfg.data.max_length, data.train_stats.summary()["tokens_max"])
    per_step = f"{t.batch_size} x {t.grad_accum} samples per step"
    if t.packing:
        from trl.data_utils import pack_dataset

        strategy = cfg.train.sft_args.get("packing_strategy", "bfd")  # (TRL's default)
        rows, longest = len(pack_dataset(data.train, cfg.data.max_length, strategy)), cfg.data.max_length
        per_step = (f"{t.batch_size} x {t.grad_accum} rows per step; {len(data.train)} samples packed into {rows} "
                    f"rows of up to {longest} tokens")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        per_step += f", on each of {world} processes"

    def steps(grad_accum: int) -> tuple[int, int]:
        per_epoch = math.ceil(rows / (t.batch_size * world * grad_accum))
        return (t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.epochs)), per_epoch

    total, per_epoch = steps(t.grad_accum)
    advice = None
    if total < MIN_STEPS and t.max_steps <= 0:
        unaccumulated = steps(1)[0]
        more = (f"train.grad_accum=1 gives {unaccumulated} steps" if unaccumulated > total else
                "a smaller train.batch_size, more train.epochs or more data give more")
        plus = "" if t.loraplus_lr_ratio else "; or train.loraplus_lr_ratio=16 (LoRA+: 1.90 in those 21 steps)"
        advice = (f"only {total} optimizer step{'' if total == 1 else 's'} in all: few for LoRA to learn from (on "
                  "the sample data, preset=low_memory reached a validation loss of 2.19 in 21 steps and 1.88 in 336, "
                  f"in about the same time); {more}{plus}.")
    return Plan(total, f"{total} ({per_epoch} per epoch, {per_step})", longest, advice,
                tokens(data.train_stats, cfg.data.max_length) / per_epoch)


def tokens(stats, max_length: int) -> int:
    """The tokens of a split's rows (records past max_length counted at it)."""
    return sum(min(n, max_length) for n in stats.lengths)


def validation_cost(cfg, data, plan: Plan, eval_steps: int) -> Optional[str]:
    """A warning when each validation costs more than half the training between two (a forward pass over a token is
    about a third of a training step's work on it): a large validation split, validated often."""
    if data.val is None or not eval_steps or eval_steps >= plan.steps:
        return None
    read = tokens(data.val_stats, cfg.data.max_length)
    share = read / (3 * plan.tokens_per_step * eval_steps)
    if share <= 0.5:
        return None
    return (f"each validation reads {read:,} tokens, about {share:.0%} of the work of the {eval_steps} training steps "
            "between two: validate less often (train.save_steps, train.eval_steps) or on fewer records "
            "(data.val_fraction, a smaller data.val_path file).")


def dry_run(cfg, model_path: str, tokenizer, data, plan: Plan, args, out: Path, meta=None) -> None:
    """Report what a run would do, write data_report.md and token_lengths.png, train nothing. `meta`: the weightless
    PEFT model lora_fits built, if it did."""
    trainable, total, parts = report.memory_estimate(cfg, model_path, plan.longest, meta)
    print(f"Model: {cfg.model.name_or_path} ({model_path})")
    print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %), "
          f"LoRA r={cfg.lora.r}, alpha {build.lora_alpha(cfg.lora)} on {list(cfg.lora.target_modules)}")
    steps, lr = plan_lines(plan, args, data.val is not None, cfg.train.loraplus_lr_ratio)
    print(f"Estimated peak memory: {parts['total'] / 2**30:.2f} GiB (" + ", ".join(
        f"{k.replace('_', ' ')} {v / 2**30:.2f}" for k, v in parts.items() if k != "total") + f"; batch of "
        f"{cfg.train.batch_size} x {plan.longest} tokens)")
    out.mkdir(parents=True, exist_ok=True)
    # (a 4- or 8-bit model's adapter trains in bfloat16, TRL's choice; PEFT keeps another one's in float32)
    sizes = estimate.save_sizes(trainable * (2 if cfg.quantization.bits < 16 else 4), trainable, args.optim, tokenizer)
    saves = math.ceil(plan.steps / args.save_steps)
    disk, tight = estimate.room_for_saves(out, sizes, saves, cfg.train.save_total_limit)
    print(f"Disk: {disk}" if not tight else f"warning: {tight}")
    report.length_histogram(data.train_stats, cfg.data.max_length, out / "token_lengths.png")
    report.data_report(cfg, data, f"{steps}; learning rate {lr}", plan.advice, (trainable, total), parts,
                       out / "data_report.md")
    rows = [data.train[0]] + ([data.train[data.train_stats.first_conversation]]
                              if data.train_stats.first_conversation > 0 else [])
    shown = prepare.marks(rows, tokenizer)
    print(f"One training example (the tokens that carry loss are between {shown[0]} and {shown[1]}):")
    print(prepare.show_example(rows[0], tokenizer, shown))
    if len(rows) > 1:
        print(f"One conversation of several exchanges, {report.replies(data.train_stats)}:")
        print(prepare.show_example(rows[1], tokenizer, shown))
    print(f"Dry run: nothing was trained. Report: {out / 'data_report.md'}")


def plan_lines(plan: Plan, args, has_val: bool, loraplus: Optional[float] = None) -> tuple[str, str]:
    """Print, and return, what the optimizer steps and the learning rate will be."""
    def when(n: int) -> str:  # (the last step always saves and validates)
        if n >= plan.steps:
            return "at the end"
        return "every step" if n == 1 else f"every {n} steps" + (" and at the end" if plan.steps % n else "")

    steps = (f"{plan.text}; a checkpoint {when(args.save_steps)} (train.save_steps)"
             + (f", a validation {when(args.eval_steps)}" if has_val else ""))
    lr = schedule(args, plan.steps) + (f"; LoRA's B matrices at {loraplus:g}x (train.loraplus_lr_ratio)"
                                       if loraplus else "")
    print(f"Optimizer steps: {steps}")
    print(f"Learning rate: {lr}")
    return steps, lr


def schedule(args, steps: int) -> str:
    """The learning rate over the run, in words: "0.0002, cosine, after 1 warmup step from 0.0001"."""
    from .trainer import LINEAR_WARMUP, scheduler_name

    kind = scheduler_name(args)
    warmup = args.get_warmup_steps(steps)
    if not warmup:
        return f"{args.learning_rate:g}, {kind} (train.lr, train.scheduler)"
    start = args.learning_rate / (warmup + 1) if kind in LINEAR_WARMUP else None
    return (f"{args.learning_rate:g}, {kind}, after {warmup} warmup step{'s' * (warmup > 1)}"
            + (f" from {start:.3g}" if start else "") + " (train.lr, train.scheduler, train.warmup_ratio)")


def validation_choice(cfg) -> str:
    """What data.val_path=auto found, in one line."""
    val_spec = data_paths(cfg)[1]
    if val_spec:
        return f"Validation data: {val_spec} (beside the training file; data.val_path=FILE names another)"
    if cfg.data.val_fraction > 0:
        return f"Validation data: {cfg.data.val_fraction:.0%} of the training data (data.val_fraction)"
    return ("No validation data: no <name>_val file beside the training data; data.val_fraction=0.1 splits a share "
            "off, data.val_path=FILE names a file.")


def sample_answers(cfg, tokenizer, path: Path) -> report.SampleAnswers:
    """eval.samples: the callback that answers the first validation questions after each validation."""
    from .runs import record_messages

    records = prepare.load_and_split(*data_paths(cfg), data_options(cfg))[1][:cfg.eval.samples]
    return report.SampleAnswers(records, [record_messages(cfg, r) for r in records], tokenizer,
                                cfg.eval.max_new_tokens, path, cfg.eval.repetition_penalty)


def use_adapter_lora(cfg) -> None:
    """With model.adapter, the adapter's own LoRA settings are the run's (so its config and card say what trains);
    a different value set on the command line is refused. A run dir means its final_model/."""
    if (final := Path(cfg.model.adapter) / "final_model").is_dir():
        cfg.model.adapter = str(final)
    lora = models.adapter_lora(cfg.model.adapter)
    now = {k: sorted(v) if k == "target_modules" else v for k, v in OmegaConf.to_container(cfg.lora).items()}
    now["alpha"] = build.lora_alpha(cfg.lora)
    differ = {k: v for k, v in lora.items() if now[k] != v}
    if clash := [k for k in differ if set_on_command_line(f"lora.{k}")]:
        raise UserError(f"model.adapter={cfg.model.adapter} has " + ", ".join(f"lora.{k}={value(differ[k])}" for k in
                        clash) + "; this command sets " + ", ".join(f"lora.{k}={value(now[k])}" for k in clash)
                        + ". Training an adapter further keeps its LoRA settings: drop the override, or train a new "
                        "adapter without model.adapter.")
    print(f"Training further from the adapter {cfg.model.adapter} (a fresh optimizer and schedule)"
          + (": its LoRA settings " + ", ".join(f"lora.{k}={value(v)}" for k, v in differ.items()) if differ else ""))
    for k, v in differ.items():
        cfg.lora[k] = v


def continue_command(out: Path) -> str:
    """What continues a stopped run; in a -m sweep, the sweep (its finished jobs stay as they are)."""
    import sys

    from hydra.core.hydra_config import HydraConfig

    if in_sweep():
        argv = [a for a in sys.argv[1:] if not a.startswith(("resume_from=", "hydra.sweep.dir="))]
        return ("Continue the sweep with: python -m sft_recipes " + shlex.join(argv) + " "
                + shlex.join([f"hydra.sweep.dir={HydraConfig.get().sweep.dir}", "resume_from=auto"]))
    return f"Continue with: python -m sft_recipes resume_from=auto {shlex.quote(f'hydra.run.dir={out}')}"


def run(cfg) -> Optional[Path]:
    """Fine-tune per `cfg` (a composed Hydra config). Returns the final_model folder (None for a dry run)."""
    out = Path(cfg.output_dir)
    if os.environ.get("RANK", "0") != "0":  # (the main process of a launch guards the run dir)
        return _run(cfg)
    if cfg.dry_run:
        refuse_finished(out, dry_run=True)
        return _run(cfg)
    with holding(out):  # one process trains in a run dir at a time
        return _run(cfg)


def _run(cfg) -> Optional[Path]:
    """run()'s steps, in order: resume point, checks, data, model, trainer, training, saving, report."""
    import datasets
    from transformers import set_seed

    datasets.disable_progress_bars()
    out = Path(cfg.output_dir)
    expand_home(cfg)
    checkpoint = None if cfg.dry_run else resume_point(cfg, out)
    if checkpoint:  # (checked after: the defaults in place of the run's own data files need not exist)
        cfg = keep_trained_settings(cfg, checkpoint)
    overrides = run_overrides(checkpoint)  # (a resume keeps the run's own in .hydra/overrides.yaml)
    config.check(cfg)
    if cfg.model.adapter and not checkpoint:  # (a resumed run kept the LoRA settings it was trained with)
        use_adapter_lora(cfg)
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    set_seed(cfg.seed)

    # Data first: bad records fail here, before any model weights are loaded.
    model_path = models.resolve_config(cfg.model)
    models.quantized_weights(model_path, cfg.quantization)
    tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    if cfg.data.val_path == "auto":
        print(validation_choice(cfg))
    unused = [k for k, on in ((f"data.val_fraction={cfg.data.val_fraction}", cfg.data.val_fraction > 0),
                              ("data.split_by=source", cfg.data.split_by == "source")) if on]
    if unused and (val_spec := data_paths(cfg)[1]):
        print(f"warning: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used: {val_spec} validates "
              "(with data.val_path=null they split the training data)")
    data = prepare_data(cfg, tokenizer)
    train_ds, val_ds, train_stats, val_stats = data.train, data.val, data.train_stats, data.val_stats
    print(report.data_summary("Training data", train_stats))
    if val_stats:
        print(report.data_summary("Validation data", val_stats))
    for warning in data.report["warnings"] + adapter_leaks(cfg, data):
        print(f"warning: {warning}")
    if data.report["duplicates"] and (dup := data.report["duplicates"])["exact"] + dup["normalized"]:
        print(f"Dropped {dup['exact']} exact and {dup['normalized']} normalized duplicate(s) "
              "(data.dedup=false keeps them)")
    within_context(cfg, model_path, data)
    plan = step_plan(cfg, data)
    if checkpoint and finished(out, checkpoint, plan.steps):
        raise NothingToDo(f"The run in {out} already finished (step {checkpoint.name.split('-')[1]} of "
                          f"{plan.steps}); its adapter is {out / 'final_model'}. Nothing was changed. To train longer, "
                          "resume with a larger train.max_steps or train.epochs.")
    if checkpoint and (changed := data_changed(checkpoint, data.digest)):
        print(f"warning: {changed}")
    if plan.advice:
        print(f"warning: {plan.advice}")
    # train.sft_args and lora.peft_args fail here, before any model
    args = build.sft_config(cfg, str(out), has_eval=val_ds is not None, steps=plan.steps)
    if cost := validation_cost(cfg, data, plan, args.eval_steps if args.eval_strategy != "no" else 0):
        print(f"warning: {cost}")
    args.disable_tqdm = not terminal()  # a log file gets lines, not bars
    four_bit = cfg.quantization.bits == 4
    if slow := models.bf16_advice({cfg.model.dtype, cfg.quantization.compute_dtype if four_bit else None}, four_bit,
                                  models.cuda_gpu()):
        print(f"warning: {slow}")
    adapter = cfg.model.adapter and not checkpoint  # a resumed run finds the adapter's weights in its checkpoint
    peft_config = None if adapter else build.lora_config(cfg.lora)
    meta = lora_fits(cfg, model_path, peft_config) if peft_config is not None else None
    if experts := unquantized_experts(cfg, meta):
        print(f"warning: {experts}")
    if cfg.dry_run:
        dry_run(cfg, model_path, tokenizer, data, plan, args, out, meta)
        return None

    import torch
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .estimate import PeakMemory
    from .trainer import Guard, Trainer

    callbacks = [log := report.TrainingLog(out / "training_log.txt"), guard := Guard(cfg.train.on_nonfinite)]
    if cfg.eval.samples and val_ds is not None:
        callbacks.append(sample_answers(cfg, tokenizer, out / "samples.md"))
    if cfg.train.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(cfg.train.early_stopping_patience))
    memory = PeakMemory()
    model = models.load_model(model_path, cfg.model.dtype, build.bnb_config(cfg.quantization),
                              cfg.model.attn_implementation, cfg.model.trust_remote_code)
    if adapter:  # continue training that adapter instead of a new one
        model = models.load_adapter(model, cfg.model.adapter)
    try:
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
            checkpoint_files={RUN_CONFIG: run_config(cfg), DATA_DIGEST: data.digest,
                              OVERRIDES: yaml.safe_dump(overrides)},
            **build.trainer_kwargs(cfg),
        )
    except Exception as e:  # PEFT applies lora.peft_args here, to the loaded weights
        if not cfg.lora.peft_args:
            raise
        raise UserError(f"PEFT could not build the adapter with lora.peft_args "
                        f"{OmegaConf.to_container(cfg.lora.peft_args)}: {type(e).__name__}: {e}") from e
    if trainer.pop_callback(ProgressCallback):  # the same bars, each log as training_log.txt's line
        trainer.add_callback(report.Progress(log))
    elif trainer.pop_callback(PrinterCallback):  # no terminal: each log as that line, with the time left
        trainer.add_callback(report.LogLines(log))
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    sizes = estimate.save_sizes(sum(p.numel() * p.element_size() for p in trainable),
                                sum(p.numel() for p in trainable), args.optim, tokenizer)
    checkpoint_size, saves = sizes[0], math.ceil(plan.steps / args.save_steps)
    if trainer.is_world_process_zero():
        plan_lines(plan, args, val_ds is not None, cfg.train.loraplus_lr_ratio)
        if tight := estimate.room_for_saves(out, sizes, saves, cfg.train.save_total_limit)[1]:
            print(f"warning: {tight}")
        print(f"Run dir: {out}", flush=True)
    start = time.perf_counter()
    memory.start()
    try:
        with room_to_save(out, trainer, checkpoint_size):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteError as e:
        fix = ("Lower train.lr in a new run (a resumed one keeps its own), or add train.on_nonfinite=skip to the "
               "command below, which continues this one dropping such steps." if last_checkpoint(out) or in_sweep()
               else "Lower train.lr, or set train.on_nonfinite=skip to drop such steps.")
        raise UserError(f"Training stopped: {e} (learning rate {cfg.train.lr}). Nothing from that step was saved. "
                        f"{fix} {what_is_kept(out)}") from None
    except torch.cuda.OutOfMemoryError:
        resumable = "" if not last_checkpoint(out) else (
            " (these change the run, so they start a new one)" if cfg.train.gradient_checkpointing else
            " (of these, a resumed run takes train.gradient_checkpointing=true; the others change the run, so they "
            "start a new one)")
        raise UserError(f"Out of GPU memory. To fit, try: {oom_advice(cfg)}{resumable}. {what_is_kept(out)}") from None
    if guard.stopped_by:
        print(f"Stopped by {guard.stopped_by[0]} at step {trainer.state.global_step}; saved {last_checkpoint(out)}. "
              f"{continue_command(out)}", flush=True)
        raise SystemExit(guard.stopped_by[1])
    state = trainer.state
    if cfg.train.early_stopping_patience and state.global_step < state.max_steps:
        print(f"Early stopping at step {state.global_step}: no lower validation loss in "
              f"{cfg.train.early_stopping_patience} validation(s) since step {state.best_global_step} "
              f"({state.best_metric:.4f}).")
    if guard.skipped:
        print(f"warning: {guard.skipped} step(s) with a non-finite gradient were skipped (train.on_nonfinite=skip)")
    best = cfg.train.final_model == "best" and state.best_model_checkpoint
    if val_ds is not None and not best and not any(h.get("step") == state.global_step and "eval_loss" in h
                                                   for h in state.log_history):
        trainer.evaluate()  # always end with a validation loss
    final = out / "final_model"
    staging = out / ".staging" / "final_model"
    if trainer.is_fsdp_enabled:  # gather the sharded adapter into one file for the final save
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    with room_to_save(out, trainer, checkpoint_size):
        trainer.save_model(str(staging))  # adapter + tokenizer with its chat template
        if trainer.is_world_process_zero():
            publish(staging, final, "final model")
    if trainer.is_world_process_zero():
        try:
            staging.parent.rmdir()  # .staging/ is empty once everything is in place
        except OSError:
            pass
        report.write_data_stats(data, out / "data_stats.json")
        report.plot_loss(trainer.state.log_history, out / "loss.png")
        metrics = report.write_metrics(trainer, out / "metrics.json", time.perf_counter() - start,
                                       memory.peak_bytes(), log.tokens_per_s)
        card.write(out, cfg)
        print("Final train loss {}, best validation loss {} (metrics.json)".format(
            *(f"{v:.4f}" if v is not None else "none" for v in (metrics["final_train_loss"], metrics["best_eval_loss"]))))
        weights = (f" (the weights of step {metrics['final_model_step']}, the lowest validation loss; "
                   "train.final_model=best)" if best else "")
        print(f"Adapter saved to {final}{weights}")
        rel = os.path.relpath(out)
        run = shlex.quote(str(out) if rel.startswith("..") else rel)
        gguf = models.source_gguf(cfg.model) is not None
        steps = [(f"chat run_dir={run}", "ask it questions"),
                 (f"evaluate run_dir={run}", "base vs fine-tuned, with answers") if val_ds is not None else
                 (f"evaluate run_dir={run} data=QA_FILE", "base vs fine-tuned on held-out questions"),
                 (f"merge run_dir={run}" + (" gguf=q8_0" if gguf else ""),
                  "a plain model" + (", and a GGUF file for llama.cpp" if gguf else ""))]
        width = max(len(c) for c, _ in steps)
        print("Next:\n" + "\n".join(f"  python -m sft_recipes.{c.ljust(width)}  # {what}" for c, what in steps))
        if cfg.eval.after_train:
            from .evaluate import evaluate

            del trainer, model  # free the training copy before loading the evaluation one
            m = evaluate(out, cfg.eval.max_new_tokens, cfg.eval.limit, repetition_penalty=cfg.eval.repetition_penalty)
            print("Evaluation (base -> fine-tuned): " + ", ".join(
                f"{k} {m['base'][k]} -> {m['fine_tuned'][k]}" for k in ("loss", "rouge_l", "token_f1")))
            print(f"Report: {out / 'eval' / 'report.md'}")
    return final
