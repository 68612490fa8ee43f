#!/usr/bin/env bash
# One device call: install the carried wheels, then bench/throughput.py gpu (baselines and ours in one run).
# Here, once: `bash bench/gpu_wheels.sh` (fills .whl/), then run this through the device tool with carry [".whl"].
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOK_DIR=.whl/tok HF_HUB_OFFLINE=1 PROFILE=${PROFILE:-c_ours} VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-180} TOKENS=${TOKENS:-100000} BUDGET=${BUDGET:-520}
drop_carried_transformers() {
  rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info /tmp/site/huggingface_hub /tmp/site/huggingface_hub-*.dist-info
}
versions="import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
if ! python3 -c "$versions" > /dev/null; then  # the carried transformers (our declared >= 5.20) needs what this image lacks
  echo "WARNING: the carried transformers does not import on this image: falling back to the image's own"
  drop_carried_transformers
  python3 -c "$versions" > /dev/null || exit 1
fi
log=${OUT:-$(mktemp -d)}/bench_gpu.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "$versions"; } | tee "$log"
bench() { python3 bench/throughput.py gpu 2>&1 | grep -v "it/s\]" | tee -a "$log" | grep -E "^(built|a_|b_|c_|d_|\||ratios|all|WARN)"; }
start=$SECONDS
bench
if grep -q "all of our variants failed" "$log" && [ -d /tmp/site/transformers ]; then
  # our variants failed with the carried transformers: the rest of the budget goes to the image's own
  echo "WARNING: rerunning with the image's transformers"
  drop_carried_transformers
  python3 -c "$versions" | tee -a "$log"
  BUDGET=$((BUDGET - (SECONDS - start))) VARIANTS=${RETRY_VARIANTS:-c_ours,a_padmax,b_trl,b_trl_packed_flex} bench
fi
# where the profiled step's compute stream waits (host late, or on the offload copies): bench/trace_gaps.py
for t in "${OUT:-/nonexistent}"/trace_*.json.gz; do [ -f "$t" ] && timeout 30 python3 bench/trace_gaps.py "$t"; done 2>&1 | tee -a "$log"
