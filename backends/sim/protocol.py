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


def _model(body: dict[str, Any], served_models: tuple[str, ...]) -> str:
    """The requested model (the first served one when absent)."""
    model = body.get("model")
    if model is None:
        return served_models[0]
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model not in served_models:
        raise model_not_found(model, served_models)
    return model


def _check_sampling(body: dict[str, Any], chat: bool) -> None:
    """Refuse what the simulator cannot do (several choices, echo) and badly typed sampling
    parameters (whose values it otherwise ignores)."""
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


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    """``stream_options``: (include_usage, continuous_usage_stats)."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(_opt_bool(options, "include_usage"))
    # as vLLM: per-chunk usage only together with include_usage
    return include_usage, include_usage and bool(_opt_bool(options, "continuous_usage_stats"))


def _prompt(body: dict[str, Any], chat: bool, counter: TokenCounter) -> tuple[int, object]:
    """The prompt's token count (at least one) and what the output text is seeded from."""
    param = "messages" if chat else "prompt"
    if param not in body:
        raise _bad(f"'{param}' is required", param)
    try:
        if chat:
            prompt_tokens = counter.count_chat(body["messages"])
        else:
            prompt_tokens = counter.count_prompt(body["prompt"])
    except PromptError as exc:
        raise _bad(str(exc), exc.param) from exc
    if prompt_tokens < 1:
        raise _bad("the prompt must contain at least one token", param)
    return prompt_tokens, body[param]


def _requested_output(body: dict[str, Any], chat: bool) -> tuple[int | None, str]:
    """The output limit the request asks for (None: the rest of the context) and its key:
    chat's ``max_completion_tokens`` before ``max_tokens``; completions default to 16."""
    if chat:
        requested = _opt_int(body, "max_completion_tokens", minimum=1)
        if requested is not None:
            return requested, "max_completion_tokens"
        return _opt_int(body, "max_tokens", minimum=1), "max_tokens"
    requested = _opt_int(body, "max_tokens", minimum=1)
    if requested is None and "max_tokens" not in body:
        requested = 16
    return requested, "max_tokens"


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
    model = _model(body, served_models)
    _check_sampling(body, chat)
    seed = _opt_int(body, "seed")
    stream = bool(_opt_bool(body, "stream"))
    ignore_eos = bool(_opt_bool(body, "ignore_eos"))
    min_tokens = _opt_int(body, "min_tokens", minimum=0) or 0
    stop = _stop_strings(body.get("stop"))
    include_usage, continuous_usage = _stream_options(body, stream)
    prompt_tokens, prompt_key = _prompt(body, chat, counter)
    requested, max_key = _requested_output(body, chat)
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
