"""One fine-tuning run, top to bottom: check, data, tokenizer, model, trainer, train, save, report."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from . import build, conf_dir, config, data, models, report, templates
from .errors import UserError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N folder of a run dir that holds a trainer state (a complete save)."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*")
             if (m := CHECKPOINT.match(p.name)) and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


def prepare_data(cfg, tokenizer):
    """Load, validate, split and tokenize. Returns (train_ds, val_ds or None, train_stats, val_stats or None)."""
    d = cfg.data
    template = templates.get(d.template, [str(Path(conf_dir()) / "templates"), *d.template_files])
    template.apply_to(tokenizer)
    train_records = data.load_records(d.train_path)
    if d.val_path:
        val_records = data.load_records(d.val_path)
    else:
        train_records, val_records = data.split(train_records, d.val_fraction, cfg.seed)
    train_ds, train_stats = data.tokenize(train_records, tokenizer, template, d.max_length, d.overlong,
                                          d.system_prompt)
    val_ds = val_stats = None
    if val_records:
        val_ds, val_stats = data.tokenize(val_records, tokenizer, template, d.max_length, d.overlong,
                                          d.system_prompt)
    return train_ds, val_ds, train_stats, val_stats


def dry_run(cfg, model_path: str, tokenizer, train_ds, train_stats) -> None:
    import math

    trainable, total = report.trainable_parameters(model_path, build.lora_config(cfg.lora),
                                                   cfg.model.trust_remote_code)
    t = cfg.train
    steps_per_epoch = math.ceil(len(train_ds) / (t.batch_size * t.grad_accum))
    steps = t.max_steps if t.max_steps > 0 else math.ceil(steps_per_epoch * t.epochs)
    print(f"Model: {cfg.model.name_or_path} ({model_path})")
    print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f} %), "
          f"LoRA r={cfg.lora.r} on {list(cfg.lora.target_modules)}")
    print(f"Optimizer steps: {steps} ({steps_per_epoch} per epoch, {t.batch_size * t.grad_accum} samples per step)")
    print("One training example (the tokens that carry loss are between >>> and <<<):")
    print(data.show_example(train_ds[0], tokenizer))
    print("Dry run: nothing was trained.")


def run(cfg) -> Optional[Path]:
    """Fine-tune per `cfg` (a composed Hydra config). Returns the final_model folder (None for a dry run)."""
    import datasets
    from transformers import set_seed

    datasets.disable_progress_bars()
    config.check(cfg)
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
    out = Path(cfg.output_dir)
    set_seed(cfg.seed)

    # Data first: bad records fail here, before any model weights are loaded.
    model_path = models.resolve(cfg.model.name_or_path, cfg.model.embedded, cfg.model.gguf_file, cfg.model.revision)
    tokenizer = models.load_tokenizer(model_path, cfg.model.trust_remote_code)
    train_ds, val_ds, train_stats, val_stats = prepare_data(cfg, tokenizer)
    print(report.data_summary("Training data", train_stats))
    if val_stats:
        print(report.data_summary("Validation data", val_stats))
    if cfg.dry_run:
        dry_run(cfg, model_path, tokenizer, train_ds, train_stats)
        return None

    checkpoint = None
    if cfg.resume_from == "auto":
        checkpoint = last_checkpoint(out)
        print(f"Resuming from {checkpoint}" if checkpoint else f"resume_from=auto: no checkpoint in {out}, "
              "starting from step 0")
    elif cfg.resume_from:
        checkpoint = Path(cfg.resume_from)
        if not (checkpoint / "trainer_state.json").exists():
            raise UserError(f"resume_from={checkpoint} has no trainer_state.json: not a complete checkpoint.")

    from trl import SFTTrainer

    model = models.load_model(model_path, cfg.model.dtype, build.bnb_config(cfg.quantization),
                              cfg.model.attn_implementation, cfg.model.trust_remote_code)
    trainer = SFTTrainer(
        model=model,
        args=build.sft_config(cfg, str(out), has_eval=val_ds is not None),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=build.lora_config(cfg.lora),
        callbacks=[report.TrainingLog(out / "training_log.txt")],
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if val_ds is not None and not any(h.get("step") == trainer.state.global_step and "eval_loss" in h
                                      for h in trainer.state.log_history):
        trainer.evaluate()  # always end with a validation loss
    final = out / "final_model"
    trainer.save_model(str(final))  # adapter + tokenizer with its chat template
    if trainer.is_world_process_zero():
        (out / "data_stats.json").write_text(json.dumps(
            {"train": train_stats.summary(), "validation": val_stats.summary() if val_stats else None}, indent=2))
        report.plot_loss(trainer.state.log_history, out / "loss.png")
        metrics = report.write_metrics(trainer, result, out / "metrics.json", time.perf_counter() - start)
        print(f"Final train loss {metrics['final_train_loss']}, best validation loss {metrics['best_eval_loss']}")
        print(f"Adapter saved to {final}")
    return final
