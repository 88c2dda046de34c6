"""Dispatcher: the asyncio glue between waiting handlers and the dispatch core.

The decisions (which job, which backend, what is charged and booked) are taken by the pure
:class:`gateway.core.DispatchCore`, the same code the fairness lab runs in virtual time. This
layer adds what only a live server has: one future per queued request, resolved by the core's
grant the moment the job's turn comes and it fits on a backend (nothing polls), queue timeouts,
and withdrawal of a request whose client went away.

The core pumps synchronously whenever something that can free or use capacity happens: a
request arrives, a request finishes and releases its slot, a backend comes back up, limits
change.

Cleanup lives in ``finally`` blocks: a handler cancelled while queued removes its job (nothing
charged); one cancelled just after its grant was decided gives the slot back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .admission import AdmissionController
from .core import CoreOptions, DispatchCore, Grant
from .errors import TENANT_REMOVED, RateLimited, Unauthorized, Unavailable
from .scheduler import Job, QueueRejected

log = logging.getLogger(__name__)

__all__ = ["Dispatcher", "Grant"]


def _is_live(job: Job) -> bool:
    fut: asyncio.Future[Grant] = job.payload
    return not fut.done()


class Dispatcher:
    """Futures, timeouts and withdrawal around :attr:`core`, which holds the settings, the
    tenants and their limits, and takes every decision: callers set tenants, read the queues
    and drive the running side (``on_output``, ``release``, ``move``, ``abandon``, the pumps)
    on ``dispatcher.core`` directly."""

    #: the dispatch core's class (scale-out swaps in one that claims slots through Redis)
    core_class: type[DispatchCore] = DispatchCore

    def __init__(
        self,
        admission: AdmissionController,
        options: CoreOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        observe_pump: Callable[[float], None] | None = None,
    ) -> None:
        self.core = self.core_class(
            admission,
            self._granted,
            options,
            clock=clock,
            is_live=_is_live,
            observe_pump=observe_pump,
            on_hold=self._hold_timer,
        )
        self._waiting: set[Job] = set()  # queued jobs whose handler awaits a grant
        self._closed: Exception | None = None  # set by close(): no new work
        #: Called with each job as it is dispatched (tests, tracing); must not raise.
        self.on_dispatch: Callable[[Job], None] | None = None

    # -- tenants -----------------------------------------------------------------------------
    def remove_tenant(self, name: str, exc: Exception) -> int:
        """A reload removed ``name``: forget its limits and answer its queued jobs with ``exc``
        (uncharged). Its running jobs finish normally; its counter stays in the schedulers, so
        a tenant that comes back later is not reset to zero. Returns how many were failed."""
        self.core.forget_tenant(name)
        failed = self.fail_waiting(exc, tenant=name)
        self.core.pump_all()
        return failed

    # -- request side ------------------------------------------------------------------------
    def close(self, exc: Exception) -> int:
        """Stop taking work (shutdown): answer every queued job with ``exc`` and refuse new ones
        with it too, including requests authenticated before the close. Returns how many queued
        jobs were answered."""
        self._closed = exc
        self.core.expire_holds(everything=True)
        return self.fail_waiting(exc)

    async def acquire(self, job: Job, queue_timeout: float) -> Grant:
        """Queue ``job`` and wait for a backend slot (or raise 401 / 429 / 503)."""
        if self._closed is not None:
            raise self._closed
        core = self.core
        self._check_queue_limits(job.tenant)
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        job.payload = fut
        try:
            core.submit(job)
        except QueueRejected as exc:
            raise RateLimited(
                str(exc), retry_after=exc.retry_after, outcome="rejected_rate_limit"
            ) from exc
        self._waiting.add(job)
        core.arrived(job)
        if fut.done():  # this pump granted it (an empty queue, a free slot): no wait, no timer
            return fut.result()
        try:
            async with asyncio.timeout(queue_timeout):
                return await fut
        except TimeoutError:
            self._withdraw(job, fut)
            raise Unavailable(
                f"request waited {queue_timeout:g} s in the queue without a free backend slot"
            ) from None
        except BaseException:
            self._withdraw(job, fut)
            raise

    def _check_queue_limits(self, tenant: str) -> None:
        """Raise 401 for a tenant a reload removed, 429 when its queue or a group's above it
        is at its limit."""
        core = self.core
        limits = core.tenant_limits().get(tenant)
        if limits is None:  # removed by a reload after this request was authenticated
            raise Unauthorized(TENANT_REMOVED)
        cap = limits.max_queued
        if cap is not None and core.queued(tenant) + core.queued_elsewhere(tenant) >= cap:
            raise RateLimited(
                f"too many queued requests for this tenant (limit {cap})",
                retry_after=1.0,
                outcome="rejected_queue_full",
            )
        groups = core.group_limits()
        for name in core.path(tenant) if groups else ():
            cap = groups[name].max_queued
            if cap is not None and core.queued_under(name) + core.queued_elsewhere(name) >= cap:
                raise RateLimited(
                    f"too many queued requests for group {name!r} (limit {cap})",
                    retry_after=1.0,
                    outcome="rejected_queue_full",
                )

    def _hold_timer(self, until: float) -> None:
        """A slot is held until ``until`` (clock time): let it lapse then, unless used."""
        loop = asyncio.get_running_loop()
        core = self.core
        loop.call_later(max(0.0, until - core.clock()), core.expire_holds, until)

    def _granted(self, job: Job, grant: Grant) -> None:
        self._waiting.discard(job)
        if self.on_dispatch is not None:
            self.on_dispatch(job)
        job.payload.set_result(grant)

    def _withdraw(self, job: Job, fut: asyncio.Future[Grant]) -> None:
        self._waiting.discard(job)
        if self.core.cancel(job):
            return
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.core.release(job, fut.result(), ran=False)  # granted as we gave up: give it back

    def fail_waiting(self, exc: Exception, tenant: str | None = None) -> int:
        """Answer queued jobs (all, or one tenant's) with ``exc`` instead of a grant.

        Used when draining for shutdown and when a reload removes a tenant. Each job leaves
        its queue uncharged; the handler raises ``exc``. Returns how many were failed.
        """
        failed = 0
        for job in [j for j in self._waiting if tenant is None or j.tenant == tenant]:
            self._waiting.discard(job)
            self.core.cancel(job)
            fut: asyncio.Future[Grant] = job.payload
            if not fut.done():
                fut.set_exception(exc)
                failed += 1
        return failed
