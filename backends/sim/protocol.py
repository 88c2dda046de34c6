"""Request validation and errors, as vLLM's OpenAI server answers them.

Every bad input becomes a :class:`SimError` rendered in vLLM's shape
``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status and ``type``
vLLM's names (``BadRequestError`` 400, ``NotFoundError`` 404, ``InternalServerError`` 500).
Nothing here raises anything else for bad input, so no bad request can become a 500.

Accepted like vLLM: chat ``content`` as a string or a list of text parts;
``max_completion_tokens`` (chat) before ``max_tokens``; completions ``prompt`` as a string, a list
holding one string, token ids, or a list holding one list of token ids; vLLM extras
``ignore_eos``, ``min_tokens``, ``top_k``...; unknown fields are ignored. Defaults as vLLM:
completions ``max_tokens`` 16, chat ``max_tokens`` = ``max_model_len - prompt_tokens``; a
``max_tokens`` that does not fit after the prompt is lowered to fit (vLLM 0.32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.context import ContextError, output_cap
from common.tokenizer import PromptError, TokenCounter

__all__ = ["ERROR_TYPES", "GenerateRequest", "SimError", "error_body", "parse_generate"]

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}

_NUMERIC_SAMPLING = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
)


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body for an HTTP status."""
    err_type = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def model_not_found(model: str, served: tuple[str, ...]) -> SimError:
    """vLLM's 404 for an unknown model, listing the served names."""
    return SimError(
        404, f"The model `{model}` does not exist. Valid aliases: {', '.join(served)}.", "model"
    )


class SimError(Exception):
    """A request the simulator refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The error body in vLLM's shape."""
        return error_body(self.message, self.status, self.param)


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated ``/v1/completions`` or ``/v1/chat/completions`` request."""

    chat: bool
    model: str
    prompt_tokens: int
    prompt_key: object  # what the output text is seeded from (messages or prompt)
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    stop: tuple[str, ...]
    seed: int | None
    ignore_eos: bool
    min_tokens: int


def _bad(message: str, param: str | None = None) -> SimError:
    return SimError(400, message, param)


def _opt_int(body: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"'{key}' must be an integer, got {type(value).__name__}", key)
    if minimum is not None and value < minimum:
        raise _bad(f"'{key}' must be at least {minimum}, got {value}", key)
    return value


def _opt_bool(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, got {type(value).__name__}", key)
    return value


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise _bad("'stop' must be a string or an array of strings", "stop")


def parse_generate(
    body: Any,
    *,
    chat: bool,
    served_models: tuple[str, ...],
    max_model_len: int,
    counter: TokenCounter,
) -> GenerateRequest:
    """Validate a request body and count its prompt tokens; raises :class:`SimError`."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_models[0]
    elif not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    elif model not in served_models:
        raise model_not_found(model, served_models)

    n = _opt_int(body, "n", minimum=1)
    if n is not None and n > 1:
        raise _bad("n > 1 is not supported by the simulator; send one request per choice", "n")
    best_of = _opt_int(body, "best_of", minimum=1)
    if best_of is not None and best_of > 1:
        raise _bad("best_of > 1 is not supported by the simulator", "best_of")
    if not chat and _opt_bool(body, "echo"):
        raise _bad("echo is not supported by the simulator", "echo")
    for key in _NUMERIC_SAMPLING:
        value = body.get(key)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise _bad(f"'{key}' must be a number", key)
    _opt_int(body, "top_k")
    seed = _opt_int(body, "seed")
    stream = bool(_opt_bool(body, "stream"))
    ignore_eos = bool(_opt_bool(body, "ignore_eos"))
    min_tokens = _opt_int(body, "min_tokens", minimum=0) or 0
    stop = _stop_strings(body.get("stop"))

    options = body.get("stream_options")
    include_usage = continuous_usage = False
    if options is not None:
        if not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        include_usage = bool(_opt_bool(options, "include_usage"))
        # as vLLM: per-chunk usage only together with include_usage
        continuous_usage = include_usage and bool(_opt_bool(options, "continuous_usage_stats"))

    try:
        if chat:
            if "messages" not in body:
                raise _bad("'messages' is required", "messages")
            prompt_tokens = counter.count_chat(body["messages"])
            prompt_key: object = body["messages"]
        else:
            if "prompt" not in body:
                raise _bad("'prompt' is required", "prompt")
            prompt_tokens = counter.count_prompt(body["prompt"])
            prompt_key = body["prompt"]
    except PromptError as exc:
        raise _bad(str(exc), exc.param) from exc
    if prompt_tokens < 1:
        raise _bad("the prompt must contain at least one token", "messages" if chat else "prompt")

    max_key = "max_tokens"
    requested: int | None
    if chat:
        requested = _opt_int(body, "max_completion_tokens", minimum=1)
        if requested is not None:
            max_key = "max_completion_tokens"
        else:
            requested = _opt_int(body, "max_tokens", minimum=1)
    else:
        requested = _opt_int(body, "max_tokens", minimum=1)
        if requested is None and "max_tokens" not in body:
            requested = 16
    # vLLM 0.32's context rule (the gateway applies the same one): max_tokens over the context
    # and a prompt over it are refused; otherwise the output is capped by the room left
    try:
        max_tokens = output_cap(prompt_tokens, requested, max_model_len, max_key)
    except ContextError as exc:
        raise _bad(exc.message, exc.param) from None
    if min_tokens > max_tokens:
        raise _bad(f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})", "min_tokens")

    return GenerateRequest(
        chat=chat,
        model=model,
        prompt_tokens=prompt_tokens,
        prompt_key=prompt_key,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        stop=stop,
        seed=seed,
        ignore_eos=ignore_eos,
        min_tokens=min_tokens,
    )
