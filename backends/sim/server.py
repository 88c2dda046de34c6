"""The simulated vLLM OpenAI-compatible HTTP server (aiohttp), a thin shell around the engine.

Routes as ``vllm serve``: ``POST /v1/completions``, ``POST /v1/chat/completions`` (stream and
non-stream), ``GET /v1/models``, ``POST /tokenize``, ``GET /health``, ``GET /metrics``,
``GET /version``. Use :func:`create_app` to mount it, or :class:`SimServer` to run it in-process
on a free port::

    async with SimServer(SimConfig(port=0, speed=10)) as srv:
        client = AsyncOpenAI(base_url=srv.url + "/v1", api_key="x")

Handlers are cancelled when the client disconnects (``handler_cancellation=True``); their
``finally`` aborts the engine request, which frees its KV blocks before the next step.

With a quota (``SimConfig.tpm`` / ``rpm``) the generation routes act as a rate-limited hosted
provider: each request is charged at arrival (:mod:`backends.sim.ratelimit`), every response of
``/v1/completions`` and ``/v1/chat/completions`` carries OpenAI's ``x-ratelimit-*`` headers
(streams too: headers precede the body) and a refused request gets 429 with ``retry-after``,
``retry-after-ms`` and OpenAI's ``rate_limit_exceeded`` error body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from backends.sim.config import SimConfig
from backends.sim.engine import EngineCore
from backends.sim.faults import FAULT_HEADER, FaultInjector, FaultSpec
from backends.sim.loop import EngineDead, EngineLoop, RequestStream
from backends.sim.metrics import SimMetrics
from backends.sim.protocol import (
    GenerateRequest,
    SimError,
    error_body,
    model_not_found,
    parse_generate,
)
from backends.sim.ratelimit import Decision, RateLimiter, format_duration
from backends.sim.sse import DONE, ResponseBuilder, sse_event
from backends.sim.textgen import GeneratedText, TextGenerator, prompt_digest
from common.tokenizer import PromptError, TokenCounter

__all__ = ["STATE", "SimServer", "SimState", "create_app", "run_sim"]

log = logging.getLogger(__name__)

VLLM_VERSION = "0.10.1+sim"
#: Prompts longer than this (characters of JSON) are tokenized in a worker thread.
_OFFLOAD_CHARS = 20_000
_MID_STREAM_FAULTS = frozenset({"drop_mid", "stall_mid", "malformed_sse", "error_mid"})
_MALFORMED_EVENT = b'data: {"id": "cmpl-garbage", "choices": [{"text": \n\n'
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


@dataclass(slots=True)
class SimState:
    """Long-lived objects of one app, stored under :data:`STATE`."""

    config: SimConfig
    core: EngineCore
    engine: EngineLoop
    metrics: SimMetrics
    counter: TokenCounter
    textgen: TextGenerator
    faults: FaultInjector
    limiter: RateLimiter | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    closing: asyncio.Event = field(default_factory=asyncio.Event)


STATE = web.AppKey("sim_state", SimState)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status,
        content_type="application/json",
    )


def _error(exc: SimError) -> web.Response:
    return _json(exc.body(), exc.status)


def _close_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise SimError(413, "request body too large") from exc
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SimError(400, f"invalid JSON in request body: {exc}") from exc


async def _offload(size_hint: int, fn: Callable[[], Any]) -> Any:
    if size_hint < _OFFLOAD_CHARS:
        return fn()
    return await asyncio.get_running_loop().run_in_executor(None, fn)


# ---------------------------------------------------------------------- generation routes


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    if state.limiter is None:
        return await _serve_generate(request, state, chat, {})
    quota_headers: dict[str, str] = {}  # filled when the request is charged
    resp = await _serve_generate(request, state, chat, quota_headers)
    if not resp.prepared:  # a stream sent them itself
        resp.headers.update(quota_headers or state.limiter.quota(time.monotonic()).headers())
    return resp


def _rate_limited(decision: Decision, model: str, window_s: float) -> web.Response:
    """OpenAI's 429: ``rate_limit_exceeded``, the refusing limit as ``type``."""
    assert decision.reason is not None
    quota = decision.quota
    per = "min" if window_s == 60 else format_duration(window_s)
    if decision.reason == "requests":
        what, limit, used, asked = "requests", quota.limit_requests, decision.used_requests, 1
    else:
        what, limit, used, asked = "tokens", quota.limit_tokens, decision.used_tokens, decision.cost
    message = (
        f"Rate limit reached for {model} on {what} per {per} ({what[0].upper()}PM): "
        f"Limit {limit}, Used {used}, Requested {asked}. "
        f"Please try again in {format_duration(decision.retry_after)}."
    )
    body = {
        "error": {
            "message": message,
            "type": decision.reason,
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    return _json(body, 429)


async def _serve_generate(
    request: web.Request, state: SimState, chat: bool, quota_headers: dict[str, str]
) -> web.StreamResponse:
    try:
        fault = state.faults.pick(request.headers.get(FAULT_HEADER))
    except ValueError as exc:
        return _error(SimError(400, f"bad {FAULT_HEADER} header: {exc}", FAULT_HEADER))
    if fault is not None and fault.kind == "refuse":
        _close_connection(request)
        return web.Response(status=503)  # never reaches the client: the connection is gone
    try:
        body = await _read_json(request)
        cfg = state.core.config
        parsed: GenerateRequest = await _offload(
            request.content_length or 0,
            lambda: parse_generate(
                body,
                chat=chat,
                served_models=(state.config.model,),
                max_model_len=cfg.max_model_len,
                counter=state.counter,
            ),
        )
        problem = state.core.check_request(parsed.prompt_tokens, parsed.max_tokens)
        if problem is not None:
            raise SimError(400, problem, "max_tokens")
        if fault is not None and fault.kind == "error_500":
            raise SimError(500, "injected fault: error_500")
        if state.engine.dead is not None:
            raise SimError(500, f"engine is dead: {state.engine.dead}")
        text = state.textgen.generate(
            prompt_key=prompt_digest(parsed.prompt_key),
            max_tokens=parsed.max_tokens,
            request_seed=parsed.seed,
            ignore_eos=parsed.ignore_eos,
            min_tokens=parsed.min_tokens,
            stop=parsed.stop,
        )
        if state.limiter is not None:
            decision = state.limiter.admit(time.monotonic(), parsed.prompt_tokens + text.num_tokens)
            quota_headers.update(decision.headers())
            if not decision.accepted:
                return _rate_limited(decision, parsed.model, state.limiter.limits.window_s)
        builder = ResponseBuilder(
            chat=chat,
            model=parsed.model,
            prompt_tokens=parsed.prompt_tokens,
            continuous_usage=parsed.continuous_usage,
        )
        try:
            stream = state.engine.submit(
                builder.id, parsed.prompt_tokens, parsed.max_tokens, text.num_tokens
            )
        except ValueError as exc:
            raise SimError(400, str(exc)) from exc
        except EngineDead as exc:
            raise SimError(500, f"engine is dead: {exc}") from exc
    except SimError as exc:
        return _error(exc)
    try:
        if parsed.stream:
            return await _stream(
                request, state, parsed, text, builder, stream, fault, quota_headers
            )
        return await _complete(request, state, text, builder, stream, fault)
    finally:
        state.engine.abort(builder.id)  # no-op when finished; frees the KV when not


async def _stream(
    request: web.Request,
    state: SimState,
    parsed: GenerateRequest,
    text: GeneratedText,
    builder: ResponseBuilder,
    stream: RequestStream,
    fault: FaultSpec | None,
    quota_headers: dict[str, str],
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={**_SSE_HEADERS, **quota_headers})
    await resp.prepare(request)
    mid = fault.kind if fault is not None and fault.kind in _MID_STREAM_FAULTS else None
    slow_first = fault.delay if fault is not None and fault.kind == "slow_first" else None
    after = fault.after if fault is not None else 0
    chat = parsed.chat
    try:
        while True:
            try:
                outputs = await stream.get()
            except EngineDead as exc:
                await resp.write(sse_event(error_body(str(exc), 500)) + DONE)
                await resp.write_eof()
                return resp
            buf = bytearray()
            for out in outputs:
                idx = out.num_output_tokens - 1
                if mid is not None and idx == after:
                    if mid == "malformed_sse":
                        buf += _MALFORMED_EVENT
                        mid = None
                    else:
                        if buf:
                            await resp.write(bytes(buf))
                        await _mid_stream_fault(request, state, builder.id, mid, resp)
                        return resp
                if out.first_token:
                    if slow_first is not None:
                        await asyncio.sleep(slow_first)
                    if chat:
                        buf += builder.role_chunk()
                if out.finished:
                    buf += builder.token_chunk(
                        text.deltas[idx],
                        out.num_output_tokens,
                        text.finish_reason,
                        text.stop_reason,
                    )
                    if parsed.include_usage:
                        buf += builder.usage_chunk(out.num_output_tokens)
                    buf += DONE
                    await resp.write(bytes(buf))
                    await resp.write_eof()
                    return resp
                buf += builder.token_chunk(text.deltas[idx], out.num_output_tokens)
            await resp.write(bytes(buf))
    except ConnectionError:
        return resp  # the client left; the caller's finally aborts the engine request


async def _mid_stream_fault(
    request: web.Request, state: SimState, req_id: str, kind: str, resp: web.StreamResponse
) -> None:
    state.engine.abort(req_id)
    if kind == "drop_mid":
        _close_connection(request)
    elif kind == "stall_mid":
        await state.closing.wait()  # until the client leaves (cancelled) or shutdown
    elif kind == "error_mid":
        body = error_body("injected fault: error_mid", 500)
        await resp.write(sse_event(body) + DONE)
        await resp.write_eof()


async def _complete(
    request: web.Request,
    state: SimState,
    text: GeneratedText,
    builder: ResponseBuilder,
    stream: RequestStream,
    fault: FaultSpec | None,
) -> web.StreamResponse:
    kind = fault.kind if fault is not None else None
    after = fault.after if fault is not None else 0
    while True:
        try:
            outputs = await stream.get()
        except EngineDead as exc:
            return _error(SimError(500, str(exc)))
        for out in outputs:
            idx = out.num_output_tokens - 1
            if kind in ("drop_mid", "stall_mid", "error_mid") and idx == after:
                state.engine.abort(builder.id)
                if kind == "drop_mid":
                    _close_connection(request)
                    return web.Response(status=503)
                if kind == "stall_mid":
                    await state.closing.wait()
                    return web.Response(status=503)
                return _error(SimError(500, "injected fault: error_mid"))
            if out.first_token and kind == "slow_first" and fault is not None:
                await asyncio.sleep(fault.delay)
            if out.finished:
                if kind == "malformed_sse":
                    return web.Response(
                        body=b'{"id": "cmpl-garbage", "choices": [', content_type="application/json"
                    )
                return _json(
                    builder.full_response(
                        text.text, out.num_output_tokens, text.finish_reason, text.stop_reason
                    )
                )


async def handle_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    return await _generate(request, chat=False)


async def handle_chat(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    return await _generate(request, chat=True)


# ---------------------------------------------------------------------- other routes


async def handle_models(request: web.Request) -> web.Response:
    """GET /v1/models: vLLM's ``ModelList`` with one ``ModelCard``."""
    state = request.app[STATE]
    name = state.config.model
    permission = {
        "id": f"modelperm-{uuid.uuid4().hex}",
        "object": "model_permission",
        "created": state.created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "vllm",
        "root": name,
        "parent": None,
        "max_model_len": state.core.config.max_model_len,
        "permission": [permission],
    }
    return _json({"object": "list", "data": [card]})


async def handle_tokenize(request: web.Request) -> web.Response:
    """POST /tokenize: ``{model, prompt | messages}`` -> ``{count, max_model_len, tokens}``."""
    state = request.app[STATE]
    try:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise SimError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != state.config.model:
            raise model_not_found(model, (state.config.model,))
        counter = state.counter
        try:
            if "messages" in body:
                messages = body["messages"]
                tokens = await _offload(
                    request.content_length or 0, lambda: _chat_token_ids(counter, messages)
                )
            elif "prompt" in body:
                prompt = body["prompt"]
                tokens = await _offload(
                    request.content_length or 0, lambda: _prompt_token_ids(counter, prompt)
                )
            else:
                raise SimError(400, "either 'prompt' or 'messages' is required")
        except PromptError as exc:
            raise SimError(400, str(exc), exc.param) from exc
    except SimError as exc:
        return _error(exc)
    return _json(
        {
            "count": len(tokens),
            "max_model_len": state.core.config.max_model_len,
            "tokens": tokens,
            "token_strs": None,
        }
    )


#: Stand-in id for chat template tokens (cl100k ``<|im_start|>``).
_TEMPLATE_TOKEN = 100264


def _chat_token_ids(counter: TokenCounter, messages: Any) -> list[int]:
    """Token ids whose count equals the chat prompt count (template tokens padded in)."""
    count = counter.count_chat(messages)
    ids: list[int] = []
    for msg in messages:
        ids.append(_TEMPLATE_TOKEN)
        ids.extend(counter.encoder.encode(str(msg.get("role", ""))))
        content = msg.get("content")
        if isinstance(content, str):
            ids.extend(counter.encoder.encode(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    ids.extend(counter.encoder.encode(part["text"]))
                elif isinstance(part, str):
                    ids.extend(counter.encoder.encode(part))
    ids = ids[:count]
    ids.extend([_TEMPLATE_TOKEN] * (count - len(ids)))
    return ids


def _prompt_token_ids(counter: TokenCounter, prompt: Any) -> list[int]:
    counter.count_prompt(prompt)  # validates the form
    if isinstance(prompt, str):
        return list(counter.encoder.encode(prompt))
    if all(isinstance(t, int) for t in prompt):
        return list(prompt)
    (only,) = prompt
    return list(counter.encoder.encode(only)) if isinstance(only, str) else list(only)


async def handle_health(request: web.Request) -> web.Response:
    """GET /health: 200 with an empty body (503 once the engine is dead)."""
    return web.Response(status=503 if request.app[STATE].engine.dead is not None else 200)


async def handle_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = generate_latest(request.app[STATE].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def handle_sim_stats(request: web.Request) -> web.Response:
    """GET /sim/stats (simulator only): engine-loop timing, engine-core counters and the
    quota's counters (``ratelimit``, ``null`` without a quota)."""
    state = request.app[STATE]
    stats = state.engine.stats()
    core = state.core
    return _json(
        {
            "speed": state.engine.speed,
            "loop": {**asdict(stats), "lag_ratio": stats.lag_ratio},
            "engine": {
                "num_running": core.num_running,
                "num_waiting": core.num_waiting,
                "kv_usage": core.kv_usage,
                "num_preemptions": core.num_preemptions,
                "num_steps": core.num_steps,
                "generated_tokens": core.generated_tokens,
            },
            "ratelimit": _quota_stats(state.limiter),
        }
    )


def _quota_stats(limiter: RateLimiter | None) -> dict[str, Any] | None:
    if limiter is None:
        return None
    requests, tokens = limiter.usage(time.monotonic())
    lim = limiter.limits
    return {
        "tpm": lim.tpm,
        "rpm": lim.rpm,
        "window_s": lim.window_s,
        "accepted_requests": limiter.accepted_requests,
        "accepted_tokens": limiter.accepted_tokens,
        "refused": dict(limiter.refused),
        "refused_tokens": limiter.refused_tokens,
        "window_requests": requests,
        "window_tokens": tokens,
    }


async def handle_sim_stats_reset(request: web.Request) -> web.Response:
    """POST /sim/stats/reset (simulator only): zero the loop timing counters."""
    request.app[STATE].engine.reset_stats()
    return web.Response(status=204)


async def handle_version(request: web.Request) -> web.Response:
    """GET /version."""
    return _json({"version": VLLM_VERSION})


@web.middleware
async def _fastapi_style_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown routes and methods answer like FastAPI (``{"detail": ...}``)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json({"detail": "Not Found"}, 404)
    except web.HTTPMethodNotAllowed:
        return _json({"detail": "Method Not Allowed"}, 405)


# ---------------------------------------------------------------------- app and server


def create_app(config: SimConfig) -> web.Application:
    """Build the app: engine core, metrics, routes; the engine loop runs in ``cleanup_ctx``."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_fastapi_style_errors])
    core = EngineCore(config.engine_config(), config.cost_model())
    limits = config.rate_limits()
    limiter = RateLimiter(limits) if limits is not None else None
    metrics = SimMetrics(core, config.model, limiter=limiter)
    state = SimState(
        config=config,
        core=core,
        engine=EngineLoop(core, speed=config.speed, metrics=metrics),
        metrics=metrics,
        counter=TokenCounter(),
        textgen=TextGenerator(config.seed, config.median_output_tokens),
        faults=FaultInjector(config.faults, config.seed),
        limiter=limiter,
    )
    app[STATE] = state

    async def engine_ctx(app: web.Application) -> AsyncIterator[None]:
        state.engine.start()
        yield
        await state.engine.stop()

    async def on_shutdown(app: web.Application) -> None:
        state.closing.set()
        state.engine.fail_all(EngineDead("the server is shutting down"))

    app.cleanup_ctx.append(engine_ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post("/tokenize", handle_tokenize)
    app.router.add_get("/health", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/version", handle_version)
    app.router.add_get("/sim/stats", handle_sim_stats)
    app.router.add_post("/sim/stats/reset", handle_sim_stats_reset)
    return app


class SimServer:
    """Run a simulated server in-process: ``async with SimServer(config) as srv: srv.url``.

    Binds ``config.host:config.port`` (use port 0 for a free port; the default config here
    uses port 0). ``srv.core`` and ``srv.engine`` expose the engine for tests.
    """

    def __init__(self, config: SimConfig | None = None, *, shutdown_timeout: float = 2.0) -> None:
        self.config = config if config is not None else SimConfig(port=0)
        self.app = create_app(self.config)
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
        )
        self._port: int | None = None

    @property
    def state(self) -> SimState:
        """The app's long-lived objects."""
        return self.app[STATE]

    @property
    def core(self) -> EngineCore:
        """The engine core (read its stats; do not step it)."""
        return self.state.core

    @property
    def engine(self) -> EngineLoop:
        """The engine loop."""
        return self.state.engine

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` (no trailing slash, no ``/v1``)."""
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> str:
        """Bind and serve; returns :attr:`url`."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        address = self._runner.addresses[0]
        self._port = int(address[1])
        return self.url

    async def stop(self) -> None:
        """Stop serving, fail open streams, stop the engine loop."""
        await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def run_sim(config: SimConfig | None = None, **overrides: Any) -> AsyncIterator[SimServer]:
    """``async with run_sim(speed=0) as srv:`` -- a :class:`SimServer` on a free port.

    Keyword overrides replace fields of ``config`` (default: ``SimConfig(port=0)``).
    """
    cfg = config if config is not None else SimConfig(port=0)
    if overrides:
        cfg = replace(cfg, **overrides)
    async with SimServer(cfg) as srv:
        yield srv
