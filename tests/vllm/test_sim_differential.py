"""The simulator's engine against vLLM's own, on the same request sequence at the same KV
budget, block size, max_num_seqs and token budget: the same admission order, the same
preemptions (recompute, latest admitted first) and the same output counts. Timing is not
compared (a CPU is not the GPU the cost model describes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from backends.sim.costmodel import get_profile
from backends.sim.engine import EngineConfig, EngineCore

from .conftest import ROOT, VENV

SPEC: dict[str, Any] = {
    "max_num_seqs": 4,
    "num_blocks": 24,  # 768 KV tokens, one of them vLLM's null block
    "block_size": 32,
    "max_model_len": 512,
    "max_num_batched_tokens": 512,
    "requests": [
        {"id": "r0", "prompt_tokens": 100, "max_tokens": 150},
        {"id": "r1", "prompt_tokens": 60, "max_tokens": 200},
        {"id": "r2", "prompt_tokens": 120, "max_tokens": 100},
        {"id": "r3", "prompt_tokens": 30, "max_tokens": 250},
        {"id": "r4", "prompt_tokens": 80, "max_tokens": 60},
        {"id": "r5", "prompt_tokens": 200, "max_tokens": 40},
        {"id": "r6", "prompt_tokens": 300, "max_tokens": 20},
        {"id": "r7", "prompt_tokens": 10, "max_tokens": 90},
    ],
}


def sim_trace(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = EngineConfig(
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        kv_cache_tokens=spec["num_blocks"] * spec["block_size"],
        block_size=spec["block_size"],
        max_model_len=spec["max_model_len"],
        null_block=True,
    )
    core = EngineCore(cfg, get_profile("h100-llama3-8b").cost)
    for r in spec["requests"]:
        n = r["max_tokens"]
        core.add_request(
            r["id"], prompt_tokens=r["prompt_tokens"], max_tokens=n, output_len=n, arrival=0.0
        )
    admitted: list[str] = []
    preemptions: dict[str, int] = {}
    output_tokens: dict[str, int] = {}
    t = 0.0
    steps = 0
    while core.has_unfinished():
        res = core.step(t)
        t += res.duration
        steps += 1
        admitted += [a for a in res.admitted if a not in admitted]
        for p in res.preempted:
            preemptions[p] = preemptions.get(p, 0) + 1
        output_tokens.update({o.req_id: o.num_output_tokens for o in res.outputs if o.finished})
    return {
        "admitted": admitted,
        "preemptions": preemptions,
        "output_tokens": output_tokens,
        "steps": steps,
    }


def vllm_trace(model_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            str(ROOT / "backends" / "vllm" / "engine_trace.py"),
            str(model_dir),
        ],
        input=json.dumps(spec).encode(),
        capture_output=True,
        timeout=400,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode(errors="replace")[-3000:]
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


def test_simulator_schedules_as_vllm(tiny_model: Path) -> None:
    real = vllm_trace(tiny_model, SPEC)
    sim = sim_trace(SPEC)
    assert sum(real["preemptions"].values()) > 0  # the sequence does exercise preemption
    assert sim["admitted"] == real["admitted"]
    assert sim["preemptions"] == real["preemptions"]
    assert sim["output_tokens"] == real["output_tokens"]
    assert sim["steps"] == real["steps"]
