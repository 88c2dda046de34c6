"""Request validation: pure functions from raw bytes to checked fields.

Everything here is synchronous and free of server state so it can be property-tested on its own:
each function either returns or raises :class:`~gateway.errors.InvalidRequest` naming the
offending field; nothing else escapes, whatever the input. Fields the gateway does not need
(sampling parameters, vendor extras) are left untouched for the backend to judge.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from common.context import ContextError, output_cap

from ..errors import InvalidRequest

#: ``max_tokens`` of a completions request that sets none (OpenAI's and vLLM's default).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
#: Reservation ceiling for a request with no max_tokens on a backend of unknown context length.
UNBOUNDED_RESERVE = 1 << 20


@dataclass(frozen=True, slots=True)
class Fields:
    model: str
    max_tokens: int | None  # the output cap in force; None: chat without one (rest of context)
    max_tokens_param: str  # which of the two the client used (for error messages)
    prompt_param: str  # "messages" or "prompt"
    n: int = 1  # sequences generated (``n``): each holds its own KV and is charged


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(body):
        # "\udcff" is valid JSON but no valid text: nothing downstream could encode it
        raise InvalidRequest("request body contains an unpaired UTF-16 surrogate escape")
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


def _encodable(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return True


def _int_field(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"'{name}' must be an integer", param=name)
    return value


def check_fields(body: dict[str, Any], chat: bool) -> Fields:
    """Check the fields the gateway relies on (types and ranges, not the prompt itself)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required and must be a string", param="model")
    _check_stream(body)
    n = _int_field(body, "n")
    if n is not None and n < 1:
        raise InvalidRequest(f"n must be at least 1, got {n}.")
    best_of = _int_field(body, "best_of")
    if best_of is not None and best_of > 1:
        raise InvalidRequest("best_of > 1 is not supported", param="best_of")
    name, max_tokens = _max_tokens(body, chat)
    return Fields(model, max_tokens, name, "messages" if chat else "prompt", n or 1)


def _check_stream(body: dict[str, Any]) -> None:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidRequest("'stream_options' must be an object", param="stream_options")
        if not stream:
            raise InvalidRequest(
                "Stream options can only be defined when `stream=True`.", param="stream_options"
            )


def _max_tokens(body: dict[str, Any], chat: bool) -> tuple[str, int | None]:
    """The output limit's field name and value. Chat takes max_completion_tokens (the newer
    name) before max_tokens; the legacy completions endpoint knows only max_tokens and, like
    OpenAI and vLLM, defaults it to 16."""
    name = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    max_tokens = _int_field(body, name)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest(f"'{name}' must be at least 1, got {max_tokens}", param=name)
    return name, max_tokens


def output_reservation(
    fields: Fields, prompt_tokens: int, context: int | None, default: int | None
) -> int:
    """Output tokens one sequence will generate at most (what to reserve in the KV budget);
    raises what vLLM raises for a request that cannot run (:mod:`common.context`: a prompt +
    ``max_tokens`` over the context is served with what fits, and only that is reserved).

    ``context`` is the model's context length (None: unknown); ``default`` the configured
    reservation for requests without ``max_tokens`` (None: the rest of the context).
    """
    wanted = fields.max_tokens if fields.max_tokens is not None else default
    if context is None:
        return min(x for x in (wanted, UNBOUNDED_RESERVE) if x is not None)
    try:
        return output_cap(prompt_tokens, wanted, context, fields.max_tokens_param)
    except ContextError as exc:
        raise InvalidRequest(exc.message, param=exc.param) from None
