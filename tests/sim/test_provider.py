"""Provider mode over HTTP: OpenAI's x-ratelimit-* headers, 429 with Retry-After, counters."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from backends.sim.__main__ import build_parser, config_from_args
from backends.sim.config import PROVIDER_KV_CACHE_TOKENS, PROVIDER_MAX_NUM_SEQS, SimConfig
from backends.sim.engine import EngineCore
from backends.sim.server import SimServer
from common.tokenizer import TokenCounter

from .conftest import parse_sse, sim_config

MODEL = "sim-llama-3-8b"
PROMPT = "hello there"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
QUOTA_HEADERS = {
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
}


def completion(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True, **extra}


async def test_headers_on_every_response_429_shapes_and_counters() -> None:
    counter = TokenCounter()
    p_text, p_chat = counter.count_text(PROMPT), counter.count_chat(MESSAGES)
    async with (
        SimServer(sim_config(speed=0, tpm=100, rpm=3)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10.0) as http,
    ):
        r = await http.post("/v1/completions", json=completion(10))
        assert r.status_code == 200 and set(r.headers) >= QUOTA_HEADERS
        used = p_text + 10  # prompt + the output it generates
        assert r.json()["usage"]["total_tokens"] == used
        assert r.headers["x-ratelimit-limit-tokens"] == "100"
        assert r.headers["x-ratelimit-limit-requests"] == "3"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
        assert r.headers["x-ratelimit-remaining-requests"] == "2"
        assert r.headers["x-ratelimit-reset-tokens"] == "1m0s"  # charged now, leaves in 60 s

        # a stream carries them in its headers, before the body
        body = {"messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True}
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert parse_sse(r.text)[-1] == "[DONE]"
        used += p_chat + 5
        assert r.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
        assert r.headers["x-ratelimit-remaining-requests"] == "1"

        # a bad request is not charged and still reports the quota
        r = await http.post("/v1/completions", json=completion(0))
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
        assert r.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
        assert "retry-after" not in r.headers

        # over the tokens: refused, not charged
        r = await http.post("/v1/completions", json=completion(100 - used))
        assert r.status_code == 429
        err = r.json()["error"]
        assert err["type"] == "tokens" and err["code"] == "rate_limit_exceeded"
        assert err["param"] is None
        assert err["message"].startswith(
            f"Rate limit reached for {MODEL} on tokens per min (TPM): Limit 100, "
            f"Used {used}, Requested {p_text + 100 - used}. Please try again in "
        )
        wait_ms = int(r.headers["retry-after-ms"])
        assert 0 < wait_ms <= 60_000
        assert r.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
        assert r.headers["x-ratelimit-remaining-requests"] == "1"

        # the third request fits, the fourth is over the requests
        r = await http.post("/v1/completions", json=completion(1))
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "0"
        used += p_text + 1
        client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
        finally:
            await client.close()
        assert caught.value.code == "rate_limit_exceeded" and caught.value.type == "requests"
        assert "on requests per min (RPM): Limit 3, Used 3, Requested 1." in caught.value.message
        assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"

        stats = (await http.get("/sim/stats")).json()["ratelimit"]
        assert stats["accepted_requests"] == 3 and stats["accepted_tokens"] == used
        assert stats["refused"] == {"requests": 1, "tokens": 1}
        assert (stats["window_requests"], stats["window_tokens"]) == (3, used)
        assert (stats["tpm"], stats["rpm"], stats["window_s"]) == (100, 3, 60.0)
        metrics = (await http.get("/metrics")).text
        labels = f'engine="0",model_name="{MODEL}"'
        assert f"sim:ratelimit_accepted_tokens_total{{{labels}}} {float(used)}" in metrics
        assert f'sim:ratelimit_refused_requests_total{{{labels},reason="tokens"}} 1.0' in metrics
        assert f"sim:ratelimit_window_requests{{{labels}}} 3.0" in metrics
        assert "vllm:num_requests_running" in metrics  # vLLM's metrics are still there


async def test_429_then_success_once_the_window_slides() -> None:
    async with (
        SimServer(sim_config(speed=0, rpm=2, rate_window_s=1.0, provider=True)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=10.0) as http,
    ):
        for _ in range(2):
            assert (await http.post("/v1/completions", json=completion(2))).status_code == 200
        r = await http.post("/v1/completions", json=completion(2))
        assert r.status_code == 429 and r.json()["error"]["type"] == "requests"
        wait_ms = int(r.headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000 and r.headers["retry-after"] == "1"
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert "x-ratelimit-limit-tokens" not in r.headers  # no token quota configured
        await asyncio.sleep(wait_ms / 1000)
        r = await http.post("/v1/completions", json=completion(2))
        assert r.status_code == 200, r.text
        assert int(r.headers["x-ratelimit-remaining-requests"]) in (0, 1)
        metrics = (await http.get("/metrics")).text
        assert f'num_gpu_blocks="{PROVIDER_KV_CACHE_TOKENS // 16}"' in metrics
        assert "sim:ratelimit_refused_requests_total" in metrics


async def test_no_quota_no_headers(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json=completion(2))
    assert r.status_code == 200
    assert not any(h.lower().startswith("x-ratelimit") for h in r.headers)
    assert (await http.get("/sim/stats")).json()["ratelimit"] is None
    assert "sim:ratelimit" not in (await http.get("/metrics")).text


def test_provider_mode_admits_every_request_at_once() -> None:
    cfg = SimConfig(profile="a100-llama3-8b", provider=True)  # the profile allows 256 seqs
    engine = cfg.engine_config()
    assert engine.max_num_seqs == PROVIDER_MAX_NUM_SEQS
    assert engine.kv_cache_tokens == PROVIDER_KV_CACHE_TOKENS
    core = EngineCore(engine, cfg.cost_model())
    for i in range(1000):
        core.add_request(f"r{i}", prompt_tokens=8, max_tokens=64, output_len=64, arrival=0.0)
    core.step(0.0)
    assert (core.num_running, core.num_waiting) == (1000, 0)
    assert SimConfig(provider=True, max_num_seqs=8).engine_config().max_num_seqs == 8


def test_cli_quota_flags() -> None:
    args = build_parser().parse_args(
        ["--tpm", "60000", "--rpm", "600", "--rate-window-s", "2.5", "--provider"]
    )
    cfg = config_from_args(args)
    assert (cfg.tpm, cfg.rpm, cfg.rate_window_s, cfg.provider) == (60000, 600, 2.5, True)
    limits = cfg.rate_limits()
    assert limits is not None and (limits.tpm, limits.rpm, limits.window_s) == (60000, 600, 2.5)
    plain = config_from_args(build_parser().parse_args([]))
    assert plain.rate_limits() is None and not plain.provider
    with pytest.raises(ValueError, match="rpm"):
        SimConfig(rpm=0)
