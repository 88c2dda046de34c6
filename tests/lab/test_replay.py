"""Replay: tenants files, exact-length prompts, streaming clients against fake and sim servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from common.tokenizer import TokenCounter
from gateway.lab.replay import PromptSynth, ReplayError, load_tenant_keys, replay_workload
from gateway.lab.workloads import ClosedClient, Workload, WorkloadRequest, load_workload


def test_tenants_file_as_mapping(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("alice: key-a\nbob: [key-b, key-b2]\n")
    assert load_tenant_keys(path) == ({"alice": "key-a", "bob": "key-b"}, {})
    path.write_text("alice: 3\n")
    with pytest.raises(ValueError, match="alice"):
        load_tenant_keys(path)


def test_tenants_file_as_gateway_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "tenants:\n"
        "  - {name: alice, weight: 2, api_keys: ['sha256:abcd', key-a]}\n"
        "  - {name: bob, api_keys: [key-b]}\n"
        "  - {name: hashed, api_keys: ['sha256:ef01']}\n"
    )
    keys, weights = load_tenant_keys(path)
    assert keys == {"alice": "key-a", "bob": "key-b"}
    assert weights == {"alice": 2.0}


@pytest.mark.parametrize("n", [1, 2, 7, 64, 256, 1021])
def test_prompts_have_exactly_n_tokens(n: int) -> None:
    synth = PromptSynth()
    counter = TokenCounter()
    assert counter.count_text(synth.text(n, seed=n)) == n
    chat = [{"role": "user", "content": synth.chat_text(n + 10, seed=n)}]
    assert counter.count_chat(chat) == n + 10
    assert synth.text(n, 1) != synth.text(n, 2) or n < 3


class FakeGateway:
    """Streams ``max_tokens`` completion chunks; key ``limited`` gets 429, ``broken`` an error."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, dict[str, object]]] = []
        self.counter = TokenCounter()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.seen.append((key, self.counter.count_text(body["prompt"]), body))
        if key == "limited":
            return web.json_response({"error": {"message": "slow down", "code": 429}}, status=429)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if key == "broken":
                await resp.write(b'data: {"error": {"message": "boom", "code": 500}}\n\n')
                break
        usage = {"prompt_tokens": self.seen[-1][1], "completion_tokens": n, "total_tokens": 0}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def fake_gateway() -> AsyncIterator[tuple[str, FakeGateway]]:
    fake = FakeGateway()
    app = web.Application()
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", fake
    finally:
        await runner.cleanup()


async def test_replay_sends_each_request_with_its_tenants_key(
    fake_gateway: tuple[str, FakeGateway],
) -> None:
    url, fake = fake_gateway
    wl = Workload(
        "tiny",
        2,
        {"alice": 1.0, "bob": 1.0, "carol": 1.0},
        [
            WorkloadRequest(0.0, "alice", 12, 3),
            WorkloadRequest(0.5, "bob", 30, 2),
            WorkloadRequest(1.0, "carol", 5, 4),
            WorkloadRequest(1.5, "alice", 7, 1),
        ],
    )
    keys = {"alice": "key-a", "bob": "limited", "carol": "broken"}
    done: list[int] = []
    records = await replay_workload(wl, url, keys, speed=20, progress=lambda d, t: done.append(d))
    assert done[-1] == 4
    assert [r.status for r in records] == ["ok", "rejected", "error", "ok"]
    assert sorted((k, n) for k, n, _ in fake.seen) == sorted(
        [("key-a", 12), ("limited", 30), ("broken", 5), ("key-a", 7)]
    )
    body = fake.seen[0][2]
    assert body["max_tokens"] == 3 and body["ignore_eos"] is True and body["stream"] is True
    assert body["model"] == "m"
    ok = records[0]
    assert ok.first_token_s is not None and ok.finish_s is not None
    assert 0 <= ok.arrival_s <= ok.first_token_s <= ok.finish_s
    assert (ok.prompt_tokens, ok.output_tokens) == (12, 3)
    # arrivals are kept in workload time: the last request was sent at ~1.5 s of workload time
    assert records[3].first_token_s is not None and records[3].first_token_s >= 1.5


async def test_replay_runs_closed_loop_clients_from_their_start_to_their_end(
    fake_gateway: tuple[str, FakeGateway],
) -> None:
    url, fake = fake_gateway
    bob = ClosedClient(
        "bob", concurrency=2, think=0.1, prompt_tokens=9, output_tokens=2, start=0.3, end=1.5
    )
    wl = Workload(
        "closed", 2, {"alice": 1.0, "bob": 1.0}, [WorkloadRequest(0.0, "alice", 12, 3)], [bob]
    )
    progress: list[tuple[int, int]] = []
    records = await replay_workload(
        wl,
        url,
        {"alice": "key-a", "bob": "key-b"},
        speed=10,
        progress=lambda d, t: progress.append((d, t)),
    )
    assert records[0].tenant == "alice" and records[0].status == "ok"
    closed = records[1:]  # the open-loop requests first, then the closed-loop ones by arrival
    assert len(closed) >= 4
    assert all(r.tenant == "bob" and r.status == "ok" for r in closed)
    assert all((r.prompt_tokens, r.output_tokens) == (9, 2) for r in closed)
    arrivals = [r.arrival_s for r in closed]
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0.3 and arrivals[-1] < 1.5
    assert [d for d, _ in progress] == list(range(1, len(records) + 1))
    assert progress[-1][1] == len(records)
    assert sorted(k for k, _, _ in fake.seen) == ["key-a"] + ["key-b"] * len(closed)
    assert all(
        body["model"] == "m" and body["max_tokens"] == 2 for k, _, body in fake.seen if k == "key-b"
    )


async def test_replay_refuses_missing_keys(fake_gateway: tuple[str, FakeGateway]) -> None:
    url, _ = fake_gateway
    wl = Workload("tiny", 1, {"a": 1.0}, [WorkloadRequest(0.0, "a", 3, 1)])
    with pytest.raises(ReplayError, match="no API key for tenant"):
        await replay_workload(wl, url, {"b": "x"})


async def test_replay_against_the_simulated_backend() -> None:
    sim = pytest.importorskip("backends.sim.server")
    from backends.sim.config import SimConfig

    config = SimConfig(port=0, speed=20, profile="a10g-llama2-7b", kv_cache_tokens=10_000)
    wl = load_workload("overload").truncated(6)
    async with sim.SimServer(config) as srv:
        records = await replay_workload(wl, srv.url, {}, speed=20)
    assert all(r.status == "ok" for r in records)
    assert all((r.prompt_tokens, r.output_tokens) == (256, 256) for r in records)
    for r in records:
        assert r.first_token_s is not None and r.finish_s is not None
        assert r.arrival_s <= r.first_token_s < r.finish_s
