"""The real ``vtc-gateway serve`` process: embedded default, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx
import yaml

from backends.sim.config import SimConfig
from backends.sim.server import SimServer

from .conftest import MODEL, gateway_process


def _config(
    tmp_path: Path, sim_url: str, backend: dict[str, Any] | None = None, **extra: Any
) -> Path:
    """A gateway config file: the simulated backend and tenant ``a`` (key ``key-a``)."""
    cfg = tmp_path / "gw.yaml"
    raw = {
        "backends": [{"name": "sim", "url": sim_url, **(backend or {})}],
        "tenants": [{"name": "a", "api_keys": ["key-a"]}],
        **extra,
    }
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


async def test_serve_without_config_runs_embedded_sim_and_exits_0_on_sigterm() -> None:
    async with gateway_process() as (proc, url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["role"] == "assistant"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_sigterm_lets_running_stream_finish_and_answers_queue_503(tmp_path: Path) -> None:
    async with SimServer(SimConfig(port=0, speed=1.0)) as sim:
        cfg = _config(
            tmp_path, sim.url, backend={"max_num_seqs": 1}, limits={"shutdown_timeout_s": 20}
        )
        async with gateway_process("--config", str(cfg)) as (proc, url):
            hdr = {"Authorization": "Bearer key-a"}
            body = {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 1000,
                "ignore_eos": True,
                "stream": True,
            }
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                async with http.stream("POST", "/v1/completions", json=body, headers=hdr) as run:
                    assert run.status_code == 200
                    lines = run.aiter_lines()
                    first = await anext(lines)  # the stream is running on the only slot
                    assert first.startswith("data: {")
                    queued = asyncio.create_task(
                        http.post("/v1/completions", json=body, headers=hdr)
                    )
                    for _ in range(1000):  # until the gateway reports it queued (bounded)
                        metrics = (await http.get("/metrics")).text
                        if 'vtc_tenant_queued{tenant="a"} 1.0' in metrics or queued.done():
                            break
                    proc.send_signal(signal.SIGTERM)
                    rest = [line async for line in lines if line]
                    assert rest[-1] == "data: [DONE]"
                    assert sum(1 for x in rest if x.startswith("data: {")) == 999
                    refused = await queued
                    assert refused.status_code == 503
                    assert "shutting down" in refused.json()["error"]["message"]
            assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_admin_listener_serves_metrics_and_health_privately(tmp_path: Path) -> None:
    async with SimServer(SimConfig(port=0, speed=0)) as sim:
        cfg = _config(tmp_path, sim.url, listen={"admin_port": 0})
        async with gateway_process("--config", str(cfg)) as (proc, url):
            assert proc.stdout is not None
            admin = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()[-1]
            async with httpx.AsyncClient(timeout=30) as http:
                public = await http.get(url + "/metrics")
                assert public.status_code == 404
                assert public.json()["error"]["code"] == 404
                assert (await http.get(url + "/health")).status_code == 404
                assert (await http.get(admin + "/health")).json()["status"] == "ok"
                assert "vtc_backend_up" in (await http.get(admin + "/metrics")).text
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_idle_and_slow_header_connections_are_closed(tmp_path: Path) -> None:
    async with SimServer(SimConfig(port=0, speed=0)) as sim:
        cfg = _config(tmp_path, sim.url, limits={"idle_timeout_s": 1})
        async with gateway_process("--config", str(cfg)) as (proc, url):
            host, port = url.removeprefix("http://").split(":")
            idle = [await asyncio.open_connection(host, int(port)) for _ in range(1000)]
            slow_r, slow_w = await asyncio.open_connection(host, int(port))
            slow_w.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                r = await http.post(
                    "/v1/completions",
                    headers={"Authorization": "Bearer key-a"},
                    json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                )
                assert r.status_code == 200  # served while 1,001 connections sit open

            async def closed(reader: asyncio.StreamReader) -> bool:
                return await asyncio.wait_for(reader.read(), 30) == b""

            async def trickle() -> bool:  # a header byte now and then does not keep it open
                for _ in range(200):
                    if slow_r.at_eof():
                        return True
                    slow_w.write(b"X")
                    try:
                        if await asyncio.wait_for(slow_r.read(), 0.2) == b"":
                            return True
                    except ConnectionResetError:
                        return True  # closed by the gateway while we were still writing
                    except TimeoutError:
                        pass
                return False

            assert all(await asyncio.gather(*(closed(r) for r, _ in idle)))
            assert await trickle()
            for _, w in [*idle, (slow_r, slow_w)]:
                w.close()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
