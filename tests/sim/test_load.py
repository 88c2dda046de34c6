"""Behaviour under load through HTTP: disconnects, saturation, FCFS, speed, engine failure."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from backends.sim.server import SimServer

from .conftest import parse_sse, sim_config, wait_until


def _body(max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "hello there",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }


async def test_disconnect_aborts_and_frees_kv() -> None:
    async with (
        SimServer(sim_config(speed=1.0)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10.0) as http,
    ):
        for _ in range(3):  # streaming requests, closed after the first chunk
            async with http.stream("POST", "/v1/completions", json=_body(1000)) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        break
                assert srv.core.num_running == 1 and srv.core.kv_used_tokens > 0
        await wait_until(
            lambda: srv.core.num_running == 0 and srv.core.num_waiting == 0,
            what="aborted requests to leave the engine",
        )
        assert srv.core.kv_used_tokens == 0

        # Non-streaming request whose client gives up (timeout closes the connection).
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=_body(1000, stream=False), timeout=0.3)
        await wait_until(lambda: srv.core.num_running == 0, what="non-stream abort")
        assert srv.core.kv_used_tokens == 0
        metrics = (await http.get("/metrics")).text
        abort = next(
            ln
            for ln in metrics.splitlines()
            if ln.startswith("vllm:request_success_total") and "abort" in ln
        )
        assert float(abort.split()[-1]) == 4


async def test_saturation_waiting_metric_and_fcfs_order() -> None:
    async with (
        SimServer(sim_config(speed=5.0, max_num_seqs=1)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=20.0) as http,
    ):
        order: list[int] = []

        async def one(i: int) -> None:
            r = await http.post("/v1/completions", json=_body(15, stream=False))
            assert r.status_code == 200
            order.append(i)

        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(one(i)))
            # Submit strictly in order: wait until the engine holds request i.
            queued = i + 1

            def holds_all(n: int = queued) -> bool:
                return srv.core.num_running + srv.core.num_waiting == n or len(order) > 0

            await wait_until(holds_all, what=f"request {i} queued")
        metrics = (await http.get("/metrics")).text
        waiting = next(
            ln for ln in metrics.splitlines() if ln.startswith("vllm:num_requests_waiting{")
        )
        assert float(waiting.split()[-1]) > 0
        await asyncio.gather(*tasks)
        assert order == [0, 1, 2, 3, 4]


async def _timed_request(http: httpx.AsyncClient, tokens: int) -> float:
    t0 = time.perf_counter()
    r = await http.post("/v1/completions", json=_body(tokens, stream=False))
    assert r.status_code == 200
    return time.perf_counter() - t0


async def test_speed_scales_wall_time() -> None:
    durations = {}
    for speed in (2.0, 8.0):
        async with (
            SimServer(sim_config(speed=speed, profile="a100-llama3-8b")) as srv,
            httpx.AsyncClient(base_url=srv.url, timeout=20.0) as http,
        ):
            await _timed_request(http, 2)  # warm-up
            durations[speed] = await _timed_request(http, 60)
            stats = srv.engine.stats()
            assert stats.sim_time > 0
    # 61 steps of >= 10.5 ms simulated: ~0.32 s at 2x, ~0.08 s at 8x.
    ratio = durations[2.0] / durations[8.0]
    assert 2.5 < ratio < 5.5, durations
    assert durations[2.0] > 0.3


async def test_no_delay_mode_is_fast() -> None:
    async with (
        SimServer(sim_config(speed=0.0)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=20.0) as http,
    ):
        t = await _timed_request(http, 1500)
        assert t < 3.0
        assert srv.engine.stats().planned_wall == 0.0


async def test_engine_failure_mid_stream_is_an_sse_error() -> None:
    async with (
        SimServer(sim_config(speed=1.0)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10.0) as http,
    ):
        real_step = srv.core.step
        calls = 0

        def flaky(now: float) -> Any:
            nonlocal calls
            calls += 1
            if calls > 3:
                raise RuntimeError("boom")
            return real_step(now)

        srv.core.step = flaky  # type: ignore[method-assign]
        r = await http.post("/v1/completions", json=_body(50))
        events = parse_sse(r.text)
        assert r.status_code == 200
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 500
        assert all("choices" in e for e in events[:-2])
        assert (await http.get("/health")).status_code == 503
        r = await http.post("/v1/completions", json=_body(5, stream=False))
        assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
