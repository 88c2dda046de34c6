"""The proxy pipeline: forward a granted request upstream, relay the stream, settle up.

Forward to the granted backend (another healthy one if it refuses before streaming) → relay
chunks to the client while charging output tokens → reconcile with the backend's ``usage`` and
release the slot, in a ``finally`` that runs whatever happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..dispatcher import Grant
from ..errors import (
    BackendError,
    BackendRejected,
    BackendUnreachable,
    StreamBroken,
    error_body,
    sse_error_event,
)
from ..outcomes import Outcome
from ..scheduler import Job
from ..upstream import UpstreamStream
from .relay import DONE, ChunkProcessor, ClientFormat, UpstreamPayload
from .state import GatewayState

#: Above this many bytes waiting in the client's socket buffer, a write may block on the
#: client: it is bounded by limits.client_write_timeout_s (a client that stops reading must not
#: hold its batch slot forever).
WRITE_BUFFER_HIGH = 64 * 1024


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


def _sse(obj: dict[str, Any]) -> bytes:
    """An SSE event as vLLM renders its error events (``json.dumps`` defaults)."""
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class _ClientStalled(Exception):
    """The client read nothing for limits.client_write_timeout_s; its connection is gone."""


async def forward(
    request: web.Request,
    state: GatewayState,
    job: Job,
    first_grant: Grant,
    payload: UpstreamPayload,
    fmt: ClientFormat,
    chat: bool,
) -> web.StreamResponse:
    """Send the granted job upstream and relay it; the ``finally`` releases whatever happens."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    grant: Grant | None = first_grant
    tried: list[str] = []
    ran = False
    outcome: Outcome = "backend_error"
    dispatcher = state.dispatcher
    core = dispatcher.core
    on_output = core.on_output
    stats = state.stats

    def charge(n: int) -> None:  # per output token: the scheduler, admission's view of it
        on_output(job, grant, n, proc.prompt_tokens)

    released = False

    def upstream_done() -> None:
        """The backend finished the request: free its slot before the client reads the end
        (a client that sends its next request on seeing it finds this one released)."""
        nonlocal released
        if grant is not None and not released:
            released = True
            if proc.prompt_tokens is not None:
                job.prompt_tokens = proc.prompt_tokens
            core.release(job, grant, ran=True, output_tokens=proc.reported_completion)

    proc = ChunkProcessor(job, fmt, charge, state.counter)
    try:
        while grant is not None:
            backend = grant.backend.name
            tried.append(backend)
            try:
                target = state.pool.states[backend]
                body = payload.encoded(target.engine.continuous_usage)
                async with state.upstream.open(target.url, path, body) as stream:
                    ran = True
                    state.pool.record_success(backend)
                    if stream.rate_headers:
                        state.pool.learn_rates(backend, stream.rate_headers)
                    outcome, response = await _relay(
                        request, state, job, proc, stream, backend, upstream_done
                    )
                    if outcome == "rejected_invalid":
                        ran = False  # refused before generating: nothing to charge
                    return response
            except BackendUnreachable as exc:
                state.pool.record_failure(backend, exc.kind)
                grant = core.move(job, grant, tried)
            except BackendRejected as exc:
                if exc.status != 429:
                    outcome = exc.outcome
                    ran = False
                    raise
                # a provider's quota said no: not the client's problem. Its budget backs off
                # and the request goes back to its tenant's queue (refunded, its booking void)
                state.pool.rate_limited(backend, exc.rate_headers)
                state.admission.void(grant.reservation)
                core.release(job, grant, ran=False)
                grant = None
                tried.clear()
                left = state.config.limits.queue_timeout_s - (state.clock() - job.arrival)
                grant = await dispatcher.acquire(job, max(0.0, left))
        raise BackendError("no healthy backend could take the request")
    except (asyncio.CancelledError, ConnectionResetError):
        # the client went away: cancelled handler, or a write to its closed connection
        outcome = "client_cancelled"
        raise
    finally:
        if proc.prompt_tokens is not None:
            job.prompt_tokens = proc.prompt_tokens
        if released:
            pass  # released when the backend finished (upstream_done)
        elif grant is not None:  # reconciled with the backend's own output count if it sent one
            core.release(job, grant, ran=ran, output_tokens=proc.reported_completion)
        elif tried:
            # move() found no other backend and already returned the reservation (after a
            # provider's 429 the job was released and requeued: nothing is left to undo)
            core.abandon(job)
        if ran:
            stats.prompt_tokens[job.tenant] += job.prompt_tokens
            stats.completion_tokens[job.tenant] += job.output_tokens
        stats.outcome(job.tenant, outcome)
        if outcome == "ok":
            rec = state.recorder
            rec.observe(rec.e2e, stats.label(job.tenant), state.clock() - job.arrival)


async def _relay(
    request: web.Request,
    state: GatewayState,
    job: Job,
    proc: ChunkProcessor,
    stream: UpstreamStream,
    backend: str,
    upstream_done: Callable[[], None],
) -> tuple[Outcome, web.StreamResponse]:
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
    try:
        if resp is not None:
            await resp.prepare(request)
        async for batch in stream.batches():  # one client write per upstream read
            out = proc.feed_batch(batch)
            if waiting_first and job.output_tokens:
                waiting_first = False
                state.recorder.observe(state.recorder.ttft, lab, state.clock() - job.arrival)
            if out and resp is not None:
                if transport is not None and transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                    await _write_or_drop(resp, out, transport, write_timeout)
                else:
                    await resp.write(out)
            if proc.malformed is not None:
                raise StreamBroken("backend sent a malformed event")
            if proc.error is not None:
                err = proc.error.get("error")
                code = err.get("code") if isinstance(err, dict) else None
                if isinstance(code, int) and 400 <= code < 500 and not job.output_tokens:
                    # vLLM refuses some requests only once streaming (token ids out of the
                    # vocabulary, ...): the request's fault, answered as vLLM answers it
                    if resp is None:
                        raise BackendRejected(code, proc.error)
                    await _end(resp, _sse(proc.error) + DONE)
                    return "rejected_invalid", resp
                message = err.get("message") if isinstance(err, dict) else None
                raise StreamBroken(str(message or "backend error"))
    except (_ClientStalled, ConnectionResetError):
        # the client stopped reading, or closed its connection while a write was under way
        # (before the handler's cancellation arrived): an ordinary disconnect, not an error;
        # the caller closes the upstream stream (vLLM aborts the request)
        assert resp is not None
        return "client_cancelled", resp
    except StreamBroken as exc:
        state.pool.record_failure(backend, exc.kind)
        msg = f"backend stream failed: {exc}"
        if resp is None:
            return "backend_error", web.json_response(
                error_body(msg, BackendError.type, 502), status=502
            )
        await _end(resp, sse_error_event(msg, BackendError.type, 502) + DONE)
        return "backend_error", resp
    upstream_done()
    if resp is None:
        return "ok", web.json_response(proc.assembled(job.model))
    await _end(resp, DONE)
    return "ok", resp


async def _end(resp: web.StreamResponse, data: bytes) -> None:
    """Write the stream's last bytes; a client that closed meanwhile is no error (the outcome
    was decided before)."""
    try:
        await resp.write(data)
        await resp.write_eof()
    except ConnectionResetError:
        pass


# ---------------------------------------------------------------------------------------------
