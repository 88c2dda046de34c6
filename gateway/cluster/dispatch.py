"""The dispatch core of a replica that shares one fair order with others through Redis.

Requests wait in this process's per-model schedulers exactly as in a single gateway; what
changes is who decides that the head of a queue may have a batch slot. Instead of the local
admission check, a *claim* asks Redis (the rule: :meth:`gateway.cluster.rule.SharedState.claim`):
it grants the slot if no backlogged tenant anywhere has a smaller counter (or the backends keep
room for them too) and a backend has capacity, booking it in the shared ledger. One claim asks
for the head and up to ``claim_batch - 1`` of its tenant's requests queued behind it (granted
while the tenant keeps the smallest counter), so a burst of freed slots costs one round trip.
Granted: the core commits the jobs (pop, charge, reserve) while the reply is processed. A slot
held for a resubmitting tenant's next request (``DispatchCore`` holds) is claimed the same way
before the head's.
Refused: the replica waits for a wake-up — another replica released a slot or a tenant left the
backlog (Redis pub/sub), or the next sync tick — and asks again.

Every reservation this replica makes or returns, whoever decides it (a claim, a slot held for
a busy tenant, a request moved to another backend), passes through :class:`ClusterAdmission`,
which mirrors it into the shared ledger. While Redis is unreachable the replica falls back to
the single-process rules on a share of each backend (``1/N`` of its sequences and KV budget,
``N`` the replicas last seen) with the counter lift done locally, and returns to the shared
order when Redis does.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections import Counter
from collections.abc import Iterable

from ..admission import AdmissionController, BackendSlots, Reservation, planned_output
from ..core import DispatchCore, Grant, Hold
from ..dispatcher import Dispatcher
from ..scheduler import TIERS, Job, Scheduler
from ..scheduler.baselines import RPMScheduler
from .rule import TALLY, Candidate, ClaimResult, Node, Place
from .store import ClusterStore, ClusterUnavailable, retrieved

SEP = "\x1f"
QUEUED = f"{TALLY}q{SEP}"  # + tenant: requests queued at a replica
ADMITTED = f"{TALLY}a{SEP}"  # + model, SEP, tenant: admitted at a replica in the last minute


def default_replica_id() -> str:
    """Unique per process: host name, process id and a random suffix."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class ClusterAdmission(AdmissionController):
    """The local admission ledger, mirrored into the shared one (slots booked and returned).

    While Redis is up, slots are claimed through the shared order and :meth:`place` serves only
    requests moved off a failed backend; while it is down, :meth:`place` keeps this replica to
    its share of each backend.
    """

    store: ClusterStore | None = None
    #: set while committing a claimed job: Redis booked the slot already
    claimed: bool = False

    def __init__(self, backends: Iterable[BackendSlots] = ()) -> None:
        super().__init__(backends)
        self._booked: dict[int, tuple[str, int]] = {}  # id(reservation) -> (backend, tokens)

    @staticmethod
    def booking(backend: BackendSlots, tokens: int, prompt: int, expect: int | None) -> int:
        """KV tokens the shared ledger books for a request of ``tokens`` (``prompt`` + its
        reserved output) on ``backend``: under ``predict`` admission its prompt, the output
        planned for it (``expect``) and a block of rounding, as the local check plans (each
        sync then replaces a replica's bookings by its ledger's current plan for what it
        runs: :meth:`gateway.cluster.rule.SharedState.sync`); otherwise the whole
        reservation."""
        if backend.kv_admission == "predict":
            return prompt + planned_output(tokens, prompt, expect) + backend.block_size
        return tokens

    def reserve(
        self, backend: BackendSlots, tokens: int, prompt: int = 0, expect: int | None = None
    ) -> Reservation:
        reservation = super().reserve(backend, tokens, prompt, expect)
        if self.store is not None:
            size = self.booking(backend, tokens, prompt, expect)
            if not self.claimed:
                self.store.book(backend.name, size)
            self._booked[id(reservation)] = (backend.name, size)
        return reservation

    def release(self, reservation: Reservation) -> None:
        super().release(reservation)
        booked = self._booked.pop(id(reservation), None)
        if booked is not None and self.store is not None:
            self.store.release(*booked, keep=True)

    def place(
        self,
        model: str,
        tokens: int,
        exclude: Iterable[str] = (),
        prompt: int = 0,
        expect: int | None = None,
        share: int = 1,
    ) -> BackendSlots | None:
        store = self.store
        if store is not None and not store.up:
            share = max(share, store.stats.live_replicas)
        return super().place(model, tokens, exclude, prompt, expect, share)


class ClusterCore(DispatchCore):
    """A :class:`DispatchCore` whose pumps claim slots through a :class:`ClusterStore`; also
    the store's :class:`~gateway.cluster.store.LocalView` of this replica."""

    store: ClusterStore | None = None
    #: requests of one tenant one claim may ask slots for (pipelined dispatch: a burst of
    #: freed slots costs one round trip, not one each)
    claim_batch: int = 8
    #: a queue refused for want of room is retried on a wake-up, or after this many ticks
    full_retry_ticks: int = 10

    def attach(self, store: ClusterStore) -> None:
        assert isinstance(self.admission, ClusterAdmission)
        self.store = store
        self.admission.store = store
        self._claiming: set[str] = set()  # models with a claim loop running
        self._again: set[str] = set()  # models that saw news while their claim was in flight
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: Counter[tuple[str, str]] = Counter()  # (model, tenant) -> running here
        #: models whose last claim found no room: ticks to skip before retrying anyway
        self._full: dict[str, int] = {}
        #: the credit of a tenant whose request arrived to an empty queue, taken before the
        #: arrival ends a hold for it (as the local lift does): what its entry into the
        #: shared backlog uses
        self._entry_credit: dict[tuple[str, str], float] = {}
        #: tenants paused here because a claim found a node of their path at its cap over all
        #: replicas; resumed when a replica says it fell below (``c:<node>``) or after
        #: ``full_retry_ticks``
        self._capped: set[str] = set()
        self._capped_ticks = 0
        #: model -> the tenant whose claim the shared order last refused outright (no room,
        #: or another tenant first), while requests still wait here
        self._refused: dict[str, str] = {}

    # -- LocalView ---------------------------------------------------------------------------
    # A policy whose order is not its counters' (``fcfs``, ``rpm``) shares none: they read 0
    # here and are charged nothing in claims, so the shared order has every tenant of a tier
    # level with the others (it keeps the tiers, the caps and the room rule), and each replica
    # serves its own queue in its policy's order.
    def counter(self, model: str, node: str) -> float:
        pool = self.pool(model)
        return pool.node_counter(node) if pool.counts_order else 0.0

    def set_counter(self, model: str, node: str, value: float) -> None:
        pool = self.pool(model)
        if pool.counts_order:
            pool.set_node_counter(node, value)

    @staticmethod
    def _cost(sched: Scheduler, job: Job) -> float:
        """What the shared order charges for dispatching ``job`` (as the pop will here)."""
        return sched.dispatch_cost(job) if sched.counts_order else 0.0

    def waiting(self, model: str, tenant: str) -> int:
        pool = self._pools.get(model)
        return pool.queued(tenant) if pool is not None else 0

    def busy(self, model: str, node: str) -> bool:
        # the share's two nodes are charged by every tenant of their tiers: always synced
        return node.startswith("~") or self._busy[(model, node)] > 0

    def runs(self) -> dict[str, int]:
        """Per capped node (``max_in_flight``): its requests running here and the slots held
        here for its next ones (what the shared order counts against its cap); and the tallies
        other replicas limit against (:meth:`tallies`)."""
        out = {node: self._in_flight(node) for node in self._caps}
        for hold in self._holds if out else ():
            if hold.grant is not None:
                for node in (hold.job.tenant, *self.path(hold.job.tenant)):
                    if node in out:
                        out[node] += 1
        out.update(self.tallies())
        return out

    def tallies(self) -> dict[str, int]:
        """Counts limited over all replicas (:data:`gateway.cluster.rule.TALLY`): per tenant
        its requests queued here (``~q<SEP><tenant>``: ``max_queued``) and, under ``rpm``, per
        model and tenant those admitted here in the last minute (``~a<SEP><model><SEP>``
        ``<tenant>``)."""
        queued: Counter[str] = Counter()
        out: dict[str, int] = {}
        now = self.clock()
        for model, pool in self._pools.items():
            for tenant in pool.backlogged():
                queued[tenant] += pool.queued(tenant)
            if isinstance(pool, RPMScheduler):
                for tenant, n in pool.admitted(now).items():
                    out[f"{ADMITTED}{model}{SEP}{tenant}"] = n
        out.update((f"{QUEUED}{tenant}", n) for tenant, n in queued.items())
        return out

    def queued_elsewhere(self, node: str) -> int:
        store = self.store
        if store is None:
            return 0
        if node in self._tenants:
            return store.tally_elsewhere(f"{QUEUED}{node}")
        return sum(  # a group: its tenants'
            n for t, n in store.tallies_elsewhere(QUEUED).items() if node in self.path(t)
        )

    def pool(self, model: str) -> Scheduler:
        new = model not in self._pools
        sched = super().pool(model)
        if new and isinstance(sched, RPMScheduler):  # the limit counts every replica's

            def elsewhere(tenant: str, model: str = model) -> int:
                store = self.store
                return (
                    0 if store is None else store.tally_elsewhere(f"{ADMITTED}{model}{SEP}{tenant}")
                )

            sched.elsewhere = elsewhere
        return sched

    def kv(self) -> dict[str, int]:
        """Per backend, the KV tokens this replica's admission ledger plans for what it runs
        there (what the shared ledger counts for it after each sync)."""
        return {b.name: b.reserved_tokens for b in self.admission.backends()}

    def watched(self) -> tuple[list[str], list[str]]:
        """The models and backends the sync's view covers: every backend and its models."""
        backends = list(self.admission.backends())
        return sorted({m for b in backends for m in b.models}), [b.name for b in backends]

    def _size(self, job: Job, backend: BackendSlots) -> int:
        """What a claim books for ``job`` (or a hold of its size) on ``backend``."""
        tokens = job.prompt_tokens + job.max_tokens
        return ClusterAdmission.booking(backend, tokens, job.prompt_tokens, self.expect(job))

    def groups(self, model: str, tenant: str) -> tuple[str, ...]:
        return tuple(n.name for n in self.place(model, tenant, credit=False).path[:-1])

    def place(self, model: str, tenant: str, credit: bool = True) -> Place:
        """The tenant's place in the shared order (:class:`gateway.cluster.rule.Place`): its
        groups from the top, then itself, with their weights and, with ``credit``, the
        credit each may keep entering the backlog (its groups' only while it has some); with
        a tier's minimum share, the share's node above them all."""
        pool = self.pool(model)
        own = self.credit(model, tenant) if credit else 0.0
        names = pool.path(tenant)
        caps = self._caps
        nodes = [
            Node(g, pool.group_weight(g), pool.group_credit(g) if own > 0 else 0.0, caps.get(g, 0))
            for g in names[:-1]
        ]
        nodes.append(Node(tenant, pool.weight(tenant), own, caps.get(tenant, 0)))
        tier = pool.tier(names[0])
        share = self.options.batch_min_share
        batch = TIERS["batch"]
        if share and tier >= batch:
            top = Node("~share", share) if tier == batch else Node("~rest", 1 - share)
            return Place((top, *nodes), batch)
        return Place(tuple(nodes), tier)

    def credit(self, model: str, tenant: str) -> float:
        entry = self._entry_credit.pop((model, tenant), None)
        if entry is not None:  # as it was when the tenant's request arrived to an empty queue
            return entry
        return self.pool(model).credit(tenant, self.clock())

    def wake(self, message: str) -> None:
        kind, _, name = message.partition(":")
        if kind == "c":
            self._uncap()
        elif kind == "m":  # the order changed; a queue refused for want of room waits for room
            if name not in self._full:
                self.pump(name)
        elif kind == "b":
            for b in self.admission.backends():
                if b.name == name:
                    for model in b.models:
                        self._full.pop(model, None)
                    self.pump_backend(b)

    def reloaded(self) -> None:
        """The tree may have moved: register again (the registration names every waiting
        tenant's place; the others' come with their next mark or claim)."""
        if self.store is not None:
            self.store.register_again()

    def tick(self) -> None:
        """Every sync interval: retry queues whose head was refused for its place in the order
        (the counters moved). A queue refused for want of room waits for the wake-up a release
        sends, retried only every ``full_retry_ticks`` in case one was lost (as are tenants
        paused for a cap reached at other replicas)."""
        if self._capped:
            self._capped_ticks += 1
            if self._capped_ticks >= self.full_retry_ticks:
                self._uncap()
        for model, pool in self._pools.items():
            if pool.total_queued() and model not in self._claiming:
                skip = self._full.get(model)
                if skip:
                    self._full[model] = skip - 1
                    continue
                self.pump(model)

    def _cap(self, tenant: str) -> None:
        """A claim found ``tenant`` (or a group above it) at its cap over all replicas: pass
        over its queue here until a wake-up or a retry says the cap may have room."""
        if tenant not in self._capped:
            if not self._capped:
                self._capped_ticks = 0
            self._capped.add(tenant)
            for pool in self._pools.values():
                pool.pause(tenant)

    def _uncap(self) -> None:
        capped, self._capped = self._capped, set()
        for tenant in capped:
            if tenant not in self._paused:  # not at its cap here
                for pool in self._pools.values():
                    pool.resume(tenant)
        if capped:
            self.pump_all()

    # -- queue and running side: keep the store's view current ---------------------------------
    def submit(self, job: Job) -> None:
        store = self.store
        if store is not None:
            pool = self.pool(job.model)
            if type(pool).lift:  # the lift is global while Redis is up
                pool.lift = not store.up
            if store.up and pool.queued(job.tenant) == 0:
                self._entry_credit.pop((job.model, job.tenant), None)
                self._entry_credit[(job.model, job.tenant)] = self.credit(job.model, job.tenant)
            store.touch(job.model, job.tenant)  # before: charges from here on are ours
        super().submit(job)

    def cancel(self, job: Job) -> bool:
        cancelled = super().cancel(job)
        if self.store is not None:
            self.store.touch(job.model, job.tenant)
        return cancelled

    def commit(
        self,
        sched: Scheduler,
        job: Job,
        backend: BackendSlots,
        now: float,
        expect: int | None = None,
    ) -> None:
        super().commit(sched, job, backend, now, expect)
        if self.store is not None:
            for node in self.pool(job.model).path(job.tenant):
                self._busy[(job.model, node)] += 1
            self.store.touch(job.model, job.tenant)

    def _done(self, job: Job) -> None:
        if self.store is not None:
            for node in self.pool(job.model).path(job.tenant):
                self._busy[(job.model, node)] -= 1
            self.store.touch(job.model, job.tenant)

    def release(
        self, job: Job, grant: Grant, ran: bool = True, output_tokens: int | None = None
    ) -> None:
        super().release(job, grant, ran, output_tokens)
        self._done(job)

    def abandon(self, job: Job) -> None:
        super().abandon(job)
        self._done(job)

    # -- dispatch --------------------------------------------------------------------------------
    def arrived(self, job: Job) -> None:
        """A request joined a queue that waits already: if the head here is still the tenant
        whose claim was just refused, the same claim would be refused again (what could change
        the answer, a release or a change in the order, wakes this replica, and the tick
        retries): no round trip for it. Its demand reaches the shared backlog with the next
        round trip all the same (a mark)."""
        tenant = self._refused.get(job.model)
        if tenant is not None and job.model not in self._claiming:
            sched = self._pools.get(job.model)
            if sched is not None and sched.total_queued() > 1:
                head = sched.peek(self.clock())
                if head is not None and head.tenant == tenant:
                    return
        self.pump(job.model)

    def pump(self, model: str) -> None:
        store = self.store
        if store is None or not store.up:
            super().pump(model)  # local fair order on this replica's share
            return
        if model in self._claiming:
            self._again.add(model)
            return
        if self._grant_alone(model, store):
            return
        self._claiming.add(model)
        task = asyncio.get_running_loop().create_task(self._claim_loop(model, store))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _grant_alone(self, model: str, store: ClusterStore) -> bool:
        """Dispatch the one request waiting here without a round trip, on a slot this replica
        leased, when nobody waits for ``model`` anywhere (the store's view, at most two syncs
        old: :meth:`ClusterStore.lease_for`): what an idle cluster does with each request. The
        shared order hears it with the next round trip (a forced claim: the lift, the charge,
        the booking adjusted to the request). Not for a tenant under a cap, nor while a busy
        tenant's next request is expected here (the shared order decides those)."""
        sched = self._pools.get(model)
        if sched is None or sched.total_queued() != 1:
            return False
        now = self.clock()
        job = sched.peek(now)
        if job is None or (self._is_live is not None and not self._is_live(job)):
            return False
        if self._caps and any(n in self._caps for n in (job.tenant, *self.path(job.tenant))):
            return False
        if next(self.open_holds(model, now), None) is not None:
            return False
        admission = self.admission
        assert isinstance(admission, ClusterAdmission)
        for backend in admission.serving(model):
            if not backend.healthy:
                continue
            size = self._size(job, backend)
            slot = store.lease_for(model, backend.name, size)
            if slot is not None:
                break
        else:
            return False
        cost = self._cost(sched, job)
        admission.claimed = True
        try:
            self.commit(sched, job, backend, now)
        finally:
            admission.claimed = False
        store.granted(model, job.tenant, cost, size, self._candidate(backend), slot)
        return True

    def _leases_cover(self, model: str, store: ClusterStore, holds: list[Hold]) -> bool:
        """Whether slots this replica leased on one backend fit every expected request of
        ``holds`` while nobody waits for ``model`` anywhere: then a hold claim (a round trip
        the request may arrive during) is not needed; each will be granted alone."""
        for backend in self.admission.serving(model):
            if backend.healthy:
                sizes = [self._size(h.job, backend) for h in holds]
                if store.leases_fit(model, backend.name, sizes):
                    return True
        return False

    @staticmethod
    def _candidate(backend: BackendSlots) -> Candidate:
        return Candidate(backend.name, backend.cap, backend.kv_budget)

    async def _claim_loop(self, model: str, store: ClusterStore) -> None:
        """Claim for the head of ``model``'s queue until it empties or a claim is refused;
        first, a slot for each expected request that would precede the head (holds)."""
        passed: set[int] = set()  # holds the shared order refused in this pass
        try:
            while True:
                self._again.discard(model)
                sched = self._pools.get(model)
                if sched is None:
                    return
                now = self.clock()
                job = sched.peek(now)
                if job is not None and self._is_live is not None and not self._is_live(job):
                    self.cancel(job)  # its owner is gone and will withdraw it
                    continue
                holds = self._pending_holds(sched, model, now, passed)
                self._refused.pop(model, None)
                if job is None and holds and self._leases_cover(model, store, holds):
                    return  # idle: the expected requests will be granted on leased slots
                if job is None and not holds:
                    return
                if not store.up:
                    super().pump(model)
                    return
                serving = [b for b in self.admission.serving(model) if b.healthy]
                if not serving:
                    return
                candidates = [self._candidate(b) for b in serving]
                if holds:
                    sizes = [self._size(h.job, serving[0]) for h in holds]
                    res = await self._claim_holds(model, store, holds, sizes, candidates)
                    if res is None or model in self._again:
                        continue
                    if res.status == "full":
                        self._full[model] = self.full_retry_ticks
                        return  # no room: wait for a wake-up
                    # the rest are refused: another tenant comes first; claim for the head
                    passed.update(id(h) for h in holds[len(res.backends) :])
                    continue
                assert job is not None
                jobs = self._heads(sched, job)
                # what each grant charges, as pop will (a busy tenant's expected output too),
                # and books
                booked = tuple(self._size(j, serving[0]) for j in jobs)
                requests = [(self._cost(sched, j), n) for j, n in zip(jobs, booked, strict=True)]

                def on_result(
                    res: ClaimResult,
                    sched: Scheduler = sched,
                    jobs: list[Job] = jobs,
                    sizes: tuple[int, ...] = booked,
                ) -> None:
                    self._claimed(sched, jobs, sizes, res)

                head = store.claim(
                    model, job.tenant, requests, self._demand(sched, job), candidates, on_result
                )
                self._claim_runner_up(sched, job, store, serving[0], candidates)
                try:
                    res = await head
                except ClusterUnavailable:
                    continue  # the store is down now: the next pass decides locally
                if model in self._again:
                    continue
                if res.status == "cap":
                    self._cap(job.tenant)
                    continue  # the next head here
                if res.status == "full" or not res.room:  # no room left, whatever the rest
                    self._full[model] = self.full_retry_ticks
                    if not res.backends:
                        self._refused[model] = job.tenant
                    return  # wait for a wake-up (a slot freed)
                self._full.pop(model, None)
                if not res.backends:
                    self._refused[model] = job.tenant
                    return  # wait for a wake-up (the backlog changed) or the next tick
        finally:
            self._claiming.discard(model)

    def _claim_runner_up(
        self,
        sched: Scheduler,
        head: Job,
        store: ClusterStore,
        backend: BackendSlots,
        candidates: list[Candidate],
    ) -> None:
        """With the head's claim, in the same round trip, one for the next request of the
        tenant that comes after the head's here (the least counter of the others waiting). The
        counters here lag the other replicas' charges by up to a sync, so the shared order may
        well put that tenant first; granted here, it needs no wake-up and claim of its own. The
        shared order checks it like any claim, and the reply sets the local counters first, so
        the grant is dispatched only if its job is the head here then (else the slot goes back:
        :meth:`_claimed`)."""
        best: tuple[float, str] | None = None
        for tenant in sched.backlogged():
            if tenant == head.tenant or tenant in self._paused or tenant in self._capped:
                continue
            c = sched.node_counter(tenant)
            if best is None or c < best[0]:
                best = (c, tenant)
        if best is None:
            return
        (job,) = sched.queued_jobs(best[1], 1)
        if self._is_live is not None and not self._is_live(job):
            return
        size = self._size(job, backend)

        def on_result(res: ClaimResult) -> None:
            self._claimed(sched, [job], (size,), res)

        requests = [(self._cost(sched, job), size)]
        fut = store.claim(
            job.model, job.tenant, requests, self._demand(sched, job), candidates, on_result
        )
        fut.add_done_callback(retrieved)

    def _demand(self, sched: Scheduler, job: Job) -> int:
        """What ``job``'s tenant waits for here: its queued requests and the expected ones
        whose slots are not held yet (tenants behind it in the shared order leave room for
        all of them, as a local pump serves the holds of the tenants it precedes first)."""
        expected = sum(
            1
            for h in self._holds
            if h.grant is None and h.job.tenant == job.tenant and h.job.model == job.model
        )
        return sched.queued(job.tenant) + expected

    def _pending_holds(
        self, sched: Scheduler, model: str, now: float, passed: set[int]
    ) -> list[Hold]:
        """The expected requests of ``model`` without a slot of the first tenant that has
        any, waits nowhere here and is not at its cap (up to ``claim_batch``; one claim asks
        for them all). Whether they would be served before the backlog is the
        shared order's question (the hold claim asks it): the tenants it competes with may
        all wait at other replicas, where ``DispatchCore._hold_for``'s local check sees none.
        Found with an empty queue here too, so the claim rides in the same round trip as the
        release that ended the tenant's request, ahead of the wake-up it sends."""
        out: list[Hold] = []
        for hold in self.open_holds(model, now):
            tenant = hold.job.tenant
            if (
                id(hold) not in passed
                and (not out or tenant == out[0].job.tenant)
                and not sched.queued(tenant)
                and tenant not in self._paused
                and tenant not in self._capped
            ):
                out.append(hold)
                if len(out) == self.claim_batch:
                    break
        return out

    async def _claim_holds(
        self,
        model: str,
        store: ClusterStore,
        holds: list[Hold],
        sizes: list[int],
        candidates: list[Candidate],
    ) -> ClaimResult | None:
        """Book slots of ``sizes`` for ``holds`` (one tenant's) in the shared ledger, checked
        against the global order; None if Redis went down meanwhile."""

        def on_result(res: ClaimResult) -> None:
            for hold, tokens, name in zip(holds, sizes, res.backends, strict=False):
                self._held(hold, tokens, name)

        try:
            return await store.claim(
                model,
                holds[0].job.tenant,
                [(0.0, tokens) for tokens in sizes],
                0,
                candidates,
                on_result,
                hold=True,
            )
        except ClusterUnavailable:
            return None

    def _held(self, hold: Hold, tokens: int, name: str) -> None:
        """A hold's slot on backend ``name``: keep it for the expected request, unless it came
        (or the hold lapsed) meanwhile; then the slot goes back."""
        store = self.store
        if store is None:
            return
        backend = next((b for b in self.admission.backends() if b.name == name), None)
        pending = any(h is hold for h in self._holds) and hold.until > self.clock()
        if backend is None or not pending or hold.grant is not None:
            store.release(name, tokens)
            return
        admission = self.admission
        assert isinstance(admission, ClusterAdmission)
        admission.claimed = True
        try:
            self.grant_hold(hold, backend)
        finally:
            admission.claimed = False

    def _heads(self, sched: Scheduler, head: Job) -> list[Job]:
        """``head`` and up to ``claim_batch - 1`` of its tenant's jobs queued behind it: one
        claim asks for all of them (Redis grants the later ones only while the tenant keeps
        the smallest counter, i.e. while they would be the head here too)."""
        if self.claim_batch <= 1 or sched.queued(head.tenant) <= 1:
            return [head]
        jobs = sched.queued_jobs(head.tenant, self.claim_batch)
        if not jobs or jobs[0] is not head:
            return [head]
        live = self._is_live
        out: list[Job] = []
        for j in jobs:  # stop at a withdrawn job: the ones behind it would not be the head
            if live is not None and not live(j):
                break
            out.append(j)
        return out or [head]

    def _claimed(
        self, sched: Scheduler, jobs: list[Job], sizes: tuple[int, ...], res: ClaimResult
    ) -> None:
        """A claim's reply, processed inside the store's writer: dispatch each granted job
        that is still the head of the fair order here, return the other slots."""
        store = self.store
        if not res.backends or store is None:
            return
        now = self.clock()
        admission = self.admission
        assert isinstance(admission, ClusterAdmission)
        backends = {b.name: b for b in admission.backends()}
        for job, size, name in zip(jobs, sizes, res.backends, strict=False):
            backend = backends.get(name)
            live = self._is_live is None or self._is_live(job)
            if backend is None or not live or sched.peek(now) is not job:
                # the job left meanwhile, or another tenant comes first here: give it back
                store.release(name, size)
                continue
            admission.claimed = True
            try:
                self.commit(sched, job, backend, now)
            finally:
                admission.claimed = False
            store.lease(job.model, self._candidate(backend), size)  # while idle: the next one


class ClusterDispatcher(Dispatcher):
    """A :class:`Dispatcher` over a :class:`ClusterCore` and a :class:`ClusterAdmission`."""

    core_class = ClusterCore
    core: ClusterCore

    def attach(self, store: ClusterStore) -> None:
        self.core.attach(store)
