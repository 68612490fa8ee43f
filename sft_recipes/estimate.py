"""Peak training memory, estimated from the model's config alone (no weights are loaded).

The four terms of a LoRA/QLoRA step: the frozen base weights (4-bit NF4: half a byte per parameter plus
its block scales; 8-bit: one byte; else the model dtype), the LoRA parameters with their gradients and
AdamW state (fp32: 4 + 4 + 8 bytes each), the activations kept for the backward pass, and the logits
(with their float32 copies and gradients, where the lean loss step materializes them; see trainer.py); with eager
attention, also each row's attention matrices (heads x row length squared), which SDPA never holds.
Activations per token and layer follow the tensors a Llama-style decoder layer saves; with gradient
checkpointing only each layer's input is kept, plus one layer recomputed; with activation offloading most of
what is kept waits in CPU memory instead.

And what a run's saves take on disk: its checkpoints (adapter, optimizer state, tokenizer) and final model.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Layer inputs that stay on the GPU with activation offloading: TRL's stash, which our Trainer sizes to
# trainer.OFFLOAD_STASH_LAYERS layers, and the one being copied back. 5 is a bound from above.
OFFLOAD_STASH = 5


def estimate(model, lora_trainable: int, bits: int, dtype: str, batch_size: int, seq_len: int,
             gradient_checkpointing: bool, double_quant: bool = True, offloading: bool = False,
             attention: str = "sdpa", padding_free: bool = False, cuda: bool = True) -> Dict[str, float]:
    """Bytes per term for `model` (built on the meta device) with its LoRA trainable parameter count. `attention`:
    the attention it trains with (models.attention); `padding_free`: a batch's samples in one row; `cuda`: on a
    GPU (else the CPU, where TRL's tiled loss kernel holds more)."""
    from .models import linear_layers

    cfg = model.config.get_text_config()
    b = DTYPE_BYTES[dtype]
    quantized = sum(module.weight.numel() for _, module in linear_layers(model))
    total = sum(p.numel() for p in model.parameters())
    frozen = total - quantized
    if bits == 4:  # NF4: 0.5 byte/param + an absmax per 64 (fp32, or 8-bit with a second level when double)
        qbytes = quantized * (0.5 + (1 + 4 / 256) / 64 if double_quant else 0.5 + 4 / 64)
    elif bits == 8:
        qbytes = quantized * 1.0 + quantized ** 0.5 * 4
    else:
        qbytes = quantized * b
    weights = qbytes + frozen * b
    lora = lora_trainable * (4 + 4 + 8)  # fp32 parameter, gradient, AdamW first and second moments
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads) * (h // heads)
    tokens = batch_size * seq_len
    per_layer = tokens * (11 * h + 2 * kv + 5 * inter) * b  # norms, q/k/v/o inputs and outputs, MLP, LoRA inputs
    activations = tokens * h * b * layers + per_layer if gradient_checkpointing else per_layer * layers
    if offloading:  # what is kept goes to CPU memory; the GPU keeps the last few layer inputs (OFFLOAD_STASH)
        kept = tokens * h * b * min(layers, OFFLOAD_STASH) + per_layer if gradient_checkpointing else \
            per_layer * min(layers, 2)
        activations = min(activations, kept)
    from .trainer import LOGITS_BYTES_PER_ELEMENT, lean_limit, tiled_bytes

    logits = tokens * cfg.vocab_size * LOGITS_BYTES_PER_ELEMENT  # the lean loss step holds them all...
    if logits > lean_limit(tokens, cfg.vocab_size, cuda):  # ...or TRL's tiled kernel holds a tile of them at once
        logits = 0 if cuda else tiled_bytes(tokens, cfg.vocab_size)  # (on a GPU, in its kernel: not counted)
    parts = {"weights": weights, "lora_and_optimizer": lora, "activations": activations, "logits": logits}
    if attention == "eager":
        # Eager attention holds each row's attention matrix (heads x length x length; a padding-free row is the whole
        # batch): its float32 softmax and the copy in the compute dtype stay for the backward pass in every layer (in
        # one, with checkpointing), and the scores and their gradients pass through (bench/attention_memory.py).
        rows, span = (1, tokens) if padding_free else (batch_size, seq_len)
        kept = 4 + (b if b < 4 else 0)
        parts["attention_matrices"] = rows * heads * span * span * (
            kept * (1 if gradient_checkpointing else layers) + 4 + b)
    parts["total"] = sum(parts.values())
    return parts


def table(parts: Dict[str, float]) -> str:
    return "\n".join(f"| {k.replace('_', ' ')} | {v / GIB:.3f} GiB |" for k, v in parts.items())


# ---- measuring the real peak ---------------------------------------------------------------------------------

def status_kib(field: str) -> int:
    """A field of this process's /proc/self/status in KiB (VmRSS: the resident size; VmHWM: its peak); 0 without it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def restart_resident_peak() -> None:
    """Hand the allocator's freed pages back to the system (so the resident size shows live memory), then let the
    peak resident size (VmHWM) start again from the current size."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


class PeakMemory:
    """Peak memory of the training phase: CUDA's max allocated on a GPU; on a CPU the process's peak resident
    size (VmHWM, reset when training starts, after freed memory is returned to the system) minus its size
    before the model was loaded."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.before_model = 0 if self.cuda else status_kib("VmRSS") * 1024

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:  # (without the freed pages of loading and quantizing)
            restart_resident_peak()

    def peak_bytes(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return max(0, status_kib("VmHWM") * 1024 - self.before_model)


def save_sizes(adapter: int, trainable: int, optim: str, tokenizer) -> tuple[int, int]:
    """Bytes of (one checkpoint, the final model): the adapter (`adapter` bytes, `trainable` parameters), its
    optimizer state (two moments, Adam's, in the adapter's dtype, or a byte each for an 8-bit optimizer), the
    tokenizer's files, and Trainer's small files."""
    optimizer = 2 * trainable if "8bit" in optim else 2 * adapter
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            tok = sum(f.stat().st_size for f in Path(tmp).iterdir())
    except Exception:  # (no room in the temporary folder, say: an estimate never stops a run)
        tok = 0
    return adapter + optimizer + tok + 2**16, adapter + tok + 2**14


def room_for_saves(out: Path, sizes: tuple[int, int], saves: int, keep: Optional[int]) -> tuple[str, Optional[str]]:
    """What the run's saves take at once (the checkpoints train.save_total_limit keeps, the one written before the
    oldest goes, and the final model) in a line, and a warning when the run dir's disk has less free space."""
    at_once = min(saves, keep + 1 if keep else saves)
    where = Path(out).absolute()
    while not where.exists():  # (a run dir not made yet: the folder it will be made in)
        where = where.parent
    need, free = at_once * sizes[0] + sizes[1], shutil.disk_usage(where).free
    mb = lambda n: f"{n / 2**20:,.1f} MB"  # noqa: E731
    why = (f"the {keep} of train.save_total_limit and the next, written before the oldest goes" if keep and saves > keep
           else "all the run saves")
    line = f"about {mb(need)} at once in {out}: {at_once} checkpoint(s) of {mb(sizes[0])} ({why}) and the final model"
    return line, None if free >= need else (
        f"this run's checkpoints and final model take {line}, but its disk has {mb(free)} free: the run would stop "
        "at the first save that does not fit. Free space, keep fewer checkpoints (train.save_total_limit=1), or run "
        "on another disk (hydra.run.dir=DIR).")
