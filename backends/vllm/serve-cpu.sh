#!/usr/bin/env bash
# Run real vLLM on a CPU host (a laptop, CI) with a tiny random model: for development and tests.
#
#   backends/vllm/serve-cpu.sh                    # installs on first use, then serves on :8000
#   PORT=8001 KV_BLOCKS=80 MAX_NUM_SEQS=8 backends/vllm/serve-cpu.sh [extra vllm serve flags]
#
# Steps (each reused when already done): install-cpu.sh (vLLM's CPU build in its own venv),
# tiny_model.py (a random Llama + a locally trained tokenizer, no download), then `vllm serve`
# with the flags a CPU needs:
#   VLLM_CPU_KVCACHE_SPACE   GiB of memory for the KV cache (the CPU's --gpu-memory-utilization)
#   --block-size             a multiple of 32 on CPU
#   --num-gpu-blocks-override  a small KV cache: KV_BLOCKS x block size tokens (80 x 32 = 2,560)
#   --max-num-seqs           keep equal to the gateway's backends[].max_num_seqs
#   --dtype float32 --enforce-eager, VLLM_ENABLE_V1_MULTIPROCESSING=0: a faster start (~15-25 s)
# Ready when GET /health answers 200. The served model name is MODEL_NAME (default "tiny-llama").
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
HOME_DIR=${VTC_VLLM_HOME:-${HOME:-/tmp}/.cache/vtc-vllm}
PORT=${PORT:-8000}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-8}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
BLOCK_SIZE=${BLOCK_SIZE:-32}
KV_BLOCKS=${KV_BLOCKS:-80}
HIDDEN=${HIDDEN:-128}
LAYERS=${LAYERS:-2}
MODEL_NAME=${MODEL_NAME:-tiny-llama}

venv=$("$here/install-cpu.sh" | tail -n 1)
model=${MODEL_DIR:-$HOME_DIR/models/llama-h$HIDDEN-l$LAYERS-c$MAX_MODEL_LEN}
"$venv/bin/python" "$here/tiny_model.py" "$model" --hidden "$HIDDEN" --layers "$LAYERS" \
  --context "$MAX_MODEL_LEN" >/dev/null

export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
exec "$venv/bin/vllm" serve "$model" \
  --served-model-name "$MODEL_NAME" \
  --host 127.0.0.1 --port "$PORT" \
  --max-model-len "$MAX_MODEL_LEN" \
  --max-num-seqs "$MAX_NUM_SEQS" \
  --block-size "$BLOCK_SIZE" \
  --num-gpu-blocks-override "$KV_BLOCKS" \
  --dtype float32 --enforce-eager \
  "$@"
