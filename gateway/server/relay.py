"""Relaying a backend's stream to the client while charging the tenant token by token.

Upstream the gateway always streams with ``stream_options: {include_usage: true,
continuous_usage_stats: true}``, so every chunk carries the exact cumulative
``usage.completion_tokens``; what one upstream read brought is charged at once, when the read
has been processed (one charge per read, not per chunk). A backend
that ignores ``continuous_usage_stats`` still works: the tokens of each delta's text are counted
instead, and the final usage chunk reconciles.

The client gets exactly the format it asked for:

* streaming with both usage options: the upstream bytes pass through untouched;
* streaming otherwise: ``usage`` is removed from chunks that did not ask for it (completions
  chunks keep ``"usage": null``, as vLLM renders them), and the final usage-only chunk is
  dropped unless the client asked for ``include_usage``;
* not streaming: the chunks are assembled into one ``chat.completion`` / ``text_completion``
  body, so the request is charged while it runs like any other (and the bytes equal vLLM's
  non-streaming answer apart from ids and timestamps).

Hot path (streaming, every chunk after the first): vLLM dumps compact JSON with ``usage`` as the
last top-level key, so :meth:`ChunkProcessor.feed` reads ``completion_tokens`` from that tail and
cuts it off with byte operations, without parsing or re-serialising the chunk; the top-level keys
before ``choices`` (id, object, created, model) are the same bytes in every chunk of a stream, so
once checked they are compared with one ``startswith``. A raw ``"`` can
only be structural in JSON (inside strings it is escaped), so the byte patterns below cannot
match string content. Anything that does not have exactly that shape (an error, spaces, nested
usage details, a reordered chunk) takes the full JSON path, which behaves the same.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.tokenizer import TokenCounter

from ..scheduler import Job

_loads: Callable[[bytes], Any]
_dumps: Callable[[Any], bytes]
try:  # orjson parses and renders chunks several times faster; optional
    import orjson
except ImportError:  # pragma: no cover - exercised when orjson is absent
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

else:
    _loads = orjson.loads
    _dumps = orjson.dumps


DONE = b"data: [DONE]\n\n"

_USAGE_KEY = b',"usage":'
#: A flat usage object of integers/nulls closing the chunk: ``{"prompt_tokens":7,...}}``.
_USAGE_TAIL = re.compile(rb'\{(?:"[a-z_]+":(?:\d+|null),)*"[a-z_]+":(?:\d+|null)\}\}\s*')
#: vLLM's own field order, matched in one go (the general pattern above is the fallback).
_VLLM_USAGE = re.compile(
    rb'\{"prompt_tokens":(\d+),"total_tokens":\d+,"completion_tokens":(\d+)'
    rb'(?:,"prompt_tokens_details":null)?\}\}\s*'
)
#: vLLM's last chunk (``"choices":[]``): the usage object, then ``system_fingerprint``.
_VLLM_FINAL = re.compile(
    rb'\{"prompt_tokens":(\d+),"total_tokens":\d+,"completion_tokens":(\d+)'
    rb'(?:,"prompt_tokens_details":null)?\},"system_fingerprint":(?:null|"[^"\\]*")\}\s*'
)
_USAGE_WINDOW = 256  # the longest usage tail searched for, in bytes
_COMPLETION = re.compile(rb'"completion_tokens":(\d+)')
_PROMPT = re.compile(rb'"prompt_tokens":(\d+)')
_CHOICES = b'"choices":'


@dataclass(frozen=True, slots=True)
class ClientFormat:
    stream: bool
    include_usage: bool
    continuous_usage: bool
    chat: bool
    n: int = 1  # sequences: with n > 1 each chunk's usage counts its own choice only

    @property
    def passthrough(self) -> bool:
        return self.stream and self.include_usage and self.continuous_usage


@dataclass(slots=True)
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    finish_reason: Any = None
    stop_reason: Any = None
    logprobs: Any = None
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    token_ids: list[int] | None = None  # with ``return_token_ids``
    prompt_token_ids: Any = None  # completions, with ``return_token_ids``


class ChunkProcessor:
    """Parses upstream chunks, charges output tokens, and renders what the client receives."""

    def __init__(
        self, job: Job, fmt: ClientFormat, charge: Any, counter: TokenCounter | None
    ) -> None:
        self.job = job
        self.fmt = fmt
        self._charge = charge  # callable(n_tokens): charge n output tokens now
        self._counter = counter
        self.completion_tokens = 0  # delivered to the gateway so far
        #: The backend's own latest ``usage.completion_tokens``: the truth the job is
        #: reconciled to at the end, even when it is below what delta counting estimated.
        self.reported_completion: int | None = None
        self.prompt_tokens: int | None = None  # backend's count, once known
        self._usage: dict[str, Any] | None = None
        #: (payload, offset of ',"usage":') of the latest fast-path chunk: parsed on demand
        self._usage_at: tuple[bytes, int] | None = None
        self._prefix: bytes | None = None  # a checked chunk's bytes up to '"choices":'
        self.error: dict[str, Any] | None = None
        self.malformed: str | None = None  # set by feed_batch when a payload is not a chunk
        self.first_chunk: dict[str, Any] | None = None
        self._fingerprint: Any = None  # vLLM sends system_fingerprint on the last chunk
        self._prompt_token_ids: Any = None  # chat, with ``return_token_ids``
        self._choices: dict[int, _Choice] = {}
        #: n > 1: vLLM's per-chunk usage counts the chunk's own choice; the total is their sum
        self._per_choice: dict[int, int] | None = {} if fmt.n > 1 else None
        self._fast = fmt.stream and fmt.n == 1

    @property
    def usage(self) -> dict[str, Any] | None:
        """The backend's latest ``usage`` object."""
        at = self._usage_at
        if at is not None:
            payload, i = at
            self._usage = _loads(payload[i + 9 : payload.index(b"}", i) + 1])
            self._usage_at = None
        return self._usage

    def feed_batch(self, payloads: list[bytes]) -> bytes:
        """Feed the payloads of one upstream read in order; return the client's bytes for all
        of them, joined. Stops at the first error event (:attr:`error` is set) or malformed
        payload (:attr:`malformed` is set); the bytes returned are those before it. The output
        tokens the read brought are charged once, at its end."""
        out: list[bytes] = []
        try:
            for payload in payloads:
                rendered = self._feed_one(payload)
                if self.error is not None:
                    break
                if rendered:
                    out.append(rendered)
        except ValueError as exc:
            self.malformed = str(exc) or exc.__class__.__name__
        self._settle()
        return out[0] if len(out) == 1 else b"".join(out)

    def feed(self, payload: bytes) -> bytes | None:
        """Process one upstream ``data:`` payload; return the SSE bytes for the client (or None)."""
        rendered = self._feed_one(payload)
        self._settle()
        return rendered or None

    def _settle(self) -> None:
        """Charge the output tokens the backend reported beyond those charged so far."""
        n = self.reported_completion
        if n is not None and n > self.completion_tokens:
            self._charge(n - self.completion_tokens)
            self.completion_tokens = n

    def _feed_one(self, payload: bytes) -> bytes | None:
        if self._fast:  # a stream's chunks, the first included, are never parsed
            fast = self._feed_fast(payload)
            if fast is not None:
                return fast
        return self._feed_json(payload)

    def _feed_fast(self, payload: bytes) -> bytes | None:
        """The byte-level path for a compact chunk ending in a flat ``usage``; None when the
        payload does not have that shape (then nothing was changed), else the client's bytes
        (``b""`` for nothing). Records the backend's count; :meth:`_settle` charges it."""
        # Every chunk of a stream starts with the same top-level keys up to "choices" (id,
        # object, created, model): once checked, that prefix is compared in one step.
        prefix = self._prefix
        if prefix is not None and payload.startswith(prefix):
            j = len(prefix) - 10
        else:
            j = payload.find(_CHOICES)
            if j < 0 or payload.find(b"{", 1, j) >= 0 or payload.find(b"[", 0, j) >= 0:
                return None  # "choices" is not a plain top-level key
            self._prefix = payload[: j + 10]
        # usage closes the chunk: look for it in the tail only (a forward search is cheaper
        # than rfind; a nested "usage" found there instead fails the anchored match below)
        i = payload.find(_USAGE_KEY, max(j + 10, len(payload) - _USAGE_WINDOW))
        if i < 0 or b'"error":' in payload:
            return None
        m = _VLLM_USAGE.fullmatch(payload, i + 9)
        if m is None and payload.startswith(b"[]", j + 10):
            m = _VLLM_FINAL.fullmatch(payload, i + 9)  # sent whole or not at all (below)
        if m is not None:
            self.prompt_tokens = int(m[1])
            self.reported_completion = int(m[2])
        else:
            if _USAGE_TAIL.fullmatch(payload, i + 9) is None:
                return None
            ct = _COMPLETION.search(payload, i)
            if ct is None:
                return None
            pt = _PROMPT.search(payload, i)
            if pt is not None:
                self.prompt_tokens = int(pt.group(1))
            self.reported_completion = int(ct.group(1))
        self._usage_at = (payload, i)  # parsed only if asked for
        fmt = self.fmt
        if fmt.passthrough:
            return b"data: " + payload + b"\n\n"
        if payload.startswith(b"[]", j + 10):  # the final usage-only chunk
            return b"data: " + payload + b"\n\n" if fmt.include_usage else b""
        # vLLM renders completions chunks with "usage": null, chat chunks without the key
        return b"data: " + payload[:i] + (b"}\n\n" if fmt.chat else b',"usage":null}\n\n')

    def _feed_json(self, payload: bytes) -> bytes | None:
        obj = _loads(payload)
        if not isinstance(obj, dict):
            raise ValueError("chunk is not a JSON object")
        if "error" in obj:
            self.error = obj
            return None
        usage = obj.get("usage")
        choices = obj.get("choices") or []
        if isinstance(usage, dict):
            self._usage = usage
            self._usage_at = None
            pt = usage.get("prompt_tokens")
            if isinstance(pt, int):
                self.prompt_tokens = pt
            ct = usage.get("completion_tokens")
            per_choice = self._per_choice
            if isinstance(ct, int) and per_choice is not None and choices:
                idx = choices[0].get("index", 0) if isinstance(choices[0], dict) else 0
                per_choice[idx if isinstance(idx, int) else 0] = ct
                ct = sum(per_choice.values())
            if isinstance(ct, int):
                self.reported_completion = ct
                if ct > self.completion_tokens:
                    self._charge(ct - self.completion_tokens)
                    self.completion_tokens = ct
        elif choices and self._counter is not None:
            n = sum(self._count_delta(c) for c in choices)
            if n:
                self._charge(n)
                self.completion_tokens += n
        if self.first_chunk is None:
            self.first_chunk = obj
        if not self.fmt.stream:
            if obj.get("system_fingerprint") is not None:
                self._fingerprint = obj["system_fingerprint"]
            if obj.get("prompt_token_ids") is not None:
                self._prompt_token_ids = obj["prompt_token_ids"]
            for c in choices:
                self._accumulate(c)
            return None
        if self.fmt.passthrough:
            return b"data: " + payload + b"\n\n"
        if not choices:  # the final usage-only chunk
            if self.fmt.include_usage and usage is not None:
                return b"data: " + payload + b"\n\n"
            return None
        if usage is not None and not self.fmt.continuous_usage:
            if self.fmt.chat:
                del obj["usage"]
            else:
                obj["usage"] = None
            return b"data: " + _dumps(obj) + b"\n\n"
        return b"data: " + payload + b"\n\n"

    def _count_delta(self, choice: dict[str, Any]) -> int:
        """Estimated tokens of one choice's new text (used only without usage stats)."""
        assert self._counter is not None
        text = choice.get("text")
        if text is None:
            delta = choice.get("delta") or {}
            text = (delta.get("content") or "") + (
                delta.get("reasoning_content") or delta.get("reasoning") or ""
            )
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") or {}
                text += (fn.get("name") or "") + (fn.get("arguments") or "")
        return self._counter.count_text(text) if text else 0  # the role chunk costs nothing

    def _accumulate(self, c: dict[str, Any]) -> None:
        idx = c.get("index", 0)
        acc = self._choices.setdefault(idx, _Choice())
        if self.fmt.chat:
            delta = c.get("delta") or {}
            if delta.get("content"):
                acc.text.append(delta["content"])
            rc = delta.get("reasoning_content") or delta.get("reasoning")
            if rc:
                acc.reasoning.append(rc)
            for tc in delta.get("tool_calls") or []:
                slot = acc.tool_calls.setdefault(
                    tc.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                )
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
            lp = c.get("logprobs")
            if lp:
                if acc.logprobs is None:
                    acc.logprobs = {"content": []}
                acc.logprobs["content"].extend(lp.get("content") or [])
        else:
            if c.get("text"):
                acc.text.append(c["text"])
            lp = c.get("logprobs")
            if lp:
                if acc.logprobs is None:
                    acc.logprobs = {
                        "text_offset": [],
                        "token_logprobs": [],
                        "tokens": [],
                        "top_logprobs": [],
                    }
                for k in acc.logprobs:
                    acc.logprobs[k].extend(lp.get(k) or [])
        ids = c.get("token_ids")
        if isinstance(ids, list):
            acc.token_ids = (acc.token_ids or []) + ids
        if c.get("prompt_token_ids") is not None:
            acc.prompt_token_ids = c["prompt_token_ids"]
        if c.get("finish_reason") is not None:
            acc.finish_reason = c["finish_reason"]
        if "stop_reason" in c and c["stop_reason"] is not None:
            acc.stop_reason = c["stop_reason"]

    def assembled(self, model: str) -> dict[str, Any]:
        """The non-streaming response body built from everything fed so far, with the fields
        (and their order) of vLLM 0.32's own non-streaming answer."""
        first = self.first_chunk or {}
        prompt = self.prompt_tokens if self.prompt_tokens is not None else self.job.prompt_tokens
        usage: dict[str, Any] = (
            dict(self.usage)
            if self.usage
            else {
                "prompt_tokens": prompt,
                "total_tokens": prompt + self.completion_tokens,
                "completion_tokens": self.completion_tokens,
            }
        )
        usage.setdefault("prompt_tokens_details", None)
        usage.setdefault("completion_tokens_details", None)
        chat = self.fmt.chat
        choices: list[dict[str, Any]] = []
        for idx in sorted(self._choices) or [0]:
            acc = self._choices.get(idx, _Choice())
            if chat:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": "".join(acc.text),
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                }
                if acc.tool_calls:  # vLLM leaves the key out when there are none
                    message["tool_calls"] = [acc.tool_calls[k] for k in sorted(acc.tool_calls)]
                message["reasoning"] = "".join(acc.reasoning) if acc.reasoning else None
                choice: dict[str, Any] = {"index": idx, "message": message}
            else:
                choice = {"index": idx, "text": "".join(acc.text)}
            choice["logprobs"] = acc.logprobs
            choice["finish_reason"] = acc.finish_reason
            choice["stop_reason"] = acc.stop_reason
            choice["token_ids"] = acc.token_ids
            if not chat:
                choice["prompt_logprobs"] = None
                choice["prompt_token_ids"] = acc.prompt_token_ids
            choice["routed_experts"] = None
            choices.append(choice)
        body: dict[str, Any] = {
            "id": first.get("id", ""),
            "object": "chat.completion" if chat else "text_completion",
            "created": first.get("created", 0),
            "model": first.get("model", model),
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self._fingerprint,
            "usage": usage,
        }
        if chat:
            body["prompt_logprobs"] = None
            body["prompt_token_ids"] = self._prompt_token_ids
            body["prompt_text"] = None
        body["kv_transfer_params"] = None
        body["ec_transfer_params"] = None
        body["metrics"] = None
        return body


def upstream_body(body: dict[str, Any], continuous: bool = True) -> bytes:
    """The body sent to the backend: the client's, streaming, with usage at the end and (for
    an engine that takes ``continuous_usage_stats``) on every chunk; for one that does not,
    without it even if the client asked (its chunks are counted instead)."""
    out = dict(body)
    out["stream"] = True
    opts = dict(out.get("stream_options") or {})
    opts["include_usage"] = True
    if continuous:
        opts["continuous_usage_stats"] = True
    else:
        opts.pop("continuous_usage_stats", None)
    out["stream_options"] = opts
    return _dumps(out)


class UpstreamPayload:
    """The body for the backend, encoded for the engine that gets the request: the vLLM form
    up front (a body that cannot be encoded is refused before it queues), the plain form
    (``continuous=False``) on first use."""

    __slots__ = ("_body", "_plain", "continuous")

    def __init__(self, body: dict[str, Any]) -> None:
        self._body = body
        self.continuous = upstream_body(body)
        self._plain: bytes | None = None

    def encoded(self, continuous: bool) -> bytes:
        if continuous:
            return self.continuous
        if self._plain is None:
            self._plain = upstream_body(self._body, continuous=False)
        return self._plain


def client_format(body: dict[str, Any], chat: bool) -> ClientFormat:
    stream = body.get("stream") is True
    opts = body.get("stream_options") if stream else None
    opts = opts if isinstance(opts, dict) else {}
    return ClientFormat(
        stream=stream,
        include_usage=opts.get("include_usage") is True,
        continuous_usage=opts.get("include_usage") is True
        and opts.get("continuous_usage_stats") is True,
        chat=chat,
        n=n if isinstance(n := body.get("n"), int) and n > 1 else 1,
    )
