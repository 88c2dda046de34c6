"""Gateway replicas in the lab: each its own dispatch core, all sharing one fair order through
the cluster's own rule, :class:`gateway.cluster.rule.SharedState`, held in memory.

The live cluster (:mod:`gateway.cluster.dispatch`, :mod:`gateway.cluster.store`) asks Redis; a
lab replica asks the same rule synchronously, in virtual time, and otherwise does what a live
replica does:

* its per-model schedulers order its own queue, with the local lift off (the shared order
  lifts, with the credit the replica names in each place: :meth:`ClusterCore.place`);
* its pump claims for the head of its local order (with up to ``claim_batch`` of that tenant's
  requests, each priced ``Scheduler.dispatch_cost``), and first for the slots of a busy
  tenant's expected requests (a *hold* claim); granted jobs are committed locally (the local
  ledger still reserves, the shared one booked them already: :attr:`ReplicaAdmission.claimed`),
  a job that is no longer the local head gives its slot back;
* a tenant's queue becoming non-empty or empty here is marked or unmarked in the shared order
  before the next claim (as a round trip sends its marks before its claims);
* charges are flushed as deltas per (model, node), groups included: with every claim (the
  replica's unsent charges, the claimant's first) and with a sync every ``sync_s`` of virtual
  time; the replies set the local counters (``remote + unsent``, as ``ClusterStore._apply``);
* a refused claim waits for a wake-up (:attr:`SharedState.wakes`, delivered by
  :meth:`SharedOrder.settle`) or the next sync tick (:meth:`ClusterCore.tick`, which retries a
  queue refused for want of room only every ``full_retry_ticks``).

Leases do not run out here (a fixed clock): nobody is reaped. With ``sync_s = 0`` every output
charge is flushed as it is made and a replica syncs before it claims: the order then sees
every counter exact, as one process does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..admission import AdmissionController, BackendSlots, Reservation
from ..cluster.dispatch import ClusterAdmission, ClusterCore
from ..cluster.rule import Candidate, Claim, ClaimResult, Flush, SharedState
from ..cluster.store import changed
from ..core import CoreOptions, Grant, Hold
from ..scheduler import Job, Scheduler

Key = tuple[str, str]  # (model, node)

#: Lease of a lab replica: the shared state's clock stands still, so leases never run out.
LEASE_MS = 1e18


@dataclass(slots=True)
class SharedStats:
    """What the lab's replicas asked of the shared order."""

    claims: int = 0  # claims for queued requests
    granted: int = 0  # requests they were granted
    returned: int = 0  # granted slots given back (the job was no longer the head here)
    hold_claims: int = 0  # claims for the expected requests of busy tenants
    holds: int = 0  # slots those were granted
    syncs: int = 0
    marks: int = 0  # marks and unmarks


class SharedOrder:
    """The lab's stand-in for Redis: one :class:`SharedState` and the replicas using it."""

    def __init__(self, sync_s: float) -> None:
        self.state = SharedState(clock=lambda: 0.0)
        self.sync_s = sync_s
        self.replicas: list[ReplicaCore] = []
        self.stats = SharedStats()
        self._synced_at = 0.0

    def settle(self) -> None:
        """Deliver the wake-ups the operations published (each named replica, or all of them,
        once per message and round), until none is left."""
        state = self.state
        while state.wakes:
            wakes, state.wakes = state.wakes, []
            seen: set[tuple[int, str]] = set()
            for who, message in wakes:
                for i, core in enumerate(self.replicas):
                    if (who is None or who == core.name) and (i, message) not in seen:
                        seen.add((i, message))
                        core.wake(message)

    def tick(self, now: float) -> None:
        """Once a sync interval has passed (at an engine step's end): every replica flushes its
        charges and reads the shared counters back, then retries its refused queues."""
        if now - self._synced_at < self.sync_s:
            return
        self._synced_at = now
        for core in self.replicas:
            core.sync()
        for core in self.replicas:
            core.tick()
        self.settle()


class ReplicaAdmission(AdmissionController):
    """A replica's own ledger, every reservation mirrored into the shared ledger (as
    :class:`gateway.cluster.dispatch.ClusterAdmission` does into Redis): booked unless a claim
    booked it already (``claimed``), returned on release."""

    claimed: bool = False

    def __init__(self, backends: Iterable[BackendSlots], state: SharedState, replica: str):
        super().__init__(backends)
        self.state = state
        self.replica = replica
        self._booked: dict[int, tuple[str, int]] = {}  # id(reservation) -> (backend, tokens)

    def reserve(
        self, backend: BackendSlots, tokens: int, prompt: int = 0, expect: int | None = None
    ) -> Reservation:
        reservation = super().reserve(backend, tokens, prompt, expect)
        size = ClusterAdmission.booking(backend, tokens, prompt, expect)
        if not self.claimed:
            self.slots(backend.name, 1, size)
        self._booked[id(reservation)] = (backend.name, size)
        return reservation

    def release(self, reservation: Reservation) -> None:
        super().release(reservation)
        booked = self._booked.pop(id(reservation), None)
        if booked is not None:
            self.slots(booked[0], -1, -booked[1])

    def slots(self, backend: str, seqs: int, tokens: int) -> None:
        self.state.add_slots(self.replica, LEASE_MS, backend, seqs, tokens)


class ReplicaCore(ClusterCore):
    """One lab replica: a :class:`ClusterCore` (its place, credit, hold and batch rules) whose
    claims go to the in-memory shared order synchronously (see the module docstring)."""

    admission: ReplicaAdmission

    def __init__(
        self,
        name: str,
        shared: SharedOrder,
        backends: Iterable[BackendSlots],
        on_grant: Callable[[Job, Grant], None],
        options: CoreOptions,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(
            ReplicaAdmission(backends, shared.state, name), on_grant, options, clock=clock
        )
        self.name = name
        self.shared = shared
        self.stats = shared.stats
        self._entry_credit = {}
        self._full = {}
        self._claiming = set()
        self._capped = set()
        self._capped_ticks = 0
        #: running per capped node and KV per backend, as the last sync told the shared state
        self._reported: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self._sent: dict[Key, float] = {}  # local counter value the shared state reflects
        self._marked: set[Key] = set()  # (model, tenant) the shared state believes wait here
        self._dirty: set[Key] = set()  # (model, tenant) whose waiting state may have changed
        shared.state.register(name, LEASE_MS, (), ())
        shared.replicas.append(self)

    def pool(self, model: str) -> Scheduler:
        sched = super().pool(model)
        sched.lift = False  # the shared order lifts
        return sched

    # -- queue side ------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        key = (job.model, job.tenant)
        if self.pool(job.model).queued(job.tenant) == 0:
            # its credit as it arrives, before the arrival ends a hold for it
            self._entry_credit.pop(key, None)
            self._entry_credit[key] = self.credit(*key)
        self._touch(*key)
        super().submit(job)

    def _touch(self, model: str, tenant: str) -> None:
        """As ``ClusterStore.touch``: the tenant's (and its groups') charges from now on are
        this replica's to flush; its waiting state may have changed."""
        for node in (*self.groups(model, tenant), tenant):
            k = (model, node)
            if k not in self._sent:
                self._sent[k] = self.counter(*k)
        self._dirty.add((model, tenant))

    def _marks(self) -> None:
        """Tell the shared order which tenants started or stopped waiting here."""
        for key in sorted(self._dirty):
            n = self.waiting(*key)
            if (n > 0) != (key in self._marked):
                (self._marked.add if n else self._marked.discard)(key)
                place = self.place(*key) if n else None
                remote = self.shared.state.mark(self.name, LEASE_MS, *key, place, n)
                assert remote is not None
                self._apply(key, remote)
                self.stats.marks += 1
        self._dirty.clear()

    # -- counters --------------------------------------------------------------------------------
    def _flush(self, key: Key) -> Flush:
        """``key``'s charges since its last flush; now counted as sent."""
        value = self.counter(*key)
        sent = self._sent.get(key, value)
        self._sent[key] = value
        return Flush(key[0], key[1], sent, value - sent)

    def _apply(self, key: Key, remote: float, extra: float = 0.0) -> None:
        """The shared counter is ``remote`` (with ``extra`` charged by the claim itself): the
        local one becomes it plus what is still unsent."""
        local = self.counter(*key)
        value = remote + local - self._sent.get(key, local) - extra
        if value != local:
            self.set_counter(key[0], key[1], value)
        self._sent[key] = remote

    def sync(self) -> None:
        """Flush every charge made here since the last flush, with what changed of the running
        counts of capped nodes and of the KV this replica's ledger plans for (as
        ``ClusterStore`` does); read the shared counters back."""
        keys = list(self._sent)
        runs, kv = self.runs(), self.kv()
        told_runs, told_kv = self._reported
        self._reported = (runs, kv)
        flushes = [self._flush(k) for k in keys]
        res = self.shared.state.sync(
            self.name, LEASE_MS, flushes, changed(runs, told_runs), changed(kv, told_kv)
        )
        self.stats.syncs += 1
        for key, remote in zip(keys, res.counters, strict=True):
            self._apply(key, remote)

    # -- dispatch --------------------------------------------------------------------------------
    def pump(self, model: str) -> None:
        sched = self._pools.get(model)
        if sched is None:
            return
        if not self.shared.sync_s:
            self.sync()
        self._marks()
        passed: set[int] = set()  # holds the shared order refused in this pass
        while self._claim_next(sched, model, passed):
            pass
        self._marks()

    def _claim_next(self, sched: Scheduler, model: str, passed: set[int]) -> bool:
        """One claim of ``ClusterCore._claim_loop``; True to claim again."""
        now = self.clock()
        job = sched.peek(now)
        holds = self._pending_holds(sched, model, now, passed)
        if job is None and not holds:
            return False
        serving = [b for b in self.admission.serving(model) if b.healthy]
        if not serving:
            return False
        candidates = tuple(Candidate(b.name, b.cap, b.kv_budget) for b in serving)
        if holds:
            sizes = [self._size(h.job, serving[0]) for h in holds]
            res = self._claim(
                model, holds[0].job.tenant, [(0.0, s) for s in sizes], None, candidates
            )
            self.stats.hold_claims += 1
            self.stats.holds += len(res.backends)
            for hold, tokens, name in zip(holds, sizes, res.backends, strict=False):
                self._held(hold, tokens, name)
            if res.status == "full":
                self._full[model] = self.full_retry_ticks
                return False
            passed.update(id(h) for h in holds[len(res.backends) :])
            return True
        assert job is not None
        jobs = self._heads(sched, job)
        requests = [(sched.dispatch_cost(j), self._size(j, serving[0])) for j in jobs]
        res = self._claim(
            model, job.tenant, requests, self._demand(sched, job), candidates, sched, jobs
        )
        self.stats.claims += 1
        self.stats.granted += len(res.backends)
        if res.status == "cap":
            self._cap(job.tenant)
            return True  # the next head here
        if res.status == "full" or (res.status == "ok" and not res.room):
            self._full[model] = self.full_retry_ticks
            return False
        self._full.pop(model, None)
        return bool(res.backends)

    def _claim(
        self,
        model: str,
        tenant: str,
        requests: list[tuple[float, int]],
        waiting: int | None,
        candidates: tuple[Candidate, ...],
        sched: Scheduler | None = None,
        jobs: list[Job] | None = None,
    ) -> ClaimResult:
        """Claim slots for ``requests`` of ``tenant`` (``waiting`` None: a hold), carrying
        this replica's unsent charges (the claimant's first); commit the granted ``jobs``,
        then mirror the counters of the reply (as ``ClusterStore.claim``)."""
        key = (model, tenant)
        if waiting is not None:
            waiting = max(waiting, len(requests))
        place = self.place(model, tenant)
        flushed = [key, *(k for k in self._sent if k != key and self.counter(*k) != self._sent[k])]
        claim = Claim(
            model,
            place,
            waiting,
            tuple(requests),
            candidates,
            tuple(self._flush(k) for k in flushed),
        )
        res = self.shared.state.claim(self.name, LEASE_MS, claim)
        assert res is not None  # registered, and leases never run out here
        if waiting is not None:
            (self._marked.discard if len(res.backends) >= waiting else self._marked.add)(key)
            self._dirty.add(key)
        if sched is not None and jobs is not None:
            self._commit_granted(sched, jobs, [size for _, size in requests], res)
        cost = sum(c for c, _ in requests[: len(res.backends)])
        for node, remote in zip(place.path, res.counters, strict=True):
            self._apply((model, node.name), remote, cost / node.weight)
        path = {(model, node.name) for node in place.path}
        for other, remote in zip(flushed[1:], res.flushed[1:], strict=True):
            if other not in path:
                self._apply(other, remote)
        return res

    def _commit_granted(
        self, sched: Scheduler, jobs: list[Job], sizes: list[int], res: ClaimResult
    ) -> None:
        """Dispatch each granted job that is still the head of the local order; give the
        other slots (``sizes`` booked) back (``ClusterCore._claimed``)."""
        now = self.clock()
        admission = self.admission
        for job, size, name in zip(jobs, sizes, res.backends, strict=False):
            if sched.peek(now) is not job:
                admission.slots(name, -1, -size)
                self.stats.returned += 1
                continue
            admission.claimed = True
            try:
                self.commit(sched, job, admission.get(name), now)
            finally:
                admission.claimed = False
            self._touch(job.model, job.tenant)

    def _held(self, hold: Hold, tokens: int, name: str) -> None:
        """A hold claim's slot on ``name``: held for the expected request."""
        admission = self.admission
        admission.claimed = True
        try:
            self.grant_hold(hold, admission.get(name))
        finally:
            admission.claimed = False
