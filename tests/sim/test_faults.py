"""Fault injection: per request (header) and per server (config)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from backends.sim.faults import FaultInjector, FaultSpec, parse_fault
from backends.sim.server import SimServer

from .conftest import parse_sse, sim_config, wait_until


def _body(stream: bool = True, max_tokens: int = 8) -> dict[str, Any]:
    return {"prompt": "fault", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}


def test_parse_fault() -> None:
    assert parse_fault("slow_first;delay=0.5") == FaultSpec("slow_first", delay=0.5)
    assert parse_fault(" drop_mid ; p=0.2 ; after=4 ") == FaultSpec("drop_mid", 0.2, 4)
    for bad in ("", "explode", "drop_mid;after=-1", "drop_mid;p=2", "drop_mid;x=1", "drop_mid;p"):
        with pytest.raises(ValueError):
            parse_fault(bad)


def test_injector_probability_and_header_override() -> None:
    inj = FaultInjector((FaultSpec("error_500", probability=0.5),), seed=1)
    picks = [inj.pick(None) for _ in range(400)]
    assert 120 < sum(p is not None for p in picks) < 280
    assert inj.pick("none") is None
    assert inj.pick("refuse") == FaultSpec("refuse")


async def test_refuse_closes_without_answer(srv: SimServer, http: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post("/v1/completions", json=_body(), headers={"X-Sim-Fault": "refuse"})
    assert srv.core.num_running == 0 and srv.core.num_waiting == 0


async def test_error_500(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json=_body(), headers={"X-Sim-Fault": "error_500"})
    assert r.status_code == 500
    assert r.json()["error"] == {
        "message": "injected fault: error_500",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }


async def test_drop_mid(srv: SimServer, http: httpx.AsyncClient) -> None:
    events = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST", "/v1/completions", json=_body(), headers={"X-Sim-Fault": "drop_mid;after=3"}
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
    assert len(events) == 3
    await wait_until(lambda: srv.core.num_running == 0, what="dropped request aborted")


async def test_stall_mid(srv: SimServer, http: httpx.AsyncClient) -> None:
    events = []
    with pytest.raises(httpx.ReadTimeout):
        async with http.stream(
            "POST",
            "/v1/completions",
            json=_body(max_tokens=50),
            headers={"X-Sim-Fault": "stall_mid;after=2"},
            timeout=httpx.Timeout(5.0, read=0.5),
        ) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line)
    assert len(events) == 2
    assert srv.core.num_running == 0  # the engine request was released at the stall


async def test_slow_first(http: httpx.AsyncClient) -> None:
    t0 = time.perf_counter()
    r = await http.post(
        "/v1/completions", json=_body(max_tokens=2), headers={"X-Sim-Fault": "slow_first;delay=0.4"}
    )
    assert r.status_code == 200 and time.perf_counter() - t0 >= 0.4
    assert parse_sse(r.text)[-1] == "[DONE]"


async def test_malformed_sse(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 6,
            "ignore_eos": True,
            "stream": True,
        },
        headers={"X-Sim-Fault": "malformed_sse;after=2"},
    )
    blocks = [b for b in r.text.split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    bad = [b for b in blocks if not b.startswith('data: {"id":"chatcmpl-') and b != blocks[-1]]
    assert len(bad) == 1
    assert len(blocks) == 1 + 6 + 1 + 1  # role, 6 tokens, garbage, [DONE]


async def test_error_mid(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/completions", json=_body(), headers={"X-Sim-Fault": "error_mid;after=2"}
    )
    events = parse_sse(r.text)
    assert r.status_code == 200 and len(events) == 4
    assert events[2]["error"]["code"] == 500 and events[3] == "[DONE]"


async def test_bad_header_is_400(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json=_body(), headers={"X-Sim-Fault": "explode"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Sim-Fault"


async def test_server_wide_fault_and_header_none() -> None:
    cfg = sim_config(faults=(FaultSpec("error_500"),))
    async with SimServer(cfg) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/v1/completions", json=_body(stream=False))
        assert r.status_code == 500
        r = await http.post(
            "/v1/completions", json=_body(stream=False), headers={"X-Sim-Fault": "none"}
        )
        assert r.status_code == 200


async def test_non_stream_faults(http: httpx.AsyncClient) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(
            "/v1/completions", json=_body(stream=False), headers={"X-Sim-Fault": "drop_mid;after=2"}
        )
    r = await http.post(
        "/v1/completions", json=_body(stream=False), headers={"X-Sim-Fault": "malformed_sse"}
    )
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    r = await http.post(
        "/v1/completions", json=_body(stream=False), headers={"X-Sim-Fault": "error_mid;after=1"}
    )
    assert r.status_code == 500
