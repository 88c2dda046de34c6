"""An in-process transport for tests of the request pipeline: backends without a server.

:class:`FakeUpstream` answers the :class:`~gateway.upstream.interface.Upstream` protocol from
plain data. Each backend URL maps to a :class:`FakeBackend` (its models, KV capacity, health,
``/metrics`` text, ``/tokenize`` count); each streaming request takes the next
:class:`FakeReply` of its backend's script (default: generate ``max_tokens`` tokens) and is
rendered as vLLM renders chunks (compact JSON, ``usage`` last, as asked for by the gateway's
``stream_options``). Every request is recorded in :attr:`FakeUpstream.calls` with how it ended,
so a test can check that a stream the gateway gave up on was aborted upstream.

    fake = FakeUpstream({"http://b0": FakeBackend(models={"m": 4096})})
    fake.backend("http://b0").script(FakeReply(fail=BackendUnreachable("down")), FakeReply())
    app = create_app(config, upstream=fake)
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import BackendUnreachable, GatewayError, StreamBroken
from .interface import ModelInfo


@dataclass
class FakeReply:
    """How a backend answers one streaming request."""

    #: Output tokens to generate (None: the request's ``max_tokens``).
    tokens: int | None = None
    prompt_tokens: int = 5
    #: Raised by ``open`` instead of answering (BackendUnreachable, BackendRejected, ...).
    fail: GatewayError | None = None
    #: The stream breaks (:class:`~gateway.errors.StreamBroken`) after this many tokens.
    break_after: int | None = None
    #: An ``{"error": ...}`` event follows this many tokens (then ``[DONE]``).
    error_after: int | None = None
    #: The stream waits for this event before its first token.
    hold: asyncio.Event | None = None


@dataclass
class FakeBackend:
    """One backend: what discovery, health, metrics and tokenize see, and a reply script."""

    models: Mapping[str, int | None] = field(default_factory=lambda: {"fake-model": 4096})
    kv_capacity: int | None = None
    healthy: bool = True
    metrics: str = ""
    tokenize_count: int | None = None
    #: Raised by discovery, metrics and tokenize while set (a backend that is down).
    down: GatewayError | None = None
    replies: deque[FakeReply] = field(default_factory=deque)

    def script(self, *replies: FakeReply) -> None:
        """Answer the next requests with ``replies``, in order (then the default reply)."""
        self.replies.extend(replies)


@dataclass
class FakeCall:
    """One streaming request: where it went, what it sent, and how it ended."""

    url: str
    path: str
    body: dict[str, Any]
    ended: Literal["open", "done", "aborted", "failed"] = "open"
    tokens_sent: int = 0


class FakeUpstream:
    def __init__(self, backends: Mapping[str, FakeBackend] | None = None) -> None:
        self.backends: dict[str, FakeBackend] = dict(backends or {})
        self.calls: list[FakeCall] = []
        #: every discovery, health, metrics and tokenize request, as (url, what)
        self.probes: list[tuple[str, str]] = []
        self.started = False

    def backend(self, url: str) -> FakeBackend:
        """The backend at ``url`` (created with the defaults on first use)."""
        return self.backends.setdefault(url, FakeBackend())

    # -- Upstream ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    @asynccontextmanager
    async def open(self, url: str, path: str, body: bytes) -> AsyncIterator[_FakeStream]:
        call = FakeCall(url, path, json.loads(body))
        self.calls.append(call)
        backend = self.backends.get(url)
        if backend is None:
            call.ended = "failed"
            raise BackendUnreachable(f"no fake backend at {url}")
        reply = backend.replies.popleft() if backend.replies else FakeReply()
        if reply.fail is not None:
            call.ended = "failed"
            raise reply.fail
        stream = _FakeStream(call, reply)
        try:
            yield stream
        finally:
            call.ended = "done" if stream.finished else "aborted"

    async def models(self, url: str) -> list[ModelInfo]:
        return [ModelInfo(m, n) for m, n in self._up(url).models.items()]

    async def metrics_text(self, url: str) -> str:
        self.probes.append((url, "/metrics"))
        backend = self._up(url)
        text = backend.metrics
        if backend.kv_capacity is not None:  # as vLLM says it: (blocks - 1 null) * block size
            blocks = backend.kv_capacity + 1
            text += f'vllm:cache_config_info{{block_size="1",num_gpu_blocks="{blocks}"}} 1.0\n'
        return text

    async def tokenize(self, url: str, payload: dict[str, Any]) -> int | None:
        self.probes.append((url, "/tokenize"))
        return self._up(url).tokenize_count

    async def healthy(self, url: str, path: str = "/health") -> bool:
        self.probes.append((url, path))
        backend = self.backends.get(url)
        return backend is not None and backend.healthy and backend.down is None

    def _up(self, url: str) -> FakeBackend:
        backend = self.backends.get(url)
        if backend is None:
            raise BackendUnreachable(f"no fake backend at {url}")
        if backend.down is not None:
            raise backend.down
        return backend


class _FakeStream:
    def __init__(self, call: FakeCall, reply: FakeReply) -> None:
        self.call = call
        self.reply = reply
        self.finished = False
        self.rate_headers: dict[str, str] = {}

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """One payload per batch: the chat role chunk, one chunk per token, the usage chunk."""
        body, reply = self.call.body, self.reply
        chat = self.call.path.endswith("/chat/completions")
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        total = reply.tokens if reply.tokens is not None else int(limit)
        opts = body.get("stream_options") or {}
        chunks = _Chunks(str(body.get("model")), chat, reply.prompt_tokens, opts)
        if reply.hold is not None:
            await reply.hold.wait()
        if chat:
            yield [chunks.token(0, None, {"role": "assistant", "content": ""})]
        for n in range(1, total + 1):
            if reply.break_after is not None and n > reply.break_after:
                raise StreamBroken("fake backend dropped the stream")
            if reply.error_after is not None and n > reply.error_after:
                err = {"message": "fake backend failed", "type": "InternalServerError", "code": 500}
                yield [json.dumps({"error": err}).encode()]
                self.finished = True
                return
            self.call.tokens_sent = n
            yield [chunks.token(n, "length" if n == total else None, {"content": "tok "})]
            await asyncio.sleep(0)  # one event-loop turn per token, like a network read
        if opts.get("include_usage"):
            yield [chunks.usage(total)]
        self.finished = True


class _Chunks:
    """vLLM's chunk rendering: compact JSON, ``usage`` as the last key."""

    def __init__(self, model: str, chat: bool, prompt: int, opts: Mapping[str, Any]) -> None:
        self.model = model
        self.chat = chat
        self.prompt = prompt
        self.continuous = bool(opts.get("include_usage") and opts.get("continuous_usage_stats"))

    def token(self, n: int, finish: str | None, delta: dict[str, Any]) -> bytes:
        choice: dict[str, Any]
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": None}
            choice["finish_reason"] = finish
            choice["stop_reason"] = None
        obj: dict[str, Any] = {
            "id": "fake-0",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": 0,
            "model": self.model,
            "choices": [choice],
        }
        if self.continuous:
            obj["usage"] = self._usage(n)
        return json.dumps(obj, separators=(",", ":")).encode()

    def usage(self, n: int) -> bytes:
        obj: dict[str, Any] = {
            "id": "fake-0",
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": 0,
            "model": self.model,
            "choices": [],
            "usage": self._usage(n),
        }
        return json.dumps(obj, separators=(",", ":")).encode()

    def _usage(self, n: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + n,
            "completion_tokens": n,
        }
