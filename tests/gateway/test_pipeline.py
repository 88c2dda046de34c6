"""The request pipeline on the in-process fake transport: no backend server, scripted replies,
an injected clock. What the client sees, what is charged, what the backend saw."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp.test_utils import TestServer

from gateway.config import parse_config
from gateway.errors import BackendRejected, BackendUnreachable
from gateway.server import STATE, GatewayState, create_app
from gateway.upstream.fake import FakeBackend, FakeReply, FakeUpstream
from tests.gateway.conftest import tenants, wait_for
from tests.observability.conftest import parse, value

MODEL = "fake-model"
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Gateway:
    http: httpx.AsyncClient
    state: GatewayState
    fake: FakeUpstream

    async def metrics(self) -> dict[Any, float]:
        return parse((await self.http.get("/metrics")).text)


@contextlib.asynccontextmanager
async def gateway(
    fake: FakeUpstream | None = None,
    *,
    clock: Clock | None = None,
    backends: int = 1,
    backend: dict[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[Gateway]:
    """A gateway in front of ``backends`` fake backends (``http://b0``, ``http://b1``, ...)."""
    fake = fake or FakeUpstream()
    entries = [{"name": f"b{i}", "url": f"http://b{i}", **(backend or {})} for i in range(backends)]
    for e in entries:
        fake.backend(e["url"])
    raw = {"backends": entries, "tenants": tenants(("a", 1), ("b", 1)), **config}
    raw.setdefault("limits", {"health_interval_s": 60})
    app = create_app(parse_config(raw), upstream=fake, clock=clock or Clock())
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    try:
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=30) as http:
            yield Gateway(http, app[STATE], fake)
    finally:
        await server.close()


def completion(max_tokens: int, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": stream, **extra}


def events(text: str) -> list[Any]:
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def settled(gw: Gateway) -> bool:
    return gw.state.admission.in_flight() == 0 and gw.state.dispatcher.core.total_queued() == 0


async def test_stream_is_relayed_and_charged_with_the_backends_own_counts() -> None:
    async with gateway() as gw:
        gw.fake.backend("http://b0").script(FakeReply(tokens=5, prompt_tokens=9))
        body = completion(5, stream_options={"include_usage": True})
        r = await gw.http.post("/v1/completions", json=body, headers=A)
        assert r.status_code == 200
        got = events(r.text)
        assert [e["choices"][0]["text"] for e in got[:5]] == ["tok "] * 5
        assert got[5]["choices"] == [] and got[5]["usage"]["completion_tokens"] == 5
        assert got[6:] == ["[DONE]"]
        assert all("usage" in e and e["usage"] is None for e in got[:5])  # as the client asked
        # the backend saw the gateway's own stream options, the client's fields untouched
        (call,) = gw.fake.calls
        assert call.path == "/v1/completions" and call.ended == "done"
        assert call.body["stream_options"] == {
            "include_usage": True,
            "continuous_usage_stats": True,
        }
        assert call.body["prompt"] == "hello" and call.body["max_tokens"] == 5
        assert settled(gw)
        # reconciled to the backend's prompt count (9), not the gateway's estimate
        assert gw.state.dispatcher.core.pool(MODEL).counter("a") == 9 + 2 * 5
        s = await gw.metrics()
        assert value(s, "vtc_requests_total", tenant="a", outcome="ok") == 1


async def test_non_streaming_chat_is_assembled_from_the_stream() -> None:
    async with gateway() as gw:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = await gw.http.post("/v1/chat/completions", json=body, headers=A)
        assert r.status_code == 200
        answer = r.json()
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"] == "tok tok tok "
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 3
        assert gw.fake.calls[0].path == "/v1/chat/completions"


async def test_a_backend_that_refuses_is_left_for_the_next_one() -> None:
    async with gateway(backends=2) as gw:
        # equal load: the first configured backend is placed first
        gw.fake.backend("http://b0").script(FakeReply(fail=BackendUnreachable("down")))
        r = await gw.http.post("/v1/completions", json=completion(2, stream=False), headers=A)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert [(c.url, c.ended) for c in gw.fake.calls] == [
            ("http://b0", "failed"),
            ("http://b1", "done"),
        ]
        assert gw.state.pool.states["b0"].errors == {"unreachable": 1}
        assert gw.state.pool.states["b1"].errors == {}
        assert settled(gw)


async def test_a_backend_rejection_reaches_the_client_and_is_refunded() -> None:
    async with gateway() as gw:
        err = {"message": "bad logit_bias", "type": "BadRequestError", "param": None, "code": 422}
        gw.fake.backend("http://b0").script(FakeReply(fail=BackendRejected(422, {"error": err})))
        r = await gw.http.post("/v1/completions", json=completion(4), headers=A)
        assert r.status_code == 422 and r.json() == {"error": err}
        assert gw.state.dispatcher.core.pool(MODEL).counter("a") == 0
        assert gw.state.pool.states["b0"].failures == 0  # the backend is fine
        s = await gw.metrics()
        assert value(s, "vtc_requests_total", tenant="a", outcome="rejected_invalid") == 1


async def test_a_broken_stream_ends_in_an_sse_error_and_charges_what_was_sent() -> None:
    async with gateway() as gw:
        gw.fake.backend("http://b0").script(FakeReply(tokens=10, prompt_tokens=4, break_after=3))
        r = await gw.http.post("/v1/completions", json=completion(10), headers=A)
        assert r.status_code == 200
        got = events(r.text)
        assert len(got) == 5 and got[-1] == "[DONE]"
        assert got[3]["error"]["code"] == 502
        assert settled(gw)
        assert gw.state.dispatcher.core.pool(MODEL).counter("a") == 4 + 2 * 3
        assert gw.state.pool.states["b0"].errors == {"stream_broken": 1}
        s = await gw.metrics()
        assert value(s, "vtc_requests_total", tenant="a", outcome="backend_error") == 1


async def test_a_client_that_leaves_mid_stream_aborts_the_upstream_request() -> None:
    endless = 10**7  # far more than the gateway could relay before the client's close lands
    fake = FakeUpstream({"http://b0": FakeBackend(models={MODEL: 2 * endless})})
    async with gateway(fake) as gw:
        req = gw.http.stream("POST", "/v1/completions", json=completion(endless), headers=A)
        async with req as r:
            assert r.status_code == 200
            lines = r.aiter_lines()
            while not (await anext(lines)).startswith("data: "):
                pass
        call = gw.fake.calls[0]
        await wait_for(lambda: call.ended == "aborted" and settled(gw))
        assert 0 < call.tokens_sent < endless
        s = await gw.metrics()
        assert value(s, "vtc_requests_total", tenant="a", outcome="client_cancelled") == 1


async def test_queue_wait_is_measured_on_the_injected_clock() -> None:
    clock = Clock()
    async with gateway(clock=clock, backend={"max_num_seqs": 1}) as gw:
        release = asyncio.Event()
        gw.fake.backend("http://b0").script(FakeReply(tokens=2, hold=release))
        first = asyncio.create_task(gw.http.post("/v1/completions", json=completion(2), headers=A))
        await wait_for(lambda: gw.state.admission.in_flight() == 1)
        second = asyncio.create_task(gw.http.post("/v1/completions", json=completion(2), headers=B))
        await wait_for(lambda: gw.state.dispatcher.core.total_queued() == 1)
        clock.now += 2.5
        release.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
        s = await gw.metrics()
        assert value(s, "vtc_queue_wait_seconds_sum", tenant="a") == 0
        assert value(s, "vtc_queue_wait_seconds_sum", tenant="b") == 2.5
        assert value(s, "vtc_e2e_request_latency_seconds_sum", tenant="b") == 2.5


async def test_the_rpm_window_runs_on_the_injected_clock() -> None:
    clock = Clock()
    async with gateway(clock=clock, scheduler={"policy": "rpm", "rpm_limit": 1}) as gw:
        post = lambda: gw.http.post("/v1/completions", json=completion(1), headers=A)  # noqa: E731
        assert (await post()).status_code == 200
        assert (await post()).status_code == 429
        clock.now += 61
        assert (await post()).status_code == 200


async def test_discovery_health_and_tokenize_go_through_the_transport() -> None:
    fake = FakeUpstream(
        {
            "http://b0": FakeBackend(models={"m1": 2048, "m2": None}, kv_capacity=5000),
            "http://b1": FakeBackend(down=BackendUnreachable("connection refused")),
        }
    )
    async with gateway(fake, backends=2, tokenizer="backend") as gw:
        models = (await gw.http.get("/v1/models", headers=A)).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("m1", 2048), ("m2", None)]
        health = (await gw.http.get("/health")).json()
        assert [(b["name"], b["up"], b["max_kv_tokens"]) for b in health["backends"]] == [
            ("b0", True, 5000),
            ("b1", False, 256 * 8192),
        ]
        # tokenizer "backend": the backend's count (42) is what the KV budget books
        fake.backend("http://b0").tokenize_count = 42
        release = asyncio.Event()
        fake.backend("http://b0").script(FakeReply(tokens=1, hold=release))
        body = {"model": "m1", "prompt": "hello", "max_tokens": 8}
        task = asyncio.create_task(gw.http.post("/v1/completions", json=body, headers=A))
        await wait_for(lambda: gw.state.admission.in_flight() == 1)
        assert gw.state.pool.states["b0"].slots.booked_tokens == 42 + 8
        release.set()
        assert (await task).status_code == 200
        unknown = await gw.http.post("/v1/completions", json=completion(1), headers=A)
        assert unknown.status_code == 404


async def test_adaptive_admission_reads_the_backends_metrics_through_the_transport() -> None:
    async with gateway(backend={"adaptive": True, "max_num_seqs": 8}) as gw:
        b0 = gw.fake.backend("http://b0")
        b0.metrics = 'vllm:num_requests_waiting{model_name="m"} 2\nvllm:num_requests_running 3\n'
        await gw.state.pool.feedback_once()
        assert gw.state.pool.states["b0"].slots.seq_cap == 3  # capped at what the backend runs
        b0.down = BackendUnreachable("gone")  # a failed metrics read changes nothing
        await gw.state.pool.feedback_once()
        assert gw.state.pool.states["b0"].slots.seq_cap == 3
