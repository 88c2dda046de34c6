"""``vtc-gateway bench parity`` on a tiny setting: the JSON shape and the table, no timings."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tools.bench import register
from tools.parity_bench import (
    HEADER,
    ParityOptions,
    chat_body,
    gateway_config,
    parity_benchmark,
    prompt_stream,
)

pytestmark = pytest.mark.timeout(60)


async def test_tiny_parity_run_measures_direct_and_each_gateway_path() -> None:
    opts = ParityOptions(
        contexts=(4096,),
        modes=("default", "reserve"),
        clients=4,
        duration=1.0,
        warmup=0.5,
        prompt_words=(20, 60),
        median_output_tokens=8,
    )
    lines: list[str] = []
    results = await parity_benchmark(opts, lines.append)
    json.dumps(results)  # JSON-ready
    assert results["meta"]["max_num_seqs"] == 1024 and results["meta"]["clients"] == 4
    runs = results["runs"]
    assert [(r["max_model_len"], r["path"]) for r in runs] == [
        (4096, "direct"),
        (4096, "default"),
        (4096, "reserve"),
    ]
    for r in runs:
        assert r["errors"] == {}
        assert r["output_tokens_per_s"] > 0 and r["requests"] > 0
        assert r["mean_output_tokens"] >= 1
        assert set(r["latency_s"]) == set(r["ttft_s"]) == {"p50", "p99"}
        assert r["latency_s"]["p50"] > 0 and r["preemptions"] == 0
        assert r["backend"]["running_max"] >= 1 and r["backend"]["waiting_mean"] is not None
        assert "clients" in r["cpu_share"] and "sim" in r["cpu_share"]
    assert "gateway" not in runs[0]["cpu_share"] and "vs_direct" not in runs[0]
    for r in runs[1:]:
        assert r["vs_direct"]["output_tokens_per_s"] > 0
    assert len(lines) == 3 and lines[1].split()[:2] == ["4096", "default"]
    assert HEADER.split()[:2] == ["context", "path"]


def test_requests_are_what_sdk_users_send() -> None:
    first = prompt_stream(42, 3, (100, 1500))
    again = prompt_stream(42, 3, (100, 1500))
    prompts = [first() for _ in range(20)]
    assert prompts == [again() for _ in range(20)]  # the same on every path
    assert all(100 <= len(p.split()) <= 1500 for p in prompts)
    body = json.loads(chat_body(prompts[0]))
    assert body["stream"] is True and body["messages"][0]["content"] == prompts[0]
    assert "max_tokens" not in body and "ignore_eos" not in body


def test_gateway_config_sets_kv_admission_only_when_named() -> None:
    (default,) = gateway_config("http://sim", "default", 64)["backends"]
    assert "kv_admission" not in default and "adaptive" not in default
    assert "max_kv_tokens" not in default and "max_model_len" not in default  # discovered
    assert default["max_num_seqs"] == 64
    assert gateway_config("http://sim", "peak", 64)["backends"][0]["kv_admission"] == "peak"
    assert gateway_config("http://sim", "adaptive", 64)["backends"][0]["adaptive"] is True
    cfg = gateway_config("http://sim", "reserve", 64)
    assert len(cfg["tenants"]) == 4 and cfg["scheduler"]["policy"] == "vtc"


def test_cli_registers_bench_parity(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench", "parity", "--context", "32768,131072", "--modes", "default,peak"]
    )
    assert args.context == (32768, 131072) and args.modes == "default,peak"
    assert args.clients == 96 and args.duration == 50 and args.warmup == 10
    assert args.out == "bench-results/parity.json"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "parity", "--prompt-words", "9-1"])
