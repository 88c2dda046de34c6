"""Backend kinds (``backends[].kind``): what the gateway asks of a vLLM engine and of any other
OpenAI-compatible server, end to end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import parse_config
from gateway.engines import ENGINE_KINDS, KvCache, engine_for
from gateway.engines.vllm import VllmEngine
from gateway.server import STATE, create_app
from gateway.upstream.fake import FakeBackend, FakeUpstream

from .conftest import MODEL, gateway_stack, tenants, wait_for

A = {"Authorization": "Bearer key-a"}
METRICS = (
    'vllm:num_requests_waiting{model_name="m"} 3\n'
    'vllm:num_requests_running{model_name="m"} 5\n'
    "vllm:num_preemptions_total 7\n"
    "vllm:kv_cache_usage_perc 0.25\n"
    'vllm:cache_config_info{block_size="32",num_gpu_blocks="81"} 1.0\n'
)


def test_engines_by_kind() -> None:
    assert set(ENGINE_KINDS) == {"vllm", "openai"}
    vllm, plain = engine_for("vllm"), engine_for("openai")
    assert (vllm.has_metrics, vllm.has_tokenize, vllm.continuous_usage) == (True, True, True)
    assert (plain.has_metrics, plain.has_tokenize, plain.continuous_usage) == (False,) * 3
    assert (vllm.health_path, plain.health_path) == ("/health", "/v1/models")
    load = VllmEngine().load(METRICS)
    assert load is not None
    assert (load.waiting, load.running, load.preemptions_total) == (3, 5, 7)
    assert (load.kv_usage, load.block_size) == (0.25, 32)
    assert VllmEngine().kv_cache(METRICS) == KvCache(80 * 32, 32)
    assert VllmEngine().kv_cache("vllm:num_requests_running 1\n") is None
    assert VllmEngine().load("other_metric 1\n") is None
    with pytest.raises(ValueError, match="unknown backend kind"):
        engine_for("tgi")


async def _gateway(fake: FakeUpstream, kind: str, **backend: Any) -> tuple[TestServer, Any]:
    raw = {
        "backends": [{"name": "b0", "url": "http://b0", "kind": kind, **backend}],
        "tenants": tenants(("a", 1), ("b", 1)),
        "tokenizer": "backend",
        "limits": {"health_interval_s": 60, "feedback_interval_s": 60},
    }
    app = create_app(parse_config(raw), upstream=fake)
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    return server, app[STATE]


@pytest.mark.parametrize("kind", ["vllm", "openai"])
async def test_what_the_gateway_asks_of_each_kind(kind: str) -> None:
    fake = FakeUpstream({"http://b0": FakeBackend(models={MODEL: 4096}, metrics=METRICS)})
    fake.backend("http://b0").tokenize_count = 11
    server, state = await _gateway(fake, kind, max_num_seqs=4)
    try:
        await state.pool.check_once()
        await state.pool.feedback_once()
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 3, "stream": True}
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=30) as http:
            r = await http.post("/v1/completions", json=body, headers=A)
        assert r.status_code == 200
        sent = fake.calls[-1].body
        slots = state.pool.states["b0"].slots
    finally:
        await server.close()
    paths = {path for _, path in fake.probes}
    if kind == "vllm":
        assert paths == {"/metrics", "/health", "/tokenize"}
        assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
        assert slots.max_kv_tokens == 80 * 32 and slots.block_size == 32  # from its metrics
        assert slots.kv_scale < 1.0  # 3 waiting while 5 run: feedback took the budget down
    else:  # nothing but the model list and the requests themselves
        assert paths == {"/v1/models"}
        assert sent["stream_options"] == {"include_usage": True}
        assert slots.max_kv_tokens == 4 * 4096  # from the config: max_num_seqs x context


async def test_an_openai_backend_end_to_end_with_capacity_from_the_config() -> None:
    """The simulated backend as a plain OpenAI-compatible server: 2 requests at once (the
    config's max_num_seqs), the others wait in the fair queue; output charged from the
    streamed text, reconciled with the final usage."""
    peak = 0
    async with gateway_stack(
        backend={"kind": "openai", "max_num_seqs": 2}, sim={"speed": 20.0}
    ) as stack:
        admission = stack.state.admission
        reserve = admission.reserve

        def counting_reserve(*args: Any, **kw: Any) -> Any:
            nonlocal peak
            out = reserve(*args, **kw)
            peak = max(peak, admission.in_flight())
            return out

        admission.reserve = counting_reserve  # type: ignore[method-assign]
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "ignore_eos": True}

        async def one(http: httpx.AsyncClient, key: str) -> int:
            r = await http.post(
                "/v1/completions", json={**body, "stream": True}, headers={"Authorization": key}
            )
            assert r.status_code == 200
            last = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
            return sum(len(c["choices"][0]["text"].split()) for c in last if c["choices"])

        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            words = await asyncio.gather(*(one(http, f"Bearer key-{t}") for t in "abababab"))
        assert words == [20] * 8
        assert peak == 2
        await wait_for(lambda: admission.in_flight() == 0)
        pool = stack.state.dispatcher.core.pool(MODEL)
        assert pool.service("a") == pool.service("b")  # same work, reconciled exactly
        assert stack.sims[0].core.generated_tokens == 8 * 20


async def test_a_failing_openai_backend_is_probed_on_its_model_list() -> None:
    fake = FakeUpstream({"http://b0": FakeBackend(models={MODEL: 4096})})
    server, state = await _gateway(fake, "openai")
    try:
        fake.backend("http://b0").healthy = False
        await state.pool.check_once()
        assert not state.pool.states["b0"].slots.healthy
        assert fake.probes[-1] == ("http://b0", "/v1/models")
        fake.backend("http://b0").healthy = True
        await state.pool.check_once()
        assert state.pool.states["b0"].slots.healthy
    finally:
        await server.close()
