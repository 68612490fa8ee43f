"""`python -m sft_recipes.merge run_dir=RUN`: write RUN/merged/, a plain transformers model (no peft needed).

For a QLoRA run the adapter was trained against the *de-quantized* 4-bit weights, so those are what it is
merged into: the base is loaded in 4-bit exactly as in training, de-quantized, and W + B·A·scale is formed in
float32, then saved in `dtype` (bfloat16 or float32). Merging into the original full-precision weights would
add the quantization error back; re-quantizing after the merge would add a new one. The loss of the adapter
(4-bit base + LoRA) and of the merged model are compared on the validation split and saved in
merged/merge_report.json.

`gguf=q8_0` (or q4_k_m, q5_k_m, q6_k: llama.cpp's k-quants, made by its llama-quantize; q4_1, q4_0, f16,
bf16, f32) also writes merged/model.Q8_0.gguf for llama.cpp, Ollama and LM Studio, from the float32 merge,
when the base came as a GGUF file: that file gives the tokenizer and settings (sft_recipes.gguf_export). The
GGUF file, read back with transformers, is validated like the merged model. A new merge replaces merged/ but keeps
the GGUF files of other types that an earlier merge made from the same adapter (q8_0, then q4_k_m: both stay).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

USAGE = "python -m sft_recipes.merge run_dir=RUN|latest [dtype=bfloat16|float32] [limit=0] [gguf=q8_0|q4_k_m|...]"
DEFAULTS = {"run_dir": None, "dtype": "bfloat16", "limit": 0, "gguf": None}


def conv1d_layers_back(model, architecture) -> None:
    """transformers' dequantize() makes every 4-bit layer an nn.Linear, also where the architecture has a Conv1D
    (GPT-2's c_attn, whose weight is stored transposed), which the merged model's files would then hold the wrong way
    round: each such layer becomes a Conv1D again, with the same weights."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, layer in architecture.named_modules():
        if isinstance(layer, Conv1D) and isinstance(linear := model.get_submodule(name), torch.nn.Linear):
            conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight)
            with torch.no_grad():
                conv.weight.copy_(linear.weight.T)
                conv.bias.copy_(linear.bias if linear.bias is not None else torch.zeros_like(conv.bias))
            model.set_submodule(name, conv)


def merge(run_dir, dtype: str = "bfloat16", limit: int = 0, gguf: Optional[str] = None) -> dict:
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from . import card, gguf_export, models, runs
    from .errors import UserError, no_space
    from .prepare import stop_ids

    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"dtype={dtype}: use bfloat16 or float32.")
    run_dir = Path(run_dir)
    if runs.is_checkpoint(run_dir):  # RUN/merged and its card describe the run's final_model
        raise UserError(f"run_dir={run_dir} is a checkpoint; merge writes the run's final_model into RUN/merged: give "
                        f"run_dir={run_dir.parent}. To keep the best checkpoint's weights as final_model, train with "
                        "train.final_model=best (evaluate and chat take a checkpoint).")
    cfg = runs.config(run_dir)
    source = models.source_gguf(cfg.model) if gguf else None
    reader = gguf_export.check(source, gguf, cfg.model.name_or_path) if gguf else None  # before any model loads
    tok = runs.tokenizer(run_dir)
    adapted = runs.adapter_model(cfg, run_dir)  # as trained: quantized base + adapter
    quantized = cfg.quantization.bits in (4, 8)

    # the weights the adapter saw: de-quantize a second copy of the base as trained, then merge in float32
    base = runs.base_model(cfg)
    if quantized:
        base = base.dequantize()
    merged = runs.adapter_model(cfg, run_dir, base.to(torch.float32)).merge_and_unload()
    if quantized:
        conv1d_layers_back(merged, models.meta_model(models.resolve_config(cfg.model), cfg.model.trust_remote_code))
    out = run_dir / "merged"
    tmp = Path(tempfile.mkdtemp(prefix="merged.tmp-", dir=run_dir))
    gguf_name = gguf_export.file_name(gguf) if gguf else None
    digest = adapter_digest(run_dir)
    earlier = earlier_gguf(out, digest, gguf_name)
    try:
        if gguf:  # from the float32 merge, before it is cast to dtype
            gguf_export.write(merged, tok.chat_template, source, tmp / gguf_name, gguf, reader)
        stops = stop_ids(tok, merged)  # the end of a reply too, where that is not the eos_token
        merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        merged.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for name in earlier:  # a second link: until the new merged/ is in place, the old one stays whole
            try:
                os.link(out / name, tmp / name)
            except OSError:  # (a file system without hard links)
                shutil.copy2(out / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except Exception as e:
        if not no_space(e):
            raise
        size = merged.num_parameters() * (2 if dtype == "bfloat16" else 4) / 2**30
        raise UserError(f"No space left to write {out} (the merged model takes about {size:,.2f} GiB in {dtype}"
                        + (", the GGUF file more" if gguf else "") + f"): free space in {run_dir}'s disk. "
                        + ("The merged/ there is as it was." if out.exists() else "Nothing was written.")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del merged, base  # the copies below are read back from the files

    # how much did merging change the model? loss on the validation split, adapter vs merged (reloaded plain)
    report = {"dtype": dtype, "adapter_sha256": digest,
              "merged_into": f"de-quantized {cfg.quantization.bits}-bit weights" if quantized else "base weights"}
    _, rows = runs.validation(cfg, tok, limit)
    if rows is not None:
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
        a, m = runs.mean_loss(adapted, rows), runs.mean_loss(plain, rows)
        report.update(adapter_loss=round(a, 5), merged_loss=round(m, 5),
                      relative_difference=round(abs(m - a) / a, 5), records=len(rows))
        if gguf:
            del plain
            bars = hf_logging.is_progress_bar_enabled()  # (off without a terminal: sft_recipes.quiet_logs)
            hf_logging.disable_progress_bar()  # transformers' bar over de-quantizing each GGUF tensor
            try:
                g = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_name, dtype=torch.float32).eval()
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            loss = runs.mean_loss(g, rows)
            report.update(gguf_loss=round(loss, 5), gguf_relative_difference=round(abs(loss - a) / a, 5))
    if gguf:
        report.update(gguf_file=gguf_name, gguf_type=gguf)
    if earlier:
        report["earlier_gguf"] = earlier
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    card.write(run_dir, cfg, merged=True)
    return report


def adapter_digest(run_dir: Path) -> str:
    """The SHA-256 of the run's adapter weights: which adapter a merge was made from."""
    import hashlib

    h = hashlib.sha256()
    with open(Path(run_dir) / "final_model" / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def earlier_gguf(out: Path, digest: str, new_name: Optional[str]) -> dict:
    """The GGUF files in an earlier merged/ that this merge keeps: those made from the same adapter (a run trained on
    since would leave stale ones), of another type than the new one, with what the earlier report said of them."""
    try:
        old = json.loads((out / "merge_report.json").read_text())
    except (OSError, ValueError):
        return {}
    if old.get("adapter_sha256") != digest:
        return {}
    known = dict(old.get("earlier_gguf", {}))
    if old.get("gguf_file"):
        facts = ("gguf_type", "gguf_loss", "gguf_relative_difference")
        known[old["gguf_file"]] = {k: old[k] for k in facts if k in old}
    return {name: facts for name, facts in known.items() if name != new_name and (out / name).is_file()}


def _cli(argv):
    from .runs import parse_args

    args = parse_args(argv, DEFAULTS, USAGE, __doc__)
    report = merge(args["run_dir"], args["dtype"], args["limit"], args["gguf"])
    print(json.dumps(report, indent=2))
    out = Path(args["run_dir"]) / "merged"
    print(f"Merged model: {out} (AutoModelForCausalLM.from_pretrained loads it)")
    if args["gguf"]:
        print(f"GGUF: {out / report['gguf_file']} (llama.cpp, Ollama, LM Studio)")
    if report.get("earlier_gguf"):
        print(f"Kept from an earlier merge of the same adapter: {', '.join(report['earlier_gguf'])}")


if __name__ == "__main__":
    from .runs import main_guard

    sys.exit(main_guard(_cli))
