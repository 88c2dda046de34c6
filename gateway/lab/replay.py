"""Replay a workload over HTTP with real streaming clients, timed from the client side.

One ``httpx`` streaming request per workload request, sent at its arrival time (divided by
``speed``) with its tenant's API key (``Authorization: Bearer KEY``). Prompts are synthesised to
exactly the workload's prompt-token count with the gateway's tokenizer
(:class:`common.tokenizer.TokenCounter`); requests ask for ``max_tokens = output_tokens`` with
``ignore_eos: true`` and ``stream_options.include_usage`` so that the server's own counts land
in the records. A workload whose clients leave ``max_tokens`` unset or send a cap of their own
(:data:`gateway.lab.workloads.MaxTokens`) sends just that, without ``ignore_eos``: the server
decides the length, and the records keep it.

Times in the records are *workload* seconds: client-side wall time since the start multiplied
by ``speed`` (so a run at ``--speed 10`` against a backend also running 10x faster is comparable
with ``lab simulate``). Status: ``ok`` (stream ended with ``[DONE]`` and no error event),
``rejected`` (HTTP 429), ``error`` (any other HTTP error, an SSE error event, a broken
connection).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from common.tokenizer import REPLY_PRIMING_TOKENS, TOKENS_PER_MESSAGE, TokenCounter

from .metrics import RequestRecord
from .workloads import EXACT, ClosedDraw, MaxTokens, Workload

ProgressFn = Callable[[int, int], None]

#: Common English words; those that are one token both bare and after a space are kept.
_WORD_TEXT = """
the of and to in is you that it he was for on are as with his they at be this have from
or one had by word but not what all were we when your can said there use an each which she
do how their if will up other about out many then them these so some her would make like
him into time has look two more write go see number no way could people my than first
water been call who oil its now find long down day did get come made may part over new
sound take only little work know place year live me back give most very after thing our
just name good sentence man think say great where help through much before line right too
mean old any same tell boy follow came want show also around form three small set put end
"""
_WORDS = tuple(_WORD_TEXT.split())


class ReplayError(Exception):
    """The replay could not start (gateway unreachable, no model, missing key)."""


def load_tenant_keys(path: str | Path) -> tuple[dict[str, str], dict[str, float]]:
    """API key (and weight, when known) per tenant from a tenants file.

    Either a YAML mapping ``tenant: key`` (or ``tenant: [key, ...]``), or the gateway's config
    file, whose ``tenants`` list holds ``{name, weight, api_keys}`` (the first raw key is used;
    hashed ``sha256:`` entries cannot be sent).
    """
    import yaml

    doc = yaml.safe_load(Path(path).read_text())
    keys: dict[str, str] = {}
    weights: dict[str, float] = {}
    if isinstance(doc, dict) and isinstance(doc.get("tenants"), list):
        for i, t in enumerate(doc["tenants"]):
            if not isinstance(t, dict) or "name" not in t:
                raise ValueError(f"tenants[{i}]: expected a mapping with a name")
            raw = [k for k in t.get("api_keys", []) if isinstance(k, str)]
            usable = [k for k in raw if not k.startswith("sha256:")]
            if usable:
                keys[str(t["name"])] = usable[0]
            if "weight" in t:
                weights[str(t["name"])] = float(t["weight"])
        return keys, weights
    if isinstance(doc, dict):
        for name, value in doc.items():
            if isinstance(value, list) and value and isinstance(value[0], str):
                value = value[0]
            if not isinstance(value, str):
                raise ValueError(f"tenant {name!r}: expected an API key string, got {value!r}")
            keys[str(name)] = value
        return keys, weights
    raise ValueError("expected a mapping tenant -> key or a gateway config with 'tenants'")


class PromptSynth:
    """Texts that encode to an exact number of tokens with a given counter."""

    def __init__(self, counter: TokenCounter | None = None) -> None:
        self.counter = counter or TokenCounter()
        enc = self.counter.encoder
        self.words = [
            w for w in _WORDS if len(enc.encode(w)) == 1 and len(enc.encode(" " + w)) == 1
        ]
        if not self.words:  # pragma: no cover - any BPE vocabulary has these
            raise RuntimeError("no single-token words for this tokenizer")

    def text(self, tokens: int, seed: int = 0) -> str:
        """A text of exactly ``tokens`` tokens (varied per seed, to defeat prefix caching)."""
        if tokens < 1:
            return ""
        rng = random.Random(seed)
        words = [rng.choice(self.words) for _ in range(tokens)]
        text = " ".join(words)
        n = self.counter.count_text(text)
        while n != tokens:  # merges across words are not expected; correct them if they occur
            if n > tokens:
                words.pop()
            else:
                words.append(rng.choice(self.words))
            text = " ".join(words)
            n = self.counter.count_text(text)
        return text

    def chat_text(self, tokens: int, seed: int = 0) -> str:
        """Content of one user message such that the whole chat prompt has ``tokens`` tokens."""
        overhead = REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + self.counter.count_text("user")
        return self.text(max(1, tokens - overhead), seed)


async def _first_model(client: httpx.AsyncClient, headers: Mapping[str, str]) -> str:
    try:
        resp = await client.get("/v1/models", headers=dict(headers))
    except httpx.HTTPError as exc:
        raise ReplayError(f"cannot reach {client.base_url}: {exc}") from exc
    if resp.status_code != 200:
        raise ReplayError(f"GET /v1/models answered {resp.status_code}; pass --model")
    data = resp.json().get("data") or []
    if not data:
        raise ReplayError("GET /v1/models lists no model; pass --model")
    return str(data[0]["id"])


def _has_token(obj: Mapping[str, Any]) -> bool:
    for choice in obj.get("choices") or []:
        if choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if delta.get("content"):
            return True
    usage = obj.get("usage") or {}
    return bool(usage.get("completion_tokens"))


def _request_body(
    synth: PromptSynth, chat: bool, prompt_tokens: int, output_tokens: int, limit: MaxTokens, i: int
) -> dict[str, Any]:
    """The body of one request (without ``model``): a prompt of ``prompt_tokens`` tokens
    (varied by ``i``) and the output limit the workload asks for."""
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    if limit == EXACT:
        body.update(max_tokens=output_tokens, ignore_eos=True)
    elif limit is not None:  # the server decides the length, up to the cap
        body["max_tokens"] = limit
    if chat:
        body["messages"] = [{"role": "user", "content": synth.chat_text(prompt_tokens, i)}]
    else:
        body["prompt"] = synth.text(prompt_tokens, i)
    return body


class _Session:
    """What the requests of one replay share: the connection and endpoint, the model, the
    tenants' keys, the workload clock (wall seconds since ``start`` times ``speed``) and the
    progress count."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        path: str,
        model: str,
        keys: Mapping[str, str],
        speed: float,
        progress: ProgressFn | None,
        total: int,
    ) -> None:
        self.client, self.path, self.model, self.keys = client, path, model, keys
        self.speed, self.progress = speed, progress
        self.done, self.total = 0, total
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()

    def now(self) -> float:
        return (self.loop.time() - self.start) * self.speed

    async def sleep_until(self, t: float) -> None:
        """Wait until workload time ``t``."""
        delay = self.start + t / self.speed - self.loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def send(self, body: dict[str, Any], tenant: str, rec: RequestRecord) -> None:
        """One streaming request as ``tenant``; ``rec`` records what came back."""
        key = self.keys.get(tenant, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            await _stream_one(
                self.client, self.path, dict(body, model=self.model), headers, rec, self.now
            )
        except httpx.HTTPError:
            rec.status = "error"
            rec.finish_s = self.now()

    def finished_one(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


async def _open_request(
    session: _Session, body: dict[str, Any], tenant: str, rec: RequestRecord
) -> None:
    try:
        await session.send(body, tenant, rec)
    finally:
        session.finished_one()


async def _closed_loop(
    session: _Session,
    workload: Workload,
    ci: int,
    sizes: Iterator[ClosedDraw],
    body: Callable[[int, int, MaxTokens, int], dict[str, Any]],
    records: list[RequestRecord],
) -> None:
    """One worker of a closed-loop client: request, wait for the answer, think, again."""
    client_spec = workload.closed[ci]
    end = workload.closed_end(client_spec)
    await session.sleep_until(client_spec.start)
    while session.now() < end:
        draw = next(sizes)
        rec = draw.record(client_spec.name, session.now())
        records.append(rec)
        session.total += 1
        b = body(draw.prompt_tokens, draw.output_tokens, draw.max_tokens, len(records))
        await session.send(b, client_spec.name, rec)
        session.finished_one()
        if draw.think > 0:
            await asyncio.sleep(draw.think / session.speed)


async def replay_workload(
    workload: Workload,
    base_url: str,
    keys: Mapping[str, str],
    speed: float = 1.0,
    model: str | None = None,
    endpoint: str = "completions",
    progress: ProgressFn | None = None,
    synth: PromptSynth | None = None,
) -> list[RequestRecord]:
    """Send every request of ``workload`` at its (scaled) time, and run its closed-loop clients
    (each keeps its concurrency of requests outstanding, sending the next ``think`` seconds
    after one ends, until the client's end); one record per request, open-loop ones first."""
    if speed <= 0:
        raise ValueError("speed must be > 0")
    tenants_used = {r.tenant for r in workload.requests} | {c.name for c in workload.closed}
    missing = sorted(tenants_used - set(keys))
    if keys and missing:
        raise ReplayError(f"no API key for tenant(s) {', '.join(missing)} in the tenants file")
    synth = synth or PromptSynth()
    chat = endpoint == "chat"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = functools.partial(_request_body, synth, chat)
    bodies = [
        body(r.prompt_tokens, r.output_tokens, r.max_tokens, i)
        for i, r in enumerate(workload.requests)
    ]
    records = workload.new_records()
    timeout = httpx.Timeout(None, connect=30.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout, limits=limits) as client:
        any_key = next(iter(keys.values()), "")
        auth = {"Authorization": f"Bearer {any_key}"} if any_key else {}
        model_name = model or await _first_model(client, auth)
        session = _Session(client, path, model_name, keys, speed, progress, len(records))
        closed_records: list[RequestRecord] = []
        tasks = [
            asyncio.create_task(_closed_loop(session, workload, ci, sizes, body, closed_records))
            for ci, c in enumerate(workload.closed)
            for sizes in [c.sizes(workload.seed, ci)]
            for _ in range(c.concurrency)
        ]
        for i, req in enumerate(workload.requests):
            await session.sleep_until(req.arrival_s)
            tasks.append(
                asyncio.create_task(_open_request(session, bodies[i], req.tenant, records[i]))
            )
        await asyncio.gather(*tasks)
    return records + sorted(closed_records, key=lambda r: r.arrival_s)


async def _stream_one(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    rec: RequestRecord,
    now: Callable[[], float],
) -> None:
    async with client.stream("POST", path, json=body, headers=headers) as resp:
        if resp.status_code != 200:
            await resp.aread()
            rec.status = "rejected" if resp.status_code == 429 else "error"
            rec.finish_s = now()
            return
        finished = False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                break
            obj = json.loads(data)
            if "error" in obj:
                rec.status = "error"
                continue
            if rec.first_token_s is None and _has_token(obj):
                rec.first_token_s = now()
            usage = obj.get("usage")
            if usage:
                rec.prompt_tokens = int(usage.get("prompt_tokens", rec.prompt_tokens))
                rec.output_tokens = int(usage.get("completion_tokens", rec.output_tokens))
        rec.finish_s = now()
        if not finished and rec.status == "ok":
            rec.status = "error"
