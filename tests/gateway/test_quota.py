"""A backend with a rate budget (a hosted API's tokens and requests per minute)."""

from __future__ import annotations

import asyncio

import httpx
from aiohttp.test_utils import TestServer

from gateway.backend_pool import retry_after
from gateway.config import parse_config
from gateway.errors import BackendRejected
from gateway.server import STATE, GatewayState, create_app
from gateway.upstream.fake import FakeBackend, FakeReply, FakeUpstream

from .conftest import MODEL, tenants, wait_for

A = {"Authorization": "Bearer key-a"}
LIMITED = {
    "error": {
        "message": "Rate limit reached for tokens",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}


def test_retry_after_prefers_milliseconds_and_is_bounded() -> None:
    assert retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "soon"}) == 1.0
    assert retry_after({}) == 1.0
    assert retry_after({"retry-after": "3600"}) == 60.0


async def _gateway(fake: FakeUpstream, **backend: object) -> tuple[TestServer, GatewayState]:
    raw = {
        "backends": [{"name": "p", "url": "http://p", "kind": "openai", **backend}],
        "tenants": tenants(("a", 1), ("b", 1)),
        "limits": {"health_interval_s": 60},
    }
    app = create_app(parse_config(raw), upstream=fake)
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    return server, app[STATE]


async def test_a_providers_429_is_not_the_clients_problem() -> None:
    """The provider refuses the first attempt: the client still gets its answer, the budget
    paused for Retry-After, the refused attempt was charged and booked nothing."""
    fake = FakeUpstream({"http://p": FakeBackend(models={MODEL: 4096})})
    refused = BackendRejected(429, LIMITED, {"retry-after-ms": "200"})
    fake.backend("http://p").script(FakeReply(fail=refused), FakeReply(tokens=4))
    server, state = await _gateway(fake, tpm=10_000)
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "stream": False}
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=30) as http:
            r = await http.post("/v1/completions", json=body, headers=A)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        st = state.pool.states["p"]
        assert [c.ended for c in fake.calls] == ["failed", "done"]
        assert st.rate_limited == 1
        quota = st.slots.quota
        assert quota is not None
        assert quota.requests == 1  # the refused attempt left no booking
        assert quota.used == 5 + 4  # the fake's prompt count + the output
        await wait_for(lambda: state.admission.in_flight() == 0)
        pool = state.dispatcher.core.pool(MODEL)
        assert pool.service("a") == 1 * 5 + 2 * 4  # charged once, for the attempt that ran
    finally:
        await server.close()


async def test_a_refused_request_waits_for_the_back_off_and_the_order_goes_on() -> None:
    """While the budget is paused nothing is sent; then the queue drains in the fair order."""
    fake = FakeUpstream({"http://p": FakeBackend(models={MODEL: 4096})})
    refused = BackendRejected(429, LIMITED, {"retry-after": "0.3"})
    fake.backend("http://p").script(FakeReply(fail=refused))
    server, state = await _gateway(fake, rpm=1000)
    try:
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "stream": False}
        async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/completions", json=body, headers=A))
            st = state.pool.states["p"]
            await wait_for(lambda: st.rate_limited == 1)
            later = [
                asyncio.create_task(
                    http.post("/v1/completions", json=body, headers={"Authorization": k})
                )
                for k in ("Bearer key-b", "Bearer key-a")
            ]
            await wait_for(lambda: state.dispatcher.core.total_queued() == 3)
            assert len(fake.calls) == 1  # paused: nothing more went out
            answers = await asyncio.gather(first, *later)
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert len(fake.calls) == 4
    finally:
        await server.close()
