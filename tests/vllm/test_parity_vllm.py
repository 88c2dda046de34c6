"""Throughput parity on real vLLM: clients that send no ``max_tokens`` (the OpenAI SDK's
default) get as many tokens per second through the gateway as from vLLM alone.

The server here has a server-wide output default (``--override-generation-config
'{"max_new_tokens": 48}'``, what a model's ``generation_config.json`` does): a request without
``max_tokens`` generates up to 48 tokens, but nothing on the wire says so. A gateway that books
the rest of the context for such a request (``kv_admission: reserve``: 2,048 - prompt tokens
each in a 2,528-token cache) runs one request at a time where vLLM runs eight; ``predict``
learns the real lengths from the streams and keeps vLLM's batch full.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MAX_NUM_SEQS, MODEL, VllmServer, gateway_for, parse_metrics, running_vllm

OUTPUT_DEFAULT = 48
CLIENTS = 8  # closed-loop clients, as many as vLLM's max_num_seqs
ROUNDS = 8  # requests per client per measured run


@pytest.fixture(scope="module")
def vllm_default_length(tiny_model: Path) -> Iterator[VllmServer]:
    override = json.dumps({"max_new_tokens": OUTPUT_DEFAULT})
    extra = ("--override-generation-config", override)
    with running_vllm(model_dir=tiny_model, extra_args=extra) as server:
        yield server


async def _closed_loop(url: str, key: str | None, seed: int) -> tuple[float, int]:
    """CLIENTS clients, each sending ROUNDS chat requests back to back without max_tokens;
    returns (seconds, completion tokens)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as http:

        async def client(c: int) -> int:
            total = 0
            for r in range(ROUNDS):
                words = " ".join(f"w{(seed * 997 + c * 31 + r * 7 + i) % 500}" for i in range(20))
                resp = await http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": words}]},
                )
                assert resp.status_code == 200, resp.text
                total += int(resp.json()["usage"]["completion_tokens"])
            return total

        start = time.monotonic()
        tokens = sum(await asyncio.gather(*(client(c) for c in range(CLIENTS))))
        return time.monotonic() - start, tokens


async def _running(server: VllmServer, done: asyncio.Event) -> list[float]:
    """vLLM's ``num_requests_running``, sampled every 50 ms until ``done``."""
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=10) as http:
        while not done.is_set():
            text = (await http.get(server.url + "/metrics")).text
            samples.append(parse_metrics(text).get("vllm:num_requests_running", 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.05)
    return samples


async def test_no_max_tokens_through_the_gateway_keeps_vllms_batch_full(
    vllm_default_length: VllmServer,
) -> None:
    """Through the gateway vLLM runs as many requests at once as alone (its batch is what the
    gateway controls) and so serves as many tokens per second; booking the rest of the context
    runs one at a time. Tokens/s get a wider margin than the batch: on a busy 2-core machine
    other processes move a run's tokens/s by 2-4x (the batch vLLM runs hardly at all); the
    parity benchmark (``vtc-gateway bench parity``) measures tokens/s on a quiet machine."""
    server = vllm_default_length
    rates: dict[str, list[float]] = {"direct": [], "predict": [], "reserve": []}
    batch: dict[str, list[float]] = {"direct": [], "predict": [], "reserve": []}
    peaks: dict[str, list[float]] = {"direct": [], "predict": [], "reserve": []}
    preempted = {"direct": 0.0, "predict": 0.0}

    async def measure(path: str, url: str, key: str | None, seed: int) -> None:
        pre = server.metrics().get("vllm:num_preemptions_total", 0.0)
        done = asyncio.Event()
        sampler = asyncio.create_task(_running(server, done))
        try:
            seconds, tokens = await _closed_loop(url, key, seed)
        finally:
            done.set()
            samples = await sampler
        rates[path].append(tokens / seconds)
        batch[path].append(statistics.fmean(samples) if samples else 0.0)
        peaks[path].append(max(samples, default=0.0))
        if path in preempted:
            preempted[path] += server.metrics().get("vllm:num_preemptions_total", 0.0) - pre

    await _closed_loop(server.url, None, seed=0)  # vLLM's first requests are slow
    async with (
        gateway_for(server.url, backend={"kv_admission": "predict"}) as gw,
        gateway_for(server.url, backend={"kv_admission": "reserve"}) as strict,
    ):
        # a deployed gateway has seen traffic: one round teaches the predictor the lengths
        await _closed_loop(gw.url, "key-a", seed=0)
        for attempt in range(1, 4):  # interleaved, best of three
            await measure("direct", server.url, None, attempt)
            await measure("predict", gw.url, "key-a", attempt)
        await measure("reserve", strict.url, "key-a", 1)
        assert gw.state.admission.in_flight() == strict.state.admission.in_flight() == 0
    seen = {"tokens/s": rates, "running": batch, "peak": peaks, "preempted": preempted}
    running = {p: max(v) for p, v in batch.items()}
    # the gateway lets vLLM fill its batch (the peak is vLLM's max_num_seqs either way); the
    # time-averaged batch is a little lower through the gateway, whose own work between a
    # request's end and the next one's start shares the 2 cores with vLLM and the clients
    # (0.87-0.9 of direct measured), so it gets a wider margin
    assert max(peaks["predict"]) == max(peaks["direct"]) == MAX_NUM_SEQS, seen
    assert running["predict"] >= 0.75 * running["direct"], seen
    assert running["reserve"] <= 0.5 * running["direct"], seen  # booking the whole context
    direct, predict, reserve = (max(rates[p]) for p in ("direct", "predict", "reserve"))
    assert predict >= 0.5 * direct, seen
    assert reserve < 0.5 * predict, seen
    assert preempted["predict"] <= preempted["direct"], seen
