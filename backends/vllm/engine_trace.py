"""Run a request sequence through vLLM's own engine, step by step, and print what its scheduler
did (JSON): the differential check of the simulator against the real engine uses it.

Run it with the vLLM virtualenv's Python::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 ~/.cache/vtc-vllm/venv-0.32.0/bin/python \
        backends/vllm/engine_trace.py MODEL_DIR < spec.json

``spec.json``: ``{"max_num_seqs", "num_blocks", "block_size", "max_model_len",
"max_num_batched_tokens", "requests": [{"id", "prompt_tokens", "max_tokens"}, ...]}``. Every
request is added before the first step (so the order is the engine's alone, not the network's),
with token-id prompts of exactly ``prompt_tokens`` tokens, ``ignore_eos`` and greedy sampling.
Output: ``{"admitted": [ids in first-admission order], "preemptions": {id: count},
"output_tokens": {id: n}, "steps": n}``. Timing is not reported: the CPU's is not the GPU's.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    from vllm import LLM, SamplingParams

    model = sys.argv[1]
    spec = json.load(sys.stdin)
    llm = LLM(
        model=model,
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        block_size=spec["block_size"],
        num_gpu_blocks_override=spec["num_blocks"],
        dtype="float32",
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
    )
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    for i, r in enumerate(spec["requests"]):
        ids = [(i * 97 + k) % 1800 + 20 for k in range(r["prompt_tokens"])]
        params = SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True, temperature=0.0)
        engine.add_request(str(r["id"]), {"prompt_token_ids": ids}, params)

    def ext(req_id: str) -> str:  # vLLM appends a suffix to the ids it is given
        for r in spec["requests"]:
            if req_id == str(r["id"]) or req_id.startswith(f"{r['id']}-"):
                return str(r["id"])
        return req_id

    admitted: list[str] = []
    preemptions: dict[str, int] = {}
    output_tokens: dict[str, int] = {}
    running: set[str] = set()
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                output_tokens[ext(out.request_id)] = len(out.outputs[0].token_ids)
        steps += 1
        now = {ext(r.request_id) for r in scheduler.running}
        waiting = {ext(r.request_id) for r in scheduler.waiting}
        for rid in [ext(r.request_id) for r in scheduler.running]:
            if rid not in admitted:
                admitted.append(rid)
        for rid in running - now:
            if rid in waiting:
                preemptions[rid] = preemptions.get(rid, 0) + 1
        running = now
    json.dump(
        {
            "admitted": admitted,
            "preemptions": preemptions,
            "output_tokens": output_tokens,
            "steps": steps,
        },
        sys.stdout,
    )
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
