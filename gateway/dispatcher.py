"""Dispatcher: the asyncio glue between waiting handlers, the scheduler and admission.

One future per queued request, resolved by :meth:`Dispatcher._pump` the moment the scheduler's
pick fits on a backend; nothing polls. ``_pump`` runs synchronously whenever something that can
free or use capacity happens: a request arrives, a request finishes and releases its slot, a
backend comes back up, limits change.

There is one scheduler per model (a *pool*): a request can only run on a backend serving its
model, so a full pool must not hold up another pool's queue. Tenants and weights are the same in
every pool.

Cleanup lives in ``finally`` blocks: a handler cancelled while queued removes its job (nothing
charged); one cancelled just after its grant was decided gives the slot back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .admission import AdmissionController, BackendSlots, Reservation
from .errors import TENANT_REMOVED, RateLimited, Unauthorized, Unavailable
from .scheduler import Job, Prices, QueueRejected, Scheduler, make_scheduler

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Grant:
    backend: BackendSlots
    reservation: Reservation


@dataclass(slots=True)
class TenantLimits:
    weight: float
    max_queued: int


class Dispatcher:
    def __init__(
        self,
        admission: AdmissionController,
        policy: str = "vtc",
        prices: Prices | None = None,
        rpm_limit: int = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.admission = admission
        self.policy = policy
        self.prices = prices or Prices()
        self.rpm_limit = rpm_limit
        self.clock = clock
        self._pools: dict[str, Scheduler] = {}
        self._tenants: dict[str, TenantLimits] = {}
        self.running: dict[str, int] = {}  # tenant -> in-flight jobs
        self.dispatched_total = 0
        self._waiting: set[Job] = set()  # queued jobs whose handler awaits a grant
        self._closed: Exception | None = None  # set by close(): no new work
        #: Called with each job as it is dispatched (tests, tracing); must not raise.
        self.on_dispatch: Callable[[Job], None] | None = None

    # -- tenants and pools -------------------------------------------------------------------
    def set_tenant(self, name: str, weight: float, max_queued: int) -> None:
        self._tenants[name] = TenantLimits(weight, max_queued)
        for pool in self._pools.values():
            pool.set_tenant(name, weight)

    def remove_tenant(self, name: str, exc: Exception) -> int:
        """A reload removed ``name``: forget its limits and answer its queued jobs with ``exc``
        (uncharged). Its running jobs finish normally; its counter stays in the schedulers, so
        a tenant that comes back later is not reset to zero. Returns how many were failed."""
        self._tenants.pop(name, None)
        failed = self.fail_waiting(exc, tenant=name)
        self.pump_all()
        return failed

    def observe_pumps(self, observe: Callable[[float], None]) -> None:
        """Report the duration in seconds of every dispatch pass (one pump: the scheduler's
        picks and admission checks) to ``observe``. Per pump call, never per token."""
        inner = self._pump
        perf = time.perf_counter

        def timed(model: str) -> None:
            start = perf()
            try:
                inner(model)
            finally:
                observe(perf() - start)

        self._pump = timed  # type: ignore[method-assign]

    def pool(self, model: str) -> Scheduler:
        sched = self._pools.get(model)
        if sched is None:
            sched = make_scheduler(self.policy, self.prices, self.rpm_limit)
            for name, lim in self._tenants.items():
                sched.set_tenant(name, lim.weight)
            self._pools[model] = sched
        return sched

    def tenant_limits(self) -> dict[str, TenantLimits]:
        return self._tenants

    def pools(self) -> dict[str, Scheduler]:
        return self._pools

    def queued(self, tenant: str) -> int:
        return sum(p.queued(tenant) for p in self._pools.values())

    def total_queued(self) -> int:
        return sum(p.total_queued() for p in self._pools.values())

    # -- request side ------------------------------------------------------------------------
    def close(self, exc: Exception) -> int:
        """Stop taking work (shutdown): answer every queued job with ``exc`` and refuse new ones
        with it too, including requests authenticated before the close. Returns how many queued
        jobs were answered."""
        self._closed = exc
        return self.fail_waiting(exc)

    async def acquire(self, job: Job, queue_timeout: float) -> Grant:
        """Queue ``job`` and wait for a backend slot (or raise 401 / 429 / 503)."""
        if self._closed is not None:
            raise self._closed
        limits = self._tenants.get(job.tenant)
        if limits is None:  # removed by a reload after this request was authenticated
            raise Unauthorized(TENANT_REMOVED)
        if self.queued(job.tenant) >= limits.max_queued:
            raise RateLimited(
                f"too many queued requests for this tenant (limit {limits.max_queued})",
                retry_after=1.0,
                outcome="rejected_queue_full",
            )
        sched = self.pool(job.model)
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        job.payload = fut
        try:
            sched.submit(job, self.clock())
        except QueueRejected as exc:
            raise RateLimited(
                str(exc), retry_after=exc.retry_after, outcome="rejected_rate_limit"
            ) from exc
        self._waiting.add(job)
        self._pump(job.model)
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

    def _withdraw(self, job: Job, fut: asyncio.Future[Grant]) -> None:
        self._waiting.discard(job)
        if self.pool(job.model).cancel(job, self.clock()):
            return
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(job, fut.result(), ran=False)  # granted as we gave up: give it back

    def fail_waiting(self, exc: Exception, tenant: str | None = None) -> int:
        """Answer queued jobs (all, or one tenant's) with ``exc`` instead of a grant.

        Used when draining for shutdown and when a reload removes a tenant. Each job leaves
        its queue uncharged; the handler raises ``exc``. Returns how many were failed.
        """
        now = self.clock()
        failed = 0
        for job in [j for j in self._waiting if tenant is None or j.tenant == tenant]:
            self._waiting.discard(job)
            self.pool(job.model).cancel(job, now)
            fut: asyncio.Future[Grant] = job.payload
            if not fut.done():
                fut.set_exception(exc)
                failed += 1
        return failed

    def release(
        self, job: Job, grant: Grant, ran: bool = True, output_tokens: int | None = None
    ) -> None:
        """The job is over: reconcile its charge (with the backend's ``output_tokens`` when
        known), free its slot, let the next one in."""
        self.pool(job.model).finish(job, self.clock(), ran=ran, output_tokens=output_tokens)
        self.running[job.tenant] -= 1
        self.admission.release(grant.reservation)
        self.pump_backend(grant.backend)

    def on_output(
        self, job: Job, grant: Grant | None, n: int, prompt_tokens: int | None = None
    ) -> None:
        """``n`` output tokens of ``job`` arrived: charge its tenant and tell admission (whose
        ``"peak"`` check follows each request's progress) about ``grant``, the job's current
        grant (``None``: it holds none any more). ``prompt_tokens``, the backend's own prompt
        count once known, corrects the reservation the estimate made (once). Per output token:
        O(1) besides the charge."""
        self.pool(job.model).on_output(job, n, self.clock())
        if grant is not None:
            reservation = grant.reservation
            self.admission.note_output(reservation, n)
            if (
                prompt_tokens is not None
                and prompt_tokens != reservation.prompt
                and self.admission.adjust_prompt(reservation, prompt_tokens) < 0
            ):
                self.pump_backend(grant.backend)  # the booking shrank: room for more

    def abandon(self, job: Job) -> None:
        """The job never ran and holds no reservation (see :meth:`move`): refund it."""
        self.pool(job.model).finish(job, self.clock(), ran=False)
        self.running[job.tenant] -= 1

    def move(self, job: Job, grant: Grant, exclude: Iterable[str]) -> Grant | None:
        """Retry a job that never ran on another backend with room now (no requeue)."""
        held = grant.reservation
        self.admission.release(held)
        backend = self.admission.place(job.model, held.tokens, exclude, held.prompt)
        new = None
        if backend is not None:
            new = Grant(backend, self.admission.reserve(backend, held.tokens, held.prompt))
        self.pump_backend(grant.backend)
        return new

    # -- dispatch ----------------------------------------------------------------------------
    def pump_backend(self, backend: BackendSlots) -> None:
        for model in backend.models:
            if model in self._pools:
                self._pump(model)

    def pump_all(self) -> None:
        for model in list(self._pools):
            self._pump(model)

    def _pump(self, model: str) -> None:
        sched = self._pools.get(model)
        if sched is None:
            return
        now = self.clock()
        admission = self.admission
        while True:
            job = sched.peek(now)
            if job is None:
                return
            fut: asyncio.Future[Grant] = job.payload
            if fut.done():  # its handler is gone and will withdraw it; skip it meanwhile
                sched.cancel(job, now)
                continue
            tokens = job.prompt_tokens + job.max_tokens
            backend = admission.place(model, tokens, prompt=job.prompt_tokens)
            if backend is None:
                return  # head of the fair order waits for room; later ones wait behind it
            popped = sched.pop(now)
            assert popped is job
            self._waiting.discard(job)
            self.running[job.tenant] = self.running.get(job.tenant, 0) + 1
            self.dispatched_total += 1
            if self.on_dispatch is not None:
                self.on_dispatch(job)
            fut.set_result(Grant(backend, admission.reserve(backend, tokens, job.prompt_tokens)))
