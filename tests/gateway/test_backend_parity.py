"""The gateway answers as the backend behind it would (here the simulator, which mirrors vLLM
0.32; tests/vllm checks the same against real vLLM)."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestServer

from backends.sim.config import SimConfig
from backends.sim.server import SimServer
from gateway.config import parse_config
from gateway.server import STATE, create_app
from tools.procs import free_port

from .conftest import MODEL, gateway_stack, wait_for

A = {"Authorization": "Bearer key-a"}


def _shape(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return None


async def test_context_rule_errors_and_bodies_match_the_backend() -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"prompt": [7] * 2000, "max_tokens": 100, "ignore_eos": True}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2049}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2049},
        ),
        ("/v1/completions", {"prompt": [7] * 2049, "max_tokens": 1}),
        ("/v1/completions", {"prompt": [7] * 2048, "max_tokens": 1}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        ),
        ("/v1/completions", {"prompt": "hello", "max_tokens": 5}),
    ]
    async with gateway_stack(sim={"max_model_len": 2048}) as stack:
        async with httpx.AsyncClient(timeout=30) as http:
            sim_url = stack.sims[0].url
            for path, extra in cases:
                body = {"model": MODEL, **extra}
                direct = await http.post(sim_url + path, json=body)
                via = await http.post(stack.url + path, json=body, headers=A)
                assert via.status_code == direct.status_code, (extra, via.text)
                if direct.status_code == 200:
                    assert _shape(via.json()) == _shape(direct.json())
                    assert list(via.json()) == list(direct.json())
                    assert via.json()["usage"] == direct.json()["usage"]
                else:
                    assert via.json() == direct.json()
            body = {"model": "nope", "prompt": "x"}
            direct = await http.post(sim_url + "/v1/completions", json=body)
            via = await http.post(stack.url + "/v1/completions", json=body, headers=A)
            assert via.status_code == 404 and via.json() == direct.json()
            assert "Valid aliases: sim-llama-3-8b." in via.json()["error"]["message"]
        # the capped request ran: 2048 - 2000 = 48 tokens reserved, generated and charged
        assert stack.state.admission.in_flight() == 0


async def test_n_above_one_reaches_the_backend_and_gets_its_answer() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(timeout=30) as http:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 2}
        direct = await http.post(stack.sims[0].url + "/v1/completions", json=body)
        via = await http.post(stack.url + "/v1/completions", json=body, headers=A)
        assert (via.status_code, via.json()) == (direct.status_code, direct.json())
        assert stack.state.dispatcher.core.pool(MODEL).counter("a") == 0  # refused: nothing charged


async def test_client_disconnects_mid_stream_log_no_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR)
    async with gateway_stack(sim={"speed": 0}) as stack, httpx.AsyncClient(timeout=30) as http:
        for i in range(20):
            async with http.stream(
                "POST",
                stack.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": f"p{i}",
                    "max_tokens": 5000,
                    "stream": True,
                    "ignore_eos": True,
                },
                headers=A,
            ) as r:
                n = 0
                async for _ in r.aiter_bytes():
                    n += 1
                    if n > i % 5:
                        break
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_backend_restarted_with_another_kv_size_is_discovered_again() -> None:
    port = free_port()
    raw = {
        "backends": [{"name": "sim", "url": f"http://127.0.0.1:{port}"}],
        "tenants": [{"name": "a", "api_keys": ["key-a"]}],
        "limits": {"health_interval_s": 0.05},
    }
    async with SimServer(SimConfig(port=port, kv_cache_tokens=4096, max_model_len=2048)):
        app = create_app(parse_config(raw))
        server = TestServer(app, handler_cancellation=True)
        await server.start_server()
    try:
        slots = app[STATE].pool.states["sim"].slots
        await wait_for(lambda: not slots.healthy, 10)  # the backend stopped
        assert slots.max_kv_tokens == 4096 - 16  # one block is vLLM's null block
        async with SimServer(SimConfig(port=port, kv_cache_tokens=8192, max_model_len=4096)):
            await wait_for(lambda: slots.healthy and slots.max_kv_tokens == 8192 - 16, 10)
            assert app[STATE].pool.max_model_len(MODEL) == 4096
    finally:
        await server.close()
