"""``vtc-gateway bench proxy`` machinery on a tiny setting: the JSON shape, no timings."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tools.bench import ProxyOptions, nginx_binary, proxy_benchmark, register

pytestmark = pytest.mark.timeout(60)

#: A tiny, unpinned setting: two streams of 8 tokens, the vtc gateway only.
TINY: dict[str, Any] = {
    "concurrency": (2,),
    "max_tokens": 8,
    "first_token_concurrency": (2,),
    "policies": ("vtc",),
    "duration": 0.6,
    "warmup": 0.2,
    "pin": False,
}


async def test_tiny_proxy_benchmark_produces_every_path_and_check(tmp_path: Path) -> None:
    opts = ProxyOptions(
        **TINY,
        max_requests=5000,
        wc_concurrency=4,
        wc_duration=1.0,
        queued=20,
        nginx=False,
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


async def test_nginx_reference_path_end_to_end_and_cleaned_up() -> None:
    if nginx_binary() is None:
        if os.environ.get("VTC_REQUIRE_NGINX"):
            pytest.fail("nginx is required (VTC_REQUIRE_NGINX=1) but not installed")
        pytest.skip("nginx not installed")
    opts = ProxyOptions(
        **{**TINY, "duration": 1.0, "warmup": 0.3},
        max_requests=2000,
        work_conservation=False,
        memory=False,
    )
    results = await proxy_benchmark(opts, log=lambda _: None)
    rows = results["proxy"]
    assert [(r["scenario"], r["path"]) for r in rows] == [
        (s, p) for s in ("stream", "first_token") for p in ("direct", "nginx", "vtc")
    ]
    for r in rows:  # every request through nginx delivered exactly its tokens
        assert r["errors"] == {} and r["bad_token_counts"] == 0
    for r in rows:
        if r["path"] == "nginx":  # measured like a gateway: its own process's CPU and memory
            assert r["gateway"]["rss_kib"] > 0 and "cpu_s_per_mtok" in r["gateway"]
            assert "vs_direct" in r and "vs_nginx" not in r
        elif r["path"] == "vtc":
            assert (
                set(r["vs_nginx"])
                == set(r["vs_direct"])
                >= {
                    "cpu_per_token",
                    "tokens_per_s",
                    "ttft_p50_added_ms",
                    "ttft_p99_added_ms",
                }
            )
    meta = results["meta"]["nginx"]
    assert meta["version"]
    assert_nginx_gone(meta["pid"], Path(meta["prefix"]))


def assert_nginx_gone(pid: int, prefix: Path) -> None:
    """No nginx process left under ``pid``, and its temp dir removed."""
    assert not prefix.exists()
    cmdline = Path(f"/proc/{pid}/cmdline")
    assert not cmdline.exists() or b"nginx" not in cmdline.read_bytes()


def test_cli_registers_bench_proxy() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "proxy", "--concurrency", "1,64", "--duration", "5"])
    assert args.concurrency == (1, 64) and args.duration == 5.0 and args.pin is True
    assert args.nginx is True and args.speed == 0.0
    args = parser.parse_args(["bench", "proxy", "--no-nginx", "--speed", "0.4"])
    assert args.nginx is False and args.speed == 0.4
