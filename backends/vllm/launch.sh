#!/usr/bin/env bash
# Launch vLLM's OpenAI-compatible server colocated with VTC Gateway.
#
# The gateway holds the queue, so vLLM must never hold one of its own: keep --max-num-seqs equal
# to the gateway's backends[].max_num_seqs. The gateway reads the KV capacity from vLLM's
# /metrics (vllm:cache_config_info) unless max_kv_tokens is set in its config.
#
#   MODEL=meta-llama/Llama-3.1-8B-Instruct PORT=8000 backends/vllm/launch.sh
set -euo pipefail
MODEL=${MODEL:-meta-llama/Llama-3.1-8B-Instruct}
PORT=${PORT:-8000}
MAX_NUM_SEQS=${MAX_NUM_SEQS:-256}
MAX_BATCHED_TOKENS=${MAX_BATCHED_TOKENS:-8192}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
GPU_UTIL=${GPU_UTIL:-0.90}

exec vllm serve "$MODEL" \
  --host 127.0.0.1 --port "$PORT" \
  --max-num-seqs "$MAX_NUM_SEQS" \
  --max-num-batched-tokens "$MAX_BATCHED_TOKENS" \
  --max-model-len "$MAX_MODEL_LEN" \
  --gpu-memory-utilization "$GPU_UTIL" \
  --enable-prefix-caching \
  --disable-log-requests \
  "$@"
