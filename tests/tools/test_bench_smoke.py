"""``vtc-gateway bench proxy`` machinery on a tiny setting: the JSON shape, no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench import ProxyOptions, proxy_benchmark, register

pytestmark = pytest.mark.timeout(60)


async def test_tiny_proxy_benchmark_produces_every_path_and_check(tmp_path: Path) -> None:
    opts = ProxyOptions(
        concurrency=(2,),
        max_tokens=8,
        first_token_concurrency=(2,),
        policies=("vtc",),
        duration=0.6,
        warmup=0.2,
        max_requests=5000,
        pin=False,
        wc_concurrency=4,
        wc_duration=1.0,
        queued=20,
    )
    lines: list[str] = []
    results = await proxy_benchmark(opts, log=lines.append)
    json.dumps(results)  # JSON-ready
    rows = results["proxy"]
    assert [(r["scenario"], r["path"]) for r in rows] == [
        ("stream", "direct"),
        ("stream", "vtc"),
        ("first_token", "direct"),
        ("first_token", "vtc"),
    ]
    for r in rows:
        assert r["errors"] == {} and r["bad_token_counts"] == 0
        assert r["requests"] > 0 and r["tokens_per_s"] > 0
        assert set(r["ttft_ms"]) == {"p50", "p99", "n"}
        assert set(r["itl_ms"]) == {"p50", "p99", "n"}
        assert "client" in r["cpu_share"]
        if r["path"] != "direct":
            assert r["gateway"]["rss_kib"] > 0 and r["gateway"]["cpu_s_per_mtok"] is not None
            assert r["vs_direct"]["tokens_per_s"] is not None
    wc = results["work_conservation"]
    assert wc["direct"]["tokens_per_s"] > 0 and wc["ratio"] is not None
    mem = results["memory"]
    assert mem["queued"] > 0 and mem["bytes_per_queued_request"] is not None
    assert len(lines) == len(rows) + 2
    assert results["meta"]["pinned"] == {"gateway": None, "sim_and_load": None}


def test_cli_registers_bench_proxy() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "proxy", "--concurrency", "1,64", "--duration", "5"])
    assert args.concurrency == (1, 64) and args.duration == 5.0 and args.pin is True
