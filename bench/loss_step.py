"""The loss step on the CPU: our lean step (the LM head at the trained positions, one cross-entropy) against TRL's
tiled log-probability kernel, which without Triton folds whole tiles in torch ops (sft_recipes/trainer.py,
lean_limit).

    python bench/loss_step.py            # about a minute

The embedded model's LM head shape (49,152 x 576, bfloat16) over random hidden states, forward and backward, each
way and size in a fresh process; the figures are the growth of the peak resident size over the step (after a
warm-up step) and its time. Writes bench/results/loss_step.json.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VOCAB, HIDDEN = 49152, 576
POSITIONS = [1024, 3236]


def step(way: str, positions: int) -> tuple:
    """(bytes the resident size grows by, seconds) over one loss step of `positions` positions, in this process."""
    import time

    import torch
    import torch.nn.functional as F
    from trl.kernels import ChunkedLogProbFunction

    from sft_recipes.estimate import restart_resident_peak, status_kib

    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16)

    def once(n: int) -> None:
        hidden = torch.randn(n, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, VOCAB, (n,))
        if way == "lean":
            logits = F.linear(hidden, weight).float()
            loss = F.cross_entropy(logits, targets, reduction="sum")
            (logits.argmax(-1) == targets).sum()  # (the token accuracy, as the step keeps it)
        else:  # as TRL's SFT model forward calls it: 32,768 vocabulary entries a tile, the top-1 flag
            loss = -ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0,
                                                 ("is_top1",))[0].sum()
        loss.backward()

    once(64)
    restart_resident_peak()
    start, began = status_kib("VmRSS"), time.perf_counter()
    once(positions)
    return (status_kib("VmHWM") - start) * 1024, time.perf_counter() - began


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--step":
        print(*step(sys.argv[2], int(sys.argv[3])))
        return
    rows = []
    for positions in POSITIONS:
        row = {"positions": positions}
        for way in ("lean", "tiled"):
            out = subprocess.run([sys.executable, __file__, "--step", way, str(positions)], capture_output=True,
                                 text=True, check=True).stdout.split()
            row[f"{way}_gib"], row[f"{way}_s"] = round(int(out[-2]) / 2**30, 3), round(float(out[-1]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "loss_step.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
