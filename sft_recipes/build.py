"""Pure mappers from our config to the library objects: BitsAndBytesConfig, peft.LoraConfig, trl.SFTConfig.

They take the plain config values (a `Config` or DictConfig with the same fields) and load nothing.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import fields
from typing import Optional

from omegaconf import OmegaConf

from .errors import UserError

# where each SFTConfig argument that sft_config sets comes from (named when train.sft_args repeats one)
CONFIG_KEYS = {
    "output_dir": "hydra.run.dir", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size", "per_device_eval_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "learning_rate": "train.lr",
    "lr_scheduler_type": "train.scheduler", "warmup_steps": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm", "optim": "train.optim",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "activation_offloading": "train.activation_offloading",
    "bf16": "model.dtype / quantization.compute_dtype", "fp16": "model.dtype / quantization.compute_dtype",
    "use_cpu": "CUDA_VISIBLE_DEVICES", "logging_steps": "train.logging_steps",
    "logging_nan_inf_filter": "train.on_nonfinite",
    "logging_first_step": "train.logging_steps", "save_strategy": "train.save_steps", "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit", "eval_strategy": "data.val_path / data.val_fraction",
    "eval_steps": "train.eval_steps", "metric_for_best_model": "train.final_model",
    "greater_is_better": "train.final_model",
    "load_best_model_at_end": "train.final_model=best", "restore_callback_states_from_checkpoint": "resume_from",
    "report_to": "train.report_to", "seed": "seed", "data_seed": "seed", "max_length": "data.max_length",
    "packing": "train.packing", "padding_free": "train.padding_free", "pad_to_multiple_of": "train.pad_to_multiple_of",
    "completion_only_loss": "the prepared rows' labels", "dataloader_num_workers": "sft_recipes/build.py",
    "disable_tqdm": "sft_recipes/build.py", "save_only_model": "sft_recipes/build.py",
}
# SFTConfig arguments of TRL's own tokenization, which the prepared rows (sft_recipes.prepare) replace
PREPARED_KEYS = {
    "assistant_only_loss": "the prepared rows' labels: the answers (a conversation's replies: data.train_replies) "
                           "and the end-of-turn tokens that close them are the trained tokens",
    "chat_template_path": "data.template (a template's chat_template)",
    "eos_token": "the chat template's end-of-turn token (data.template)",
    "dataset_text_field": "the prepared rows",
}


def bnb_config(q):
    """BitsAndBytesConfig for quantization.bits 4 or 8, None for 16 (no quantization)."""
    if q.bits == 16:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
                              bnb_4bit_quant_storage=getattr(torch, q.compute_dtype))


# where each peft.LoraConfig argument that lora_config sets comes from (named when lora.peft_args repeats one)
LORA_KEYS = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "bias": "lora.bias",
             "target_modules": "lora.target_modules", "use_rslora": "lora.use_rslora", "use_dora": "lora.use_dora",
             "task_type": "sft_recipes/build.py"}


def lora_alpha(lora) -> int:
    """lora.alpha, or when unset 2 x lora.r: raising the rank then adds capacity at the same scale alpha/r, instead of
    halving the adapter's step as a fixed alpha would (README's main command, lora.r=32: validation loss 2.19 with
    alpha 64, 2.34 with alpha 32)."""
    return lora.alpha if lora.alpha is not None else 2 * lora.r


def lora_config(lora):
    """peft.LoraConfig; `lora.peft_args` adds any other LoraConfig argument (init_lora_weights, layers_to_transform,
    rank_pattern, ...); one that the config sets already is refused."""
    from peft import LoraConfig

    targets = list(lora.target_modules)
    ours = dict(r=lora.r, lora_alpha=lora_alpha(lora), lora_dropout=lora.dropout, bias=lora.bias,
                target_modules="all-linear" if targets == ["all-linear"] else targets,
                use_rslora=lora.use_rslora, use_dora=lora.use_dora, task_type="CAUSAL_LM")
    extra = passthrough(lora.peft_args, "lora.peft_args", "peft.LoraConfig",
                        {f.name for f in fields(LoraConfig)}, LORA_KEYS)
    init = str(extra.get("init_lora_weights", "")).lower()
    if init.startswith(("pissa", "olora", "corda", "loftq")):
        raise UserError(f"lora.peft_args.init_lora_weights={extra['init_lora_weights']} changes the base model's "
                        "weights as it starts the adapter, so the adapter saved would not load on the base "
                        "(PeftModel.from_pretrained); use gaussian, true or false.")
    try:
        return LoraConfig(**ours, **extra)
    except (ValueError, TypeError) as e:  # LoraConfig's own checks of the values
        if not extra:
            raise
        raise UserError(f"lora.peft_args {extra}: {e}") from None


def passthrough(args, key: str, target: str, names: set, ours: dict) -> dict:
    """The arguments of `key` (train.sft_args, lora.peft_args) as a dict, after refusing one that is not an argument
    of `target` (with the closest names) and one that the config sets already (with the key that sets it)."""
    extra = OmegaConf.to_container(args) if OmegaConf.is_config(args) else dict(args)
    if clash := sorted(set(extra) & set(ours)):
        raise UserError(f"{key}.{clash[0]} is set from the config already ({ours[clash[0]]}); change it there, "
                        f"not through {key}.")
    if unknown := [k for k in extra if k not in names]:
        close = difflib.get_close_matches(unknown[0], sorted(names), n=3)
        raise UserError(f"{key}.{unknown[0]} is not a {target} argument"
                        f"{' (did you mean ' + ' or '.join(close) + '?)' if close else ''}.")
    return extra


def save_interval(train, steps: Optional[int]) -> int:
    """train.save_steps, or when unset: a checkpoint (and a validation) every 50 steps, or every fifth of a run of
    `steps` optimizer steps if that is shorter, so a short run validates along the way and the best checkpoint and
    early stopping have several to choose from."""
    return train.save_steps or (min(50, math.ceil(steps / 5)) if steps else 50)


def padding_free(train) -> bool:
    """Whether a batch's samples (or packed rows) go end to end in one row. One sample a batch has no padding to
    remove (and TRL warns at every run that padding-free is pointless)."""
    return (train.padding_free and train.batch_size > 1) or train.packing


def sft_config(cfg, output_dir: str, has_eval: bool, use_cpu: Optional[bool] = None, steps: Optional[int] = None):
    """trl.SFTConfig for our pre-tokenized rows (input_ids + labels): TRL pads, batches and runs the loop; `steps`, the
    run's optimizer steps, sets an unset train.save_steps. `train.sft_args` adds any other SFTConfig argument; one that
    the config sets already is refused."""
    import torch
    from trl import SFTConfig

    # transformers 5.2x renamed gradient_checkpointing (the old name still works, with a FutureWarning)
    names = {f.name for f in fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    t = cfg.train
    cuda = torch.cuda.is_available() if use_cpu is None else not use_cpu
    dtype = cfg.quantization.compute_dtype if cfg.quantization.bits == 4 else cfg.model.dtype
    save_steps = save_interval(t, steps)
    eval_steps = t.eval_steps or save_steps
    ours = dict(
        output_dir=output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        **{checkpointing: t.gradient_checkpointing},
        activation_offloading=t.activation_offloading,
        bf16=dtype == "bfloat16" and cuda,
        fp16=dtype == "float16" and cuda,
        use_cpu=not cuda,
        logging_steps=t.logging_steps,
        # Trainer's own NaN filter reads the loss back at every step (a host-device sync); with on_nonfinite=stop
        # the Guard ends the run on such a step anyway
        logging_nan_inf_filter=t.on_nonfinite == "skip",
        logging_first_step=True,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        # the best checkpoint (lowest validation loss) is tracked, kept from rotation, and loaded at the end for
        # train.final_model=best
        metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False,
        load_best_model_at_end=has_eval and t.final_model == "best",
        restore_callback_states_from_checkpoint=True,  # a resumed run keeps counting towards early stopping
        report_to=list(t.report_to),
        seed=cfg.seed,
        data_seed=cfg.seed,
        # rows are already cut to data.max_length by sft_recipes.prepare (with counts); packing fills rows to it
        max_length=cfg.data.max_length if t.packing else None,
        packing=t.packing,
        padding_free=padding_free(t),
        pad_to_multiple_of=t.pad_to_multiple_of,
        completion_only_loss=False,  # our rows carry their own labels
        dataloader_num_workers=0,
        disable_tqdm=False,
        save_only_model=False,
    )
    set_here = {k: CONFIG_KEYS.get(k, "sft_recipes/build.py")
                for k in (*ours, "gradient_checkpointing", "activation_checkpointing")} | PREPARED_KEYS
    extra = passthrough(t.sft_args, "train.sft_args", "trl.SFTConfig", names, set_here)
    try:
        return SFTConfig(**ours, **extra)
    except (ValueError, TypeError) as e:  # TrainingArguments' own checks of the values
        if not extra:
            raise
        raise UserError(f"train.sft_args {extra}: {e}") from None


def trainer_kwargs(cfg) -> dict:
    """Our Trainer's own keyword arguments: train.compile (sft_recipes.trainer.compile_layers), LoRA+."""
    t = cfg.train
    return dict(compile=t.compile, compile_options=t.compile_options, compile_checkpoint=t.compile_checkpoint,
                loraplus_lr_ratio=t.loraplus_lr_ratio)
