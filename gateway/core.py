"""The dispatch core: which waiting request goes to which backend, and when. Pure.

Synchronous, no asyncio, time from an injected clock. The live gateway
(:class:`gateway.dispatcher.Dispatcher`, which adds futures, timeouts and withdrawal) and the
fairness lab's discrete-event simulator (:mod:`gateway.lab.simulate`) drive this same class, so
a decision measured in the lab is a decision the gateway takes.

State: one scheduler per model (a *pool*: a request can only run on a backend serving its
model, so a full pool must not hold up another pool's queue; tenants and weights are the same in
every pool) and the admission controller's per-backend ledger.

The dispatch loop (:meth:`DispatchCore.pump`), run whenever capacity may have freed or work
arrived::

    peek the scheduler's next job -> place it on a backend with room (none: stop, the head of
    the fair order waits and everything behind it too) -> pop it (the scheduler charges) ->
    reserve its tokens -> hand (job, grant) to ``on_grant``

Settings: :class:`CoreOptions` (policy, prices, hold time, the batch tier's share), built from
the ``scheduler`` section by :meth:`CoreOptions.from_config`; fixed for the core's life (they
define what a counter means: a change needs a restart). Tenant limits (:class:`TenantLimits`)
are the core's too, changed by ``set_tenant``/``set_group`` (a reload), read by the live
dispatcher's queue checks.

Priority tiers: each tenant has one (``set_tenant(..., tier=)``, higher first); every pool's
scheduler serves a lower tier only while no higher-tier request waits in that pool (or, with
``batch_min_share``, gives the batch tier that share while both wait).

Per-tenant cap (``max_in_flight``): a tenant with that many requests running is *paused* in
every pool (``Scheduler.pause``): its queued requests keep their place but the order passes
over them, so a capped tenant never holds up the others; when one of its requests ends it is
resumed and every pool pumps.

Hierarchy (``set_group``, ``set_tenant(..., parent=)``): tenants may sit in a tree of groups,
set the same in every pool (parents first); the schedulers share service by weight at every
level. A group's ``max_in_flight`` counts its whole subtree: at its cap the group is paused in
every pool (the order passes over all its tenants) until one of its requests ends.

Holding a slot for a busy tenant's next request: a closed-loop client (an SDK with N requests
in flight, a batch job with N workers) sends its next request a moment after one finishes. If
the slot that request frees went at once to whoever waits, such a tenant would lose a slot on
every completion, whatever its weight (requests of one size even finish in lockstep, and then
every freed slot is gone before the resubmissions arrive). So when a request of a tenant that
resubmits (``Scheduler.resubmits``) ends, the core expects its next request for ``hold_s``
seconds. While it is expected, the pump does not give a slot to the head of the fair order if
the expected tenant would be served first (``Scheduler.entitled``): it books a slot for it
instead (a *hold*). The tenant's next request releases the hold and the fair order decides;
an expectation that is not met lapses (:meth:`DispatchCore.expire_holds`) with its hold. A
backend cannot start a freed slot's next request before its next engine step anyway, so a
hold shorter than a step costs little; ``hold_s = 0`` turns all of this off.

Reservation arithmetic: a request books ``prompt + reserved output`` tokens, the reserved output
being ``max_tokens`` (or the configured default) capped by what the context leaves after the
prompt (:func:`reserved_output`). ``Job.max_tokens`` holds the reserved output. Backends in
``"predict"`` admission (the default) plan for less: the output the core's
:class:`~gateway.scheduler.predictor.OutputPredictor` expects of the job (a high quantile of its
tenant's, model's and endpoint's recent lengths, at most the reserved output;
:meth:`DispatchCore.expect`). Every pool's scheduler shares that predictor, so ``vtc-predict``
charges from the same history that admission plans with.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .admission import AdmissionController, BackendSlots, Reservation
from .scheduler import TIERS, Job, Prices, Scheduler, make_scheduler
from .scheduler.interface import job_key
from .scheduler.predictor import OutputPredictor

if TYPE_CHECKING:
    from .config import SchedulerConfig

#: Output reserved for a request without any bound (no max_tokens, unknown context).
UNBOUNDED_RESERVE = 4096


def reserved_output(prompt_tokens: int, max_tokens: int | None, context: int | None) -> int:
    """Output tokens a request books: ``max_tokens`` (None: the rest of the context, or
    :data:`UNBOUNDED_RESERVE` when the context is unknown) capped by the context room."""
    room = context - prompt_tokens if context is not None else None
    bounds = (max_tokens, room) if max_tokens is not None else (room, UNBOUNDED_RESERVE)
    return max(0, min(x for x in bounds if x is not None))


@dataclass(frozen=True, slots=True)
class CoreOptions:
    """The dispatch core's settings (the ``scheduler`` section; see :meth:`from_config`)."""

    policy: str = "vtc"
    prices: Prices = field(default_factory=Prices)
    rpm_limit: int = 60  # requests per minute per tenant, ``rpm`` policy only
    #: how long a finished request's slot may wait for its tenant's next one (0: never)
    hold_s: float = 0.0
    #: the batch tier's share while interactive requests wait too (0: strict priority)
    batch_min_share: float = 0.0

    @classmethod
    def from_config(cls, sc: SchedulerConfig) -> CoreOptions:
        """The options of a gateway configured with scheduler section ``sc``."""
        return cls(
            policy=sc.policy,
            prices=Prices(sc.input_price, sc.output_price),
            rpm_limit=sc.rpm_limit,
            hold_s=sc.hold_ms / 1000,
            batch_min_share=sc.batch_min_share,
        )


@dataclass(slots=True)
class TenantLimits:
    """A tenant's or a group's place and limits (``set_tenant``/``set_group``)."""

    weight: float
    max_queued: int | None = None  # None: no limit (a group: none of its own)
    max_in_flight: int | None = None  # None: no cap on requests running at once
    tier: int = 0  # priority tier, higher first (gateway.scheduler.TIERS)
    parent: str | None = None  # its group in the tenant tree (None: top level)


@dataclass(slots=True)
class Grant:
    """A dispatched job's place: the backend and what it holds there."""

    backend: BackendSlots
    reservation: Reservation


@dataclass(slots=True)
class Hold:
    """The expected next request of a resubmitting tenant, until ``until``: ``job`` is the
    request that finished (its size books the slot), ``grant`` the slot held for the next one
    (None until the pump holds one)."""

    job: Job
    until: float
    grant: Grant | None = None


class DispatchCore:
    """Per-model scheduler pools over one admission controller; see the module docstring.

    ``on_grant(job, grant)`` receives every dispatched job (it must not raise). ``is_live(job)``
    (optional) tells whether a queued job still wants its slot; a job that does not is
    cancelled when it reaches the head instead of being dispatched. ``observe_pump`` (optional)
    receives the duration in seconds of every dispatch pass. ``on_hold`` (optional) is called
    with the expiry time of each new hold (the owner calls :meth:`expire_holds` then).
    """

    def __init__(
        self,
        admission: AdmissionController,
        on_grant: Callable[[Job, Grant], None],
        options: CoreOptions | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_live: Callable[[Job], bool] | None = None,
        observe_pump: Callable[[float], None] | None = None,
        on_hold: Callable[[float], None] | None = None,
    ) -> None:
        self.admission = admission
        #: fixed for the core's life (what a counter means; changing it needs a restart)
        self.options = options or CoreOptions()
        self.clock = clock
        self._on_grant = on_grant
        self._is_live = is_live
        self.observe_pump = observe_pump
        self.on_hold = on_hold
        self._pools: dict[str, Scheduler] = {}
        self._tenants: dict[str, TenantLimits] = {}
        self._groups: dict[str, TenantLimits] = {}  # inner nodes of the tenant tree
        # indexes of the limits for the dispatch path
        self._caps: dict[str, int] = {}  # tenant or group -> max_in_flight
        self._parents: dict[str, str] = {}  # tenant or group -> its parent group
        self._anc: dict[str, tuple[str, ...]] = {}  # tenant -> its groups, nearest first
        self.group_running: dict[str, int] = {}  # group -> in-flight jobs of its subtree
        self._ran_under: dict[int, tuple[str, ...]] = {}  # id(job) -> its groups at dispatch
        self._paused: set[str] = set()  # tenants at their cap (paused in every pool)
        self.running: dict[str, int] = {}  # tenant -> in-flight jobs
        self.dispatched_total = 0
        self._holds: list[Hold] = []  # expected requests, in order of expiry
        self.holds_total = 0  # slots held
        self.holds_used = 0  # held slots released by their tenant's next request
        #: output lengths of finished jobs, shared by every pool (admission and vtc-predict)
        self.predictor = OutputPredictor()

    # -- tenants and pools -------------------------------------------------------------------
    def set_tenant(
        self,
        name: str,
        weight: float,
        max_in_flight: int | None = None,
        tier: int = 0,
        parent: str | None = None,
        max_queued: int | None = None,
    ) -> None:
        """Add a tenant or change its weight, its priority tier (higher first), its cap on
        requests running at once (None: no cap), its parent group (None: top level; set
        the group first) and its queue limit (the live dispatcher's check; None: none). A
        tighter cap pauses the tenant now; a looser one resumes it, and the caller pumps
        (:meth:`pump_all`)."""
        self._tenants[name] = TenantLimits(weight, max_queued, max_in_flight, tier, parent)
        self._set_parent(name, parent)
        for pool in self._pools.values():
            pool.set_tenant(name, weight, tier, parent)
        self._set_cap(name, max_in_flight)

    def set_group(
        self,
        name: str,
        weight: float,
        max_in_flight: int | None = None,
        tier: int = 0,
        parent: str | None = None,
        max_queued: int | None = None,
    ) -> None:
        """Add an inner node of the tenant tree or change it (as :meth:`set_tenant`; its cap
        and its queue limit count the requests of its whole subtree). Parents before
        children."""
        self._groups[name] = TenantLimits(weight, max_queued, max_in_flight, tier, parent)
        self._set_parent(name, parent)
        for pool in self._pools.values():
            pool.set_group(name, weight, parent, tier)
        self._set_cap(name, max_in_flight)

    def _set_parent(self, node: str, parent: str | None) -> None:
        if parent == self._parents.get(node):
            return
        if parent is None:
            self._parents.pop(node, None)
        else:
            self._parents[node] = parent
        self._anc.clear()  # rebuilt on demand (a reload moves many nodes at once)

    def path(self, node: str) -> tuple[str, ...]:
        """``node``'s groups, nearest first (empty at the top level)."""
        anc = self._anc.get(node)
        if anc is None:
            out = []
            up = self._parents.get(node)
            while up is not None:
                out.append(up)
                up = self._parents.get(up)
            anc = self._anc[node] = tuple(out)
        return anc

    def _set_cap(self, name: str, max_in_flight: int | None) -> None:
        if max_in_flight is None:
            self._caps.pop(name, None)
        else:
            self._caps[name] = max_in_flight
        self._check_cap(name)

    def tenant_limits(self) -> dict[str, TenantLimits]:
        """The configured tenants (leaves) and their limits."""
        return self._tenants

    def group_limits(self) -> dict[str, TenantLimits]:
        """The configured groups (inner nodes of the tenant tree) and their limits."""
        return self._groups

    def forget_tenant(self, name: str) -> None:
        """New pools no longer list ``name`` (its counters stay where they are)."""
        self._tenants.pop(name, None)
        self._caps.pop(name, None)
        self._check_cap(name)

    def forget_group(self, name: str) -> None:
        """A reload removed group ``name``: no cap of its own any more (its children were
        moved or removed first; pools keep it, empty, at the top level)."""
        entry = self._groups.pop(name, None)
        if entry is not None:
            self._set_parent(name, None)
            for pool in self._pools.values():
                pool.set_group(name, entry.weight, None, entry.tier)
        self._caps.pop(name, None)
        self._check_cap(name)

    def role(self, name: str) -> str | None:
        """``"tenant"`` or ``"group"``: what ``name`` is to this core or any pool (a removed
        tenant stays a tenant in the pools that knew it); None if unknown."""
        if name in self._tenants or any(name in p.tenants() for p in self._pools.values()):
            return "tenant"
        if name in self._groups or any(name in set(p.groups()) for p in self._pools.values()):
            return "group"
        return None

    def _in_flight(self, node: str) -> int:
        if node in self._groups:
            return self.group_running.get(node, 0)
        return self.running.get(node, 0)

    def _check_cap(self, tenant: str) -> bool:
        """Pause ``tenant`` (or group) in every pool while it runs its ``max_in_flight``
        requests, resume it below; True if it was resumed (its queued jobs may go now)."""
        cap = self._caps.get(tenant)
        full = cap is not None and self._in_flight(tenant) >= cap
        if full == (tenant in self._paused):
            return False
        if full:
            self._paused.add(tenant)
            for pool in self._pools.values():
                pool.pause(tenant)
            return False
        self._paused.discard(tenant)
        for pool in self._pools.values():
            pool.resume(tenant)
        return True

    def pool(self, model: str) -> Scheduler:
        sched = self._pools.get(model)
        if sched is None:
            opts = self.options
            sched = make_scheduler(opts.policy, opts.prices, opts.rpm_limit)
            sched.predictor = self.predictor
            # a resubmission comes within the hold; no hold: no busy-tenant rules at all
            sched.follow_s = opts.hold_s
            depth = {g: len(self.path(g)) for g in self._groups}
            for name in sorted(self._groups, key=depth.__getitem__):  # parents first
                group = self._groups[name]
                sched.set_group(name, group.weight, group.parent, group.tier)
            for name, t in self._tenants.items():
                sched.set_tenant(name, t.weight, t.tier, t.parent)
            for name in self._paused:
                sched.pause(name)
            sched.set_min_share(TIERS["batch"], opts.batch_min_share)
            self._pools[model] = sched
        return sched

    def pools(self) -> dict[str, Scheduler]:
        return self._pools

    def queued(self, tenant: str) -> int:
        return sum(p.queued(tenant) for p in self._pools.values())

    def queued_under(self, node: str) -> int:
        """Waiting jobs of a tenant or of a group's whole subtree, in every pool."""
        return sum(p.queued_under(node) for p in self._pools.values())

    def queued_elsewhere(self, node: str) -> int:
        """Jobs of a tenant or of a group's subtree waiting at other gateway processes, which
        count against its ``max_queued`` too (hook: a cluster replica's view; none here)."""
        return 0

    def total_queued(self) -> int:
        return sum(p.total_queued() for p in self._pools.values())

    def queued_for(self, backend: BackendSlots) -> int:
        """Jobs waiting in the pools of the models ``backend`` serves."""
        return sum(p.total_queued() for m, p in self._pools.items() if m in backend.models)

    # -- queue side --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` in its model's pool (may raise ``QueueRejected``); does not pump. A
        slot held for its tenant is released now, for the fair order to give."""
        pool = self.pool(job.model)
        pool.submit(job, self.clock())
        if self._holds:
            for i, hold in enumerate(self._holds):
                if hold.job.tenant == job.tenant and hold.job.model == job.model:
                    del self._holds[i]  # the expected request came
                    self._end_hold(hold, used=True)
                    break

    def cancel(self, job: Job) -> bool:
        """Remove a still-queued job (uncharged); True if it was queued."""
        pool = self._pools.get(job.model)
        return pool is not None and pool.cancel(job, self.clock())

    # -- running side ------------------------------------------------------------------------
    def on_output(
        self, job: Job, grant: Grant | None, n: int, prompt_tokens: int | None = None
    ) -> None:
        """``n`` output tokens of ``job`` arrived: charge its tenant and tell admission (whose
        ``"peak"`` check follows each request's progress) about ``grant``, the job's current
        grant (``None``: it holds none any more). ``prompt_tokens``, the backend's own prompt
        count once known, corrects the reservation the estimate made (once). Per output token:
        O(1) besides the charge."""
        self._pools[job.model].on_output(job, n, self.clock())
        if grant is not None:
            reservation = grant.reservation
            admission = self.admission
            admission.note_output(reservation, n)
            if (
                prompt_tokens is not None
                and prompt_tokens != reservation.prompt
                and admission.adjust_prompt(reservation, prompt_tokens) < 0
            ):
                self.pump_backend(grant.backend)  # the booking shrank: room for more

    def release(
        self, job: Job, grant: Grant, ran: bool = True, output_tokens: int | None = None
    ) -> None:
        """The job is over: reconcile its charge (with the backend's ``output_tokens`` when
        known), free its slot (or hold it for the tenant's next request), let the next one in."""
        now = self.clock()
        pool = self._pools[job.model]
        pool.finish(job, now, ran=ran, output_tokens=output_tokens)
        resumed = self._ran_down(job)
        self.admission.release(grant.reservation)
        hold_s = self.options.hold_s
        if ran and hold_s > 0 and pool.resubmits(job.tenant):
            pool.hold(job)  # counts in the tenant's credit while its next request is expected
            until = now + hold_s
            self._holds.append(Hold(job, until))
            if self.on_hold is not None:
                self.on_hold(until)
        if resumed:
            self.pump_all()  # the tenant may have work waiting in any pool
        else:
            self.pump_backend(grant.backend)

    def _ran_down(self, job: Job) -> bool:
        """``job`` stopped running; True if that resumed its tenant (or one of its groups,
        those it was dispatched under: a reload may have moved the tenant since)."""
        tenant = job.tenant
        self.running[tenant] -= 1
        resumed = tenant in self._paused and self._check_cap(tenant)
        if self._ran_under:
            for g in self._ran_under.pop(id(job), ()):
                self.group_running[g] -= 1
                if g in self._paused and self._check_cap(g):
                    resumed = True
        return resumed

    def _end_hold(self, hold: Hold, used: bool) -> None:
        self._pools[hold.job.model].unhold(hold.job)
        if hold.grant is not None:
            self.admission.void(hold.grant.reservation)  # nothing was sent: no quota booking
            self.admission.release(hold.grant.reservation)
            if used:
                self.holds_used += 1

    def held(self) -> int:
        """Slots held for busy tenants' next requests right now."""
        return sum(1 for h in self._holds if h.grant is not None)

    def next_hold_expiry(self) -> float | None:
        return self._holds[0].until if self._holds else None

    def expire_holds(self, now: float | None = None, everything: bool = False) -> None:
        """Release holds whose time is up (all of them with ``everything``) and dispatch."""
        if not self._holds:
            return
        now = self.clock() if now is None else now
        keep: list[Hold] = []
        freed: list[Hold] = []
        for hold in self._holds:
            (freed if everything or hold.until <= now else keep).append(hold)
        if not freed:
            return
        self._holds = keep
        for hold in freed:
            self._end_hold(hold, used=False)
        for hold in freed:
            if hold.grant is not None:
                self.pump_backend(hold.grant.backend)

    def abandon(self, job: Job) -> None:
        """The job never ran and holds no reservation (see :meth:`move`): refund it."""
        self._pools[job.model].finish(job, self.clock(), ran=False)
        if self._ran_down(job):
            self.pump_all()

    def move(self, job: Job, grant: Grant, exclude: Iterable[str]) -> Grant | None:
        """Retry a job that never ran on another backend with room now (no requeue)."""
        held = grant.reservation
        self.admission.release(held)
        expect = self.expect(job)
        backend = self.admission.place(job.model, held.tokens, exclude, held.prompt, expect)
        new = None
        if backend is not None:
            new = Grant(backend, self.admission.reserve(backend, held.tokens, held.prompt, expect))
        self.pump_backend(grant.backend)
        return new

    # -- dispatch ----------------------------------------------------------------------------
    def pump_backend(self, backend: BackendSlots) -> None:
        for model in backend.models:
            if model in self._pools:
                self.pump(model)

    def pump_all(self) -> None:
        for model in list(self._pools):
            self.pump(model)

    def reloaded(self) -> None:
        """A reload changed tenants, weights or the tree (hook: a cluster replica tells the
        shared order where its waiting tenants sit now)."""

    def arrived(self, job: Job) -> None:
        """``job`` was just submitted: dispatch what its arrival lets in (hook: a cluster
        replica skips the claim its arrival cannot change the answer to)."""
        self.pump(job.model)

    def pump(self, model: str) -> None:
        """Dispatch ``model``'s queued jobs while the fair order's head fits on a backend."""
        sched = self._pools.get(model)
        if sched is None:
            return
        observe = self.observe_pump
        if observe is None:
            self._pump(sched, model)
            return
        start = time.perf_counter()
        try:
            self._pump(sched, model)
        finally:
            observe(time.perf_counter() - start)

    def open_holds(self, model: str, now: float) -> Iterator[Hold]:
        """The expected requests of ``model``'s pool, in order of expiry, that hold no slot
        yet and whose time is not up."""
        for hold in self._holds:
            if hold.grant is None and hold.job.model == model and hold.until > now:
                yield hold

    def grant_hold(self, hold: Hold, backend: BackendSlots) -> None:
        """Reserve a slot on ``backend`` for ``hold``'s expected request."""
        finished = hold.job
        tokens = finished.prompt_tokens + finished.max_tokens
        reservation = self.admission.reserve(
            backend, tokens, finished.prompt_tokens, self.expect(finished)
        )
        hold.grant = Grant(backend, reservation)
        self.holds_total += 1

    def _hold_for(self, sched: Scheduler, model: str, now: float) -> bool:
        """Book a slot for the first expected request (of ``model``'s pool, not yet holding
        one) whose tenant would be served before the head; True if one was booked."""
        for hold in self.open_holds(model, now):
            finished = hold.job
            if not sched.entitled(finished.tenant, now):
                continue
            backend = self.admission.place(
                model,
                finished.prompt_tokens + finished.max_tokens,
                prompt=finished.prompt_tokens,
                expect=self.expect(finished),
            )
            if backend is None:
                return False
            self.grant_hold(hold, backend)
            return True
        return False

    def _pump(self, sched: Scheduler, model: str) -> None:
        now = self.clock()
        admission = self.admission
        is_live = self._is_live
        while True:
            job = sched.peek(now)
            if job is None:
                return
            if is_live is not None and not is_live(job):
                sched.cancel(job, now)  # its owner is gone and will withdraw it
                continue
            if self._holds and self._hold_for(sched, model, now):
                continue  # a slot went to a resubmitting tenant that precedes the head
            tokens = job.prompt_tokens + job.max_tokens
            expect = self.expect(job)
            backend = admission.place(model, tokens, prompt=job.prompt_tokens, expect=expect)
            if backend is None:
                return  # head of the fair order waits for room; later ones wait behind it
            self.commit(sched, job, backend, now, expect)

    def commit(
        self,
        sched: Scheduler,
        job: Job,
        backend: BackendSlots,
        now: float,
        expect: int | None = None,
    ) -> None:
        """Dispatch ``job``, the head of ``sched``, to ``backend``: pop it (the scheduler
        charges), reserve its tokens (planning for ``expect`` output, None: the predictor's
        bound), hand it to ``on_grant``."""
        popped = sched.pop(now)
        assert popped is job, "peek() and pop() disagree"
        self.running[job.tenant] = self.running.get(job.tenant, 0) + 1
        if job.tenant in self._caps:
            self._check_cap(job.tenant)  # at its cap: its queue is passed over from now on
        if self._parents:
            groups = self._ran_under[id(job)] = self.path(job.tenant)
            for g in groups:
                self.group_running[g] = self.group_running.get(g, 0) + 1
                if g in self._caps:
                    self._check_cap(g)
        self.dispatched_total += 1
        tokens = job.prompt_tokens + job.max_tokens
        if expect is None:
            expect = self.expect(job)
        reservation = self.admission.reserve(backend, tokens, job.prompt_tokens, expect)
        grant = Grant(backend, reservation)
        self._on_grant(job, grant)

    def expect(self, job: Job) -> int:
        """Output tokens ``"predict"`` admission plans for: the predictor's bound for the
        job's tenant, model and endpoint, at most its reserved output."""
        return self.predictor.bound(job_key(job), job.max_tokens)
