"""Response bodies and SSE events, byte for byte in vLLM's shapes.

Field sets and order follow vLLM's pydantic models (vllm/entrypoints/openai/protocol.py) and how
its serving classes dump them:

* chat chunks are dumped with ``exclude_unset=True``: a choice has ``index``, ``delta``,
  ``logprobs``, ``finish_reason`` and, on the last token only, ``stop_reason``; ``usage`` appears
  only when continuous usage stats are on. The first chunk is the role chunk
  ``delta: {"role": "assistant", "content": ""}``, sent once the prefill is done;
* completions chunks are dumped with ``exclude_unset=False``: every choice has ``index``,
  ``text``, ``logprobs``, ``finish_reason``, ``stop_reason``, and ``usage`` is ``null`` unless
  continuous usage stats are on;
* the ``include_usage`` chunk has ``choices: []`` and ``usage`` without null fields;
* every event is ``data: <compact json>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``.

``UsageInfo`` keeps vLLM's field order: ``prompt_tokens``, ``total_tokens``,
``completion_tokens``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

__all__ = ["DONE", "ResponseBuilder", "sse_event"]

DONE = b"data: [DONE]\n\n"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def sse_event(obj: Any) -> bytes:
    """One SSE event: ``data: <compact json>\\n\\n``."""
    return b"data: " + _dumps(obj).encode() + b"\n\n"


#: What vLLM 0.32 reports as ``system_fingerprint`` ("vllm-<version>-<config hash>").
SYSTEM_FINGERPRINT = "vllm-0.32.0-sim"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }


class ResponseBuilder:
    """Builds the chunks and the final body of one request (chat or completions)."""

    __slots__ = (
        "_fast_prefix",
        "_fast_suffix",
        "chat",
        "continuous_usage",
        "created",
        "id",
        "model",
        "prompt_tokens",
    )

    def __init__(
        self, *, chat: bool, model: str, prompt_tokens: int, continuous_usage: bool = False
    ) -> None:
        self.chat = chat
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.continuous_usage = continuous_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        # Hot path: a mid-stream token chunk without usage is a fixed template around the text.
        self._fast_prefix = b""
        self._fast_suffix: bytes | None = None
        marker = "\x00TEXT\x00"
        template = self.token_chunk(marker, 0).decode()
        head, _, tail = template.partition(_dumps(marker))
        self._fast_prefix = head.encode()
        self._fast_suffix = tail.encode()

    def _chunk(self, choices: list[dict[str, Any]], completion: int) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.continuous_usage:
            usage: dict[str, Any] = _usage(self.prompt_tokens, completion)
            if not self.chat:
                usage["prompt_tokens_details"] = None
            chunk["usage"] = usage
        elif not self.chat:
            chunk["usage"] = None
        return chunk

    def role_chunk(self) -> bytes:
        """The chat role chunk (chat only), sent right before the first token's chunk."""
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse_event(self._chunk([choice], 0))

    def token_chunk(
        self,
        text: str,
        completion_tokens: int,
        finish_reason: str | None = None,
        stop_reason: str | None = None,
    ) -> bytes:
        """The chunk of one output token; ``finish_reason`` set on the last one."""
        if finish_reason is None and not self.continuous_usage and self._fast_suffix is not None:
            return self._fast_prefix + _dumps(text).encode() + self._fast_suffix
        choice: dict[str, Any]
        if self.chat:
            choice = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            if finish_reason is not None:
                choice["stop_reason"] = stop_reason
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        return sse_event(self._chunk([choice], completion_tokens))

    def usage_chunk(self, completion_tokens: int) -> bytes:
        """The ``include_usage`` chunk: ``choices: []``, the final usage and (as vLLM 0.32, on
        this last chunk only) ``system_fingerprint``."""
        return sse_event(
            {
                "id": self.id,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": _usage(self.prompt_tokens, completion_tokens),
                "system_fingerprint": SYSTEM_FINGERPRINT,
            }
        )

    def full_response(
        self, text: str, completion_tokens: int, finish_reason: str, stop_reason: str | None
    ) -> dict[str, Any]:
        """The non-streaming body (``chat.completion`` or ``text_completion``), with vLLM
        0.32's fields in its order."""
        usage: dict[str, Any] = _usage(self.prompt_tokens, completion_tokens)
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
        if self.chat:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            }
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason, stop_reason=stop_reason)
        choice["token_ids"] = None
        if not self.chat:
            choice.update(prompt_logprobs=None, prompt_token_ids=None)
        choice["routed_experts"] = None
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": usage,
        }
        if self.chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
        return body
