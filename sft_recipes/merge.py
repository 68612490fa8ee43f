"""`python -m sft_recipes.merge run_dir=RUN`: write RUN/merged/, a plain transformers model (no peft needed).

For a QLoRA run the adapter was trained against the *de-quantized* 4-bit weights, so those are what it is
merged into: the base is loaded in 4-bit exactly as in training, de-quantized, and W + B·A·scale is formed in
float32, then saved in `dtype` (bfloat16 or float32). Merging into the original full-precision weights would
add the quantization error back; re-quantizing after the merge would add a new one. The loss of the adapter
(4-bit base + LoRA) and of the merged model are compared on the validation split and saved in
merged/merge_report.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = "python -m sft_recipes.merge run_dir=RUN [dtype=bfloat16|float32] [limit=0]"
DEFAULTS = {"run_dir": None, "dtype": "bfloat16", "limit": 0}


def merge(run_dir, dtype: str = "bfloat16", limit: int = 0) -> dict:
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from . import card, runs
    from .errors import UserError

    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"dtype={dtype}: use bfloat16 or float32.")
    run_dir = Path(run_dir)
    cfg = runs.config(run_dir)
    tok = runs.tokenizer(run_dir)
    adapted = runs.adapter_model(cfg, run_dir)  # as trained: quantized base + adapter
    quantized = cfg.quantization.bits in (4, 8)

    # the weights the adapter saw: de-quantize a second copy of the base as trained, then merge in float32
    base = runs.base_model(cfg)
    if quantized:
        base = base.dequantize()
    merged = runs.adapter_model(cfg, run_dir, base.to(torch.float32)).merge_and_unload()
    out = run_dir / "merged"
    tmp = Path(tempfile.mkdtemp(prefix="merged.tmp-", dir=run_dir))
    try:
        merged.to(getattr(torch, dtype)).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # how much did merging change the model? loss on the validation split, adapter vs merged (reloaded plain)
    report = {"dtype": dtype, "merged_into": "de-quantized 4-bit weights" if quantized else "base weights"}
    _, rows = runs.validation(cfg, tok, limit)
    if rows is not None:
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
        a, m = runs.mean_loss(adapted, rows), runs.mean_loss(plain, rows)
        report.update(adapter_loss=round(a, 5), merged_loss=round(m, 5),
                      relative_difference=round(abs(m - a) / a, 5), records=len(rows))
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    card.write(run_dir, cfg, merged=True)
    return report


def _cli(argv):
    from .runs import parse_args

    args = parse_args(argv, DEFAULTS, USAGE)
    report = merge(args["run_dir"], args["dtype"], args["limit"])
    print(json.dumps(report, indent=2))
    print(f"Merged model: {Path(args['run_dir']) / 'merged'} (AutoModelForCausalLM.from_pretrained loads it)")


if __name__ == "__main__":
    from .runs import main_guard

    sys.exit(main_guard(_cli))
