"""What eager attention holds beyond SDPA in one training step: its attention matrices (the memory estimate's
`attention matrices` term, sft_recipes/estimate.py).

    python bench/attention_memory.py            # CPU: a few shapes, about a minute

A random-weight Llama with the embedded model's attention (9 heads of 64, 3 key/value heads) in bfloat16 and a
small vocabulary (so that no logits weigh in) takes one forward and backward pass over a padding-free row of
samples, with eager attention and with SDPA, each in a fresh process; the figure is the growth of the peak
resident size over the step (after a warm-up step). Prints, per shape, eager minus SDPA beside the estimate's
term, and writes bench/results/attention_memory.json.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# (row tokens, samples in the row, layers, gradient checkpointing)
SHAPES = [(2048, 2, 2, False), (2048, 2, 4, False), (2048, 2, 4, True), (3236, 4, 2, True)]


def step(attn: str, tokens: int, samples: int, layers: int, checkpointing: bool) -> int:
    """Bytes the resident size grows by over one training step, in this process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes.estimate import restart_resident_peak, status_kib

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, use_cache=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.bfloat16).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.randint(0, 256, (1, tokens))
    positions = torch.arange(tokens // samples).repeat(samples)[None]  # samples one after another, kept apart
    short = tokens // samples
    model(input_ids=ids[:, :short], position_ids=positions[:, :short], labels=ids[:, :short]).loss.backward()
    model.zero_grad(set_to_none=True)
    restart_resident_peak()
    start = status_kib("VmRSS")
    model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    return (status_kib("VmHWM") - start) * 1024


def estimated(tokens: int, samples: int, layers: int, checkpointing: bool) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft_recipes import estimate

    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # a batch of `samples` samples of tokens // samples each, padding-free: one row of `tokens`
    return estimate.estimate(model, 0, 16, "bfloat16", samples, tokens // samples, checkpointing,
                             attention="eager", padding_free=True)["attention_matrices"]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--step":
        attn, *shape = sys.argv[2:]
        print(step(attn, int(shape[0]), int(shape[1]), int(shape[2]), shape[3] == "1"))
        return
    rows = []
    for tokens, samples, layers, checkpointing in SHAPES:
        grown = {}
        for attn in ("sdpa", "eager"):
            out = subprocess.run([sys.executable, __file__, "--step", attn, str(tokens), str(samples), str(layers),
                                  "1" if checkpointing else "0"], capture_output=True, text=True, check=True)
            grown[attn] = int(out.stdout.split()[-1])
        rows.append({"row_tokens": tokens, "samples": samples, "layers": layers, "checkpointing": checkpointing,
                     "eager_minus_sdpa_gib": round((grown["eager"] - grown["sdpa"]) / 2**30, 3),
                     "estimated_gib": round(estimated(tokens, samples, layers, checkpointing) / 2**30, 3)})
        print(json.dumps(rows[-1]), flush=True)
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "results" / "attention_memory.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
