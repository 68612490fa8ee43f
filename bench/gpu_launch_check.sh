#!/usr/bin/env bash
# On a GPU machine: does each launch config in recipes/accelerate/ train and save one adapter?
# A tiny random Llama (built here, with the embedded tokenizer from TOK_DIR), QLoRA, 4 steps per config,
# as many processes as GPUs. DeepSpeed configs are skipped (with a line saying so) where deepspeed is missing.
#   bash bench/gpu_launch_check.sh            (through the device tool: carry .whl, see BENCHMARKS.md)
set -u
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOK_DIR=${TOK_DIR:-.whl/tok}
N=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
python3 - <<'PY' || exit 1
import os, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(os.environ["TOK_DIR"])
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
LlamaForCausalLM(cfg).save_pretrained("/tmp/launch_tiny"); tok.save_pretrained("/tmp/launch_tiny")
PY
for c in recipes/accelerate/*.yaml; do
  name=$(basename "$c" .yaml)
  if [[ $name == deepspeed* ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
    echo "SKIP $name: deepspeed is not installed here"; continue
  fi
  if [[ $name == ddp ]] && [ "$N" -lt 2 ]; then
    echo "SKIP $name: one GPU (DDP needs 2 processes; the CPU test in tests/test_scale.py runs it)"; continue
  fi
  rm -rf "/tmp/run_$name"
  start=$(date +%s)
  timeout 300 python3 -m accelerate.commands.launch --config_file "$c" --num_processes "$N" -m sft_recipes \
    model.name_or_path=/tmp/launch_tiny model.embedded=null preset=fast_test train.max_steps=4 train.save_steps=2 \
    train.logging_steps=1 train.report_to=[] hydra.run.dir="/tmp/run_$name" > "${OUT:-/tmp}/launch_$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ] && [ -f "/tmp/run_$name/final_model/adapter_model.safetensors" ]; then
    echo "PASS $name ($N process(es), $(( $(date +%s) - start )) s): $(grep -c '^step=' /tmp/run_$name/training_log.txt) log lines"
  else
    echo "FAIL $name (exit $rc):"; grep -E "Error|error" "${OUT:-/tmp}/launch_$name.log" | tail -3
  fi
done
