"""The aiohttp application: routes, start-up and shutdown, the one place errors are rendered.

Every :class:`~gateway.errors.GatewayError` is rendered once, in :func:`_errors_middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from ..config import GatewayConfig
from ..errors import GatewayError, PayloadTooLarge, error_body
from ..upstream import Upstream
from .handlers import chat_completions, completions, health, list_models, metrics
from .state import STATE, build_state

log = logging.getLogger(__name__)


def create_app(
    config: GatewayConfig,
    *,
    upstream: Upstream | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The gateway as an aiohttp application. ``upstream``: the transport to the backends
    (default: HTTP; tests pass :class:`~gateway.upstream.fake.FakeUpstream`); ``clock``:
    monotonic seconds (default :func:`time.monotonic`)."""
    app = web.Application(
        middlewares=[_errors_middleware], client_max_size=config.limits.max_body_bytes
    )
    app[STATE] = build_state(config, upstream=upstream, clock=clock)
    app.cleanup_ctx.append(_lifecycle)
    if config.cluster is not None:
        from .cluster import cluster_context

        app.cleanup_ctx.append(cluster_context)
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
    tasks = [
        asyncio.create_task(state.pool.health_loop(), name="backend-health"),
        asyncio.create_task(state.pool.feedback_loop(), name="backend-feedback"),
        asyncio.create_task(state.pool.quota_loop(), name="backend-quota"),
    ]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
                "BadRequestError" if exc.status < 500 else "InternalServerError",
                exc.status,
            ),
            status=exc.status,
        )
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return web.json_response(
            error_body("internal gateway error", "InternalServerError", 500), status=500
        )
