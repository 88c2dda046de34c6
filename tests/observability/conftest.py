"""Helpers: scrape and parse a gateway's /metrics; drive a few streaming clients."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import MODEL

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample as ``{(name, sorted label items): value}``."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` (KeyError naming it when absent)."""
    key = (name, tuple(sorted(labels.items())))
    if key not in samples:
        raise KeyError(f"no sample {name}{labels}")
    return samples[key]


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


async def scrape(http: httpx.AsyncClient) -> Samples:
    r = await http.get("/metrics")
    assert r.status_code == 200, r.text
    return parse(r.text)


def body(max_tokens: int = 16, stream: bool = True, prompt: str = "hello there") -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def stream_all(http: httpx.AsyncClient, key: str, max_tokens: int) -> int:
    """One streaming completion for ``key``; returns the HTTP status after reading it all."""
    async with http.stream(
        "POST", "/v1/completions", json=body(max_tokens), headers={"Authorization": f"Bearer {key}"}
    ) as r:
        async for _ in r.aiter_lines():
            pass
        return r.status_code


async def clients(
    http: httpx.AsyncClient, keys: Sequence[str], per_key: int, max_tokens: int, stop: asyncio.Event
) -> None:
    """``per_key`` looping streaming clients per key until ``stop`` is set."""

    async def loop(key: str) -> None:
        while not stop.is_set():
            await stream_all(http, key, max_tokens)

    await asyncio.gather(*(loop(k) for k in keys for _ in range(per_key)))
