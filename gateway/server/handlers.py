"""Route handlers: the request lifecycle up to the dispatcher's grant.

``POST /v1/chat/completions`` and ``/v1/completions``: authenticate → read and validate the
body → count prompt tokens → queue in the tenant's FIFO and wait for the dispatcher's grant →
hand over to :func:`~gateway.server.proxy.forward`. Also ``GET /v1/models``, ``/health`` and
``/metrics``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.tokenizer import PromptError

from ..errors import (
    SHUTTING_DOWN,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    ShuttingDown,
)
from ..scheduler import Job
from .proxy import forward
from .relay import UpstreamPayload, client_format
from .state import STATE, GatewayState
from .validate import check_fields, output_reservation, parse_body

#: Prompts longer than this many bytes are tokenized in a worker thread.
OFFLOAD_TOKENIZE_BYTES = 16 * 1024


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.auth.authenticate(request.headers)
    return web.json_response({"object": "list", "data": state.pool.models()})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    backends = [
        {
            "name": b.name,
            "up": b.up,
            "models": sorted(b.models),
            "in_flight": b.in_flight,
            "max_num_seqs": b.max_num_seqs,
            "reserved_tokens": b.reserved_tokens,
            "max_kv_tokens": b.max_kv_tokens,
        }
        for b in state.pool.snapshot()
    ]
    up = any(b["up"] for b in backends) and not state.draining
    body = {
        "status": "ok" if up else "unavailable",
        "draining": state.draining,
        "queued": state.dispatcher.core.total_queued(),
        "backends": backends,
    }
    return web.json_response(body, status=200 if up else 503)


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[STATE].recorder.registry)
    resp = web.Response(body=data)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = state.clock()
    tenant = state.auth.authenticate(request.headers)
    try:  # from here on the tenant is known: every way out is counted by its outcome
        if state.draining:
            raise ShuttingDown(SHUTTING_DOWN)
        body, size = await _read_json(request)
        model, prompt_tokens, reserve = await _validate(state, body, chat, size)
        payload = _upstream_payload(body)
        job = Job(
            tenant=tenant,
            prompt_tokens=prompt_tokens,
            max_tokens=reserve,
            arrival=arrival,
            model=model,
            endpoint="chat" if chat else "completions",
        )
        grant = await state.dispatcher.acquire(job, state.config.limits.queue_timeout_s)
    except GatewayError as exc:  # invalid, queue full, rate limited, timeout, draining, removed
        state.stats.outcome(tenant, exc.outcome)
        raise
    except asyncio.CancelledError:
        state.stats.outcome(tenant, "client_cancelled")
        raise
    lab = state.stats.label(tenant)
    state.recorder.observe(state.recorder.queue_wait, lab, state.clock() - arrival)
    return await forward(request, state, job, grant, payload, client_format(body, chat), chat)


def _upstream_payload(body: dict[str, Any]) -> UpstreamPayload:
    """The backend's request body, built before queueing so that a body that cannot be
    re-encoded (e.g. an integer too wide for the JSON encoder) is a 400, not a held slot."""
    try:
        return UpstreamPayload(body)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidRequest(
            f"request body cannot be forwarded: {exc.__class__.__name__}"
        ) from None


async def _read_json(request: web.Request) -> tuple[dict[str, Any], int]:
    """The body as a JSON object, and its size in bytes."""
    limit = request.app[STATE].config.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    raw = await request.read()
    return parse_body(raw), len(raw)


async def _validate(
    state: GatewayState, body: dict[str, Any], chat: bool, body_bytes: int
) -> tuple[str, int, int]:
    """Check the body; return (model, prompt token estimate, output tokens to reserve)."""
    fields = check_fields(body, chat)
    model = fields.model
    if not state.pool.serves(model):
        served = ", ".join(m["id"] for m in state.pool.models())
        raise ModelNotFound(
            f"The model `{model}` does not exist. Valid aliases: {served}.", param="model"
        )
    try:
        if body_bytes > OFFLOAD_TOKENIZE_BYTES:  # large prompt: keep the event loop free
            loop = asyncio.get_running_loop()
            prompt_tokens = await loop.run_in_executor(
                None, state.counter.count_request, body, chat
            )
        else:
            prompt_tokens = state.counter.count_request(body, chat)
    except PromptError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    if state.config.tokenizer == "backend":
        remote = await state.pool.remote_count(model, body, chat)
        if remote is not None:
            prompt_tokens = remote
    reserve = output_reservation(
        fields,
        prompt_tokens,
        state.pool.max_model_len(model),
        state.config.limits.max_tokens_default,
    )
    # n sequences: each holds the prompt and its own output in vLLM's KV cache (prefix caching
    # may share prompt blocks: this errs on the safe side), and every output token is charged.
    # The job's output reservation carries the other sequences' share, so that the dispatcher
    # books n * (prompt + reserve).
    n = fields.n
    needed = n * (prompt_tokens + reserve)
    if not state.admission.can_ever_fit(model, needed):
        per_seq = f" for each of n={n} sequences" if n > 1 else ""
        raise InvalidRequest(
            f"request needs {needed} KV tokens ({prompt_tokens} prompt + {reserve} output"
            f"{per_seq}), more than any backend serving `{model}` can hold; lower "
            f"'{fields.max_tokens_param}' or the prompt",
            param=fields.max_tokens_param,
        )
    return model, prompt_tokens, needed - prompt_tokens
