"""The shared fair order's rules, stated once: a plain-Python model of the state in Redis.

Replicas of the gateway share one fair order per model and the backends' batch slots. Every
decision that must see one consistent state runs atomically inside Redis as a Lua script
(:mod:`gateway.cluster.scripts`); this module states the same decisions in Python, on an
in-memory :class:`SharedState`, with the scripts' own inputs and outputs (typed values instead
of ARGV strings: :mod:`gateway.cluster.scripts` maps one to the other). It is the reference the
scripts are checked against (``tests/cluster/test_rule.py`` runs seeded scripts of operations
through both and compares every reply and the whole state), and the reasoning lives here: the
Lua keeps what Redis needs and points back to the method of the same name.

The state (the Redis key in brackets, ``P`` the prefix)::

    leases             replica -> lease expiry, ms                     [P:replicas]
    orders[model]      the model's fair order (:class:`ModelOrder`)
                                                  [P:c, P:q, P:w, P:d, P:bl, P:last]
    slots[backend]     [sequences in flight, KV tokens booked]        [P:be:<backend>]
    capacity[backend]  its sequence limit, as the last claim said     [P:cap]
    models_of[backend] the models claims named it a candidate for     [P:bm:<backend>]
    replicas[replica]  what one replica holds and has waiting         [P:hold, P:rq, P:rd]
    wakes              messages published: (replica, message), None   [P:wake:<replica>,
                       for every replica                               P:wake]

Every operation but :meth:`SharedState.leave` first renews the caller's lease (a *heartbeat*),
reaping replicas whose lease ran out. Counters are never reaped: a tenant keeps its position
however its replicas come and go.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Key = tuple[str, str]  # (model, tenant)

#: Relative tolerance of the order check: counters this close count as equal (float sums of
#: charges made in different orders at different replicas differ in the last bits).
ORDER_TOLERANCE = 1e-9


@dataclass(frozen=True, slots=True)
class Candidate:
    """A backend a claim may book, with the capacity the claiming replica knows for it."""

    name: str
    max_seqs: int
    max_kv: int


@dataclass(frozen=True, slots=True)
class Flush:
    """A replica's charges to one counter since its previous flush: ``sent`` counter units are
    added to the shared counter; ``base`` re-creates a counter the shared state lost (Redis
    restarted empty) from the replica's last known value."""

    model: str
    tenant: str
    base: float
    sent: float


@dataclass(frozen=True, slots=True)
class Claim:
    """What a replica asks for in one claim (see :meth:`SharedState.claim`)."""

    model: str
    tenant: str
    #: the tenant's requests waiting at the replica, the claimed ones included; None: a hold
    waiting: int | None
    #: counter units a resubmitting tenant may stay below the lift's floor
    credit: float
    #: ``(extra, tokens)`` per request, the head request first: ``extra`` counter units are
    #: charged when it is granted, ``tokens`` KV tokens booked
    requests: tuple[tuple[float, int], ...]
    #: the backends it may go to
    candidates: tuple[Candidate, ...]
    #: the replica's unsent charges (the claimant's first)
    flushes: tuple[Flush, ...] = ()


@dataclass(frozen=True, slots=True)
class SyncResult:
    known: bool  # whether the replica still held a lease (if not, it registers again)
    replicas: int  # live replicas
    counters: tuple[float, ...] = ()  # the shared counter per flush, in order


@dataclass(frozen=True, slots=True)
class ClaimResult:
    status: str  # "ok" (all granted) | "full" | "order" (why the rest was refused)
    counter: float = 0.0
    lower: int = 0  # backlogged tenants with a smaller counter (at the last check)
    backends: tuple[str, ...] = ()  # one per granted request, in order
    #: requests of the last one's size the candidates still have room for after the grants
    room: int = 0
    flushed: tuple[float, ...] = ()  # the shared counter per flush, in order

    @property
    def backend(self) -> str | None:
        """The first request's backend, if granted."""
        return self.backends[0] if self.backends else None


@dataclass(slots=True)
class ModelOrder:
    """One model's shared fair order."""

    #: tenant -> counter (weighted service, counter units) [P:c:<model>]
    counters: dict[str, float] = field(default_factory=dict)
    #: tenant -> the replicas where it waits [P:w:<model>\x1f<tenant>], their number
    #: [P:q:<model>]
    sites: dict[str, set[str]] = field(default_factory=dict)
    #: tenant -> its requests waiting, all replicas together: its demand [P:d:<model>]
    demand: dict[str, int] = field(default_factory=dict)
    #: tenant -> counter, for tenants waiting somewhere: the backlog [P:bl:<model>]
    backlog: dict[str, float] = field(default_factory=dict)
    #: the tenant that most recently left the backlog [P:last:<model>]
    last: str | None = None

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def set_counter(self, tenant: str, value: float) -> None:
        """Set a counter; a backlogged tenant moves to its new place in the order."""
        self.counters[tenant] = value
        if tenant in self.backlog:
            self.backlog[tenant] = value

    def floor(self) -> float | None:
        """The counter a tenant entering the backlog is lifted to: the smallest of the
        backlogged tenants or, with nobody waiting, that of the tenant that left last (VTC's
        rule, as in :mod:`gateway.scheduler.vtc`); None on a fresh order."""
        if self.backlog:
            return min(self.backlog.values())
        return self.counter(self.last) if self.last is not None else None

    def lift(self, tenant: str, credit: float) -> float:
        """Entering the backlog, a tenant's counter becomes ``max(own, floor - credit)``: idle
        time earns no credit, so a returning tenant cannot starve those that kept waiting.
        ``credit > 0`` only for a busy tenant resubmitting: it may stay that far below the
        floor (:meth:`gateway.scheduler.vtc.VTCScheduler.lift`)."""
        c = self.counter(tenant)
        floor = self.floor()
        if floor is not None and floor - credit > c:
            c = floor - credit
            self.counters[tenant] = c
        return c

    def ranked(self) -> list[str]:
        """The backlogged tenants, first in the order first (ties by name, as a Redis sorted
        set orders them)."""
        return sorted(self.backlog, key=lambda t: (self.backlog[t], t))

    def below(self, c: float) -> list[str]:
        """Backlogged tenants ahead of a counter ``c`` (smaller beyond the tolerance), first in
        the order first."""
        limit = c - ORDER_TOLERANCE * max(1.0, abs(c))
        return [t for t in self.ranked() if self.backlog[t] < limit]


@dataclass(slots=True)
class ReplicaState:
    """What one replica has told the shared state."""

    #: backend -> [sequences, KV tokens] this replica holds [P:hold:<replica>]
    holds: dict[str, list[int]] = field(default_factory=dict)
    #: (model, tenant) the replica has waiting [P:rq:<replica>]
    waits: set[Key] = field(default_factory=set)
    #: (model, tenant) -> its requests waiting there, as the replica last said [P:rd:<replica>]
    queued: dict[Key, int] = field(default_factory=dict)


def _now_ms() -> float:
    return float(time.time_ns() // 1_000_000)


class SharedState:
    """The shared fair order and slot ledger, with the scripts' operations as methods.

    ``clock()`` gives the time in ms that leases are measured by (Redis's ``TIME`` for the
    scripts; injected here so that a test decides when a lease runs out).
    """

    def __init__(self, clock: Callable[[], float] = _now_ms) -> None:
        self.clock = clock
        self.leases: dict[str, float] = {}
        self.orders: dict[str, ModelOrder] = {}
        self.slots: dict[str, list[int]] = {}
        self.capacity: dict[str, int] = {}
        self.models_of: dict[str, set[str]] = {}
        self.replicas: dict[str, ReplicaState] = {}
        self.wakes: list[tuple[str | None, str]] = []

    def order(self, model: str) -> ModelOrder:
        order = self.orders.get(model)
        if order is None:
            order = self.orders[model] = ModelOrder()
        return order

    def replica(self, name: str) -> ReplicaState:
        state = self.replicas.get(name)
        if state is None:
            state = self.replicas[name] = ReplicaState()
        return state

    # -- the operations (one script each) --------------------------------------------------
    def sync(self, replica: str, lease_ms: float, flushes: Sequence[Flush]) -> SyncResult:
        """Heartbeat and merge of a replica's charges (``SYNC``, every sync interval).

        Charges are *added*, never set: replicas charge the same tenant concurrently, and each
        sends only what it charged since its last flush. A replica whose lease ran out still
        gets its charges counted; ``known`` False tells it to register again."""
        known, _ = self._heartbeat(replica, lease_ms)
        live = len(self.leases)
        return SyncResult(known, live, self._flush(flushes))

    def register(
        self,
        replica: str,
        lease_ms: float,
        holdings: Iterable[tuple[str, int, int]],
        waiting: Iterable[tuple[str, str, int]],
    ) -> bool:
        """(Re)register a replica with its whole local state (``REGISTER``): the slots it holds,
        ``(backend, seqs, kv)``, and where its tenants wait, ``(model, tenant, requests)``.

        This makes the shared state exact again after anything was lost (a reaped lease, a
        Redis that restarted empty, a round trip whose outcome is unknown): holdings are set to
        what the replica says (the difference moves the backend's counts), tenants no longer
        waiting there are unmarked (in name order), the others marked in the order given,
        each entering the backlog lifted without credit."""
        _, now = self._heartbeat(replica, lease_ms)
        for backend, seqs, kv in holdings:
            held = self.replicas.get(replica, ReplicaState()).holds.get(backend, [0, 0])
            self._add_slots(replica, backend, seqs - held[0], kv - held[1])
        wanted = [((model, tenant), n) for model, tenant, n in waiting]
        keep = {key for key, _ in wanted}
        state = self.replicas.get(replica)
        for key in sorted(state.waits if state is not None else ()):
            if key not in keep:
                self._unmark(replica, *key)
        for (model, tenant), n in wanted:
            self._mark(replica, model, tenant, 0.0, n)
        self.leases[replica] = now + lease_ms
        return True

    def mark(
        self,
        replica: str,
        lease_ms: float,
        model: str,
        tenant: str,
        on: bool,
        credit: float = 0.0,
        waiting: int = 1,
    ) -> float | None:
        """A tenant starts (``on``) or stops waiting at this replica (``MARK``). Returns its
        counter (lifted if it entered the backlog), or None when the replica is unknown (it
        registers its whole state instead)."""
        known, _ = self._heartbeat(replica, lease_ms)
        if not known:
            return None
        if on:
            self._mark(replica, model, tenant, credit, waiting)
        else:
            self._unmark(replica, model, tenant)
        return self.order(model).counter(tenant)

    def claim(self, replica: str, lease_ms: float, claim: Claim) -> ClaimResult | None:
        """Claim batch slots for the next requests of a tenant at this replica (``CLAIM``).

        The claim's charges (:attr:`Claim.flushes`) are merged first (as by :meth:`sync`), so
        the order check sees this replica's own counters exact; they count even when the
        replica is unknown, which returns None (it must register first).

        The tenant joins the backlog (as by :meth:`mark`), then the requests are granted in
        order, each on the candidate with the most room (:meth:`_room`), the first refusal
        ending the claim:

        * the first request when some candidate has room and either no backlogged tenant is
          ahead of the claimant or, after this booking, the candidates still have room for a
          request of this size for every request the tenants ahead have waiting (their
          demand, at least one each). Their replicas claim that room: a batch of slots freed
          at once goes to the tenants first in the order whichever replica asks first, and
          the room beyond their demand is taken (work-conserving). A stale demand holds back
          what its replica last said waits there, no more;
        * each further one only while the tenant, charged for the ones before, is still first
          in the order and a candidate has room.

        A *hold* books slots for the expected next requests of a busy tenant that waits
        nowhere (:meth:`gateway.core.DispatchCore.hold`): it does not enter the backlog, and
        the order check takes its counter as it would be lifted on arrival,
        ``max(own, smallest backlogged - credit)``.

        Every candidate's sequence limit and the claim's model are noted for it (what a
        release needs to know whom to wake: :meth:`_wake_for`). Afterwards what still waits
        here is the tenant's demand at this replica (none: it leaves the backlog here).
        Returns the status ("ok": all granted; "full" or "order": why the first one not
        granted was refused), the tenant's counter, how many tenants were ahead at the last
        check, the backend per granted request, the room the candidates still have for
        requests of the last one's size (none: the replica waits for a release's wake-up
        instead of claiming again) and the counter per flush."""
        known, _ = self._heartbeat(replica, lease_ms)
        self._flush(claim.flushes)
        if not known:
            return None
        model, tenant, waiting = claim.model, claim.tenant, claim.waiting
        order = self.order(model)
        c = order.counter(tenant)
        if waiting is None:
            if order.backlog:
                c = max(c, min(order.backlog.values()) - claim.credit)
        else:
            self._mark(replica, model, tenant, claim.credit, waiting)
            c = order.counter(tenant)
        for cand in claim.candidates:
            self.capacity[cand.name] = cand.max_seqs
            self.models_of.setdefault(cand.name, set()).add(model)
        status, lower = "ok", 0
        granted: list[str] = []
        for j, (extra, size) in enumerate(claim.requests):
            tokens = max(1, size)
            ahead = order.below(c)
            lower = len(ahead)
            if j > 0 and lower:
                status = "order"
                break
            best, total = self._room(claim.candidates, tokens)
            if best is None:
                status = "full"
                break
            if lower and sum(max(1, order.demand.get(t, 0)) for t in ahead) > total - 1:
                status = "order"
                break
            self._add_slots(replica, best, 1, tokens)
            granted.append(best)
            c += extra
            order.set_counter(tenant, c)
        if waiting is not None:
            left = waiting - len(granted)
            if left > 0:
                self._set_demand(replica, model, tenant, left)
            else:
                self._unmark(replica, model, tenant)
        last = max(1, claim.requests[-1][1]) if claim.requests else 1
        return ClaimResult(
            status,
            order.counter(tenant),
            lower,
            tuple(granted),
            self._room(claim.candidates, last)[1],
            tuple(self.order(f.model).counter(f.tenant) for f in claim.flushes),
        )

    def add_slots(self, replica: str, lease_ms: float, backend: str, seqs: int, kv: int) -> bool:
        """Book (+) or return (-) slots without any check (``SLOTS``): a release, or a request
        moved to another backend after its first refused it. An unknown replica books nothing
        and gets False (its next registration carries its whole holdings)."""
        known, _ = self._heartbeat(replica, lease_ms)
        if known:
            self._add_slots(replica, backend, seqs, kv)
        return known

    def leave(self, replica: str) -> None:
        """A replica shutting down (``LEAVE``): its slots return at once instead of after its
        lease, its tenants leave the backlog. No heartbeat: nobody else is reaped."""
        self._drop(replica)

    # -- the rules the operations share --------------------------------------------------------
    def _heartbeat(self, replica: str, lease_ms: float) -> tuple[bool, float]:
        """Reap replicas whose lease ran out (at ``now`` or before, earliest first), then renew
        the caller's lease if it is known. Returns (known, now)."""
        now = self.clock()
        expired = sorted((t, r) for r, t in self.leases.items() if t <= now)
        for _, r in expired:
            self._drop(r)
        known = replica in self.leases
        if known:
            self.leases[replica] = now + lease_ms
        return known, now

    def _drop(self, replica: str) -> None:
        """Forget a replica: the slots it holds return to their backends, its tenants stop
        waiting there (in name order, which decides who left the backlog last)."""
        state = self.replicas.get(replica)
        if state is not None:
            for backend, (seqs, kv) in list(state.holds.items()):
                self._add_slots(replica, backend, -seqs, -kv)
            for key in sorted(state.waits):
                self._unmark(replica, *key)
            del self.replicas[replica]
        self.leases.pop(replica, None)

    def _flush(self, flushes: Sequence[Flush]) -> tuple[float, ...]:
        """Merge charges: counter = (shared counter, or ``base`` if it has none) + ``sent``."""
        out = []
        for f in flushes:
            order = self.order(f.model)
            c = order.counters.get(f.tenant, f.base) + f.sent
            order.set_counter(f.tenant, c)
            out.append(c)
        return tuple(out)

    def _mark(self, replica: str, model: str, tenant: str, credit: float, waiting: int) -> None:
        """The tenant waits at ``replica`` (``waiting`` requests, at least one counted). At the
        first replica where it waits, it enters the backlog, lifted (:meth:`ModelOrder.lift`)."""
        state = self.replica(replica)
        key = (model, tenant)
        if key not in state.waits:
            state.waits.add(key)
            order = self.order(model)
            sites = order.sites.setdefault(tenant, set())
            sites.add(replica)
            if len(sites) == 1:
                order.backlog[tenant] = order.lift(tenant, credit)
        self._set_demand(replica, model, tenant, max(1, waiting))

    def _unmark(self, replica: str, model: str, tenant: str) -> None:
        """The tenant no longer waits at ``replica``; waiting nowhere any more, it leaves the
        backlog, becomes the order's ``last`` and every replica hears ``m:<model>`` (the order
        changed: a claim refused for it may pass now)."""
        self._set_demand(replica, model, tenant, 0)
        state = self.replicas.get(replica)
        key = (model, tenant)
        if state is None or key not in state.waits:
            return
        state.waits.discard(key)
        order = self.order(model)
        sites = order.sites.get(tenant, set())
        sites.discard(replica)
        if sites:
            return
        order.sites.pop(tenant, None)
        order.backlog.pop(tenant, None)
        order.last = tenant
        self.wakes.append((None, f"m:{model}"))

    def _set_demand(self, replica: str, model: str, tenant: str, n: int) -> None:
        """How many of a tenant's requests wait at a replica, as the replica last said; the
        sum over replicas is the tenant's demand, the room a claim of a tenant further back in
        the order must leave (see :meth:`claim`)."""
        key = (model, tenant)
        state = self.replicas.get(replica)
        old = state.queued.get(key, 0) if state is not None else 0
        if n == old:
            return
        state = self.replica(replica)
        if n > 0:
            state.queued[key] = n
        else:
            state.queued.pop(key, None)
        order = self.order(model)
        total = order.demand.get(tenant, 0) + n - old
        if total > 0:
            order.demand[tenant] = total
        else:
            order.demand.pop(tenant, None)

    def _add_slots(self, replica: str, backend: str, seqs: int, kv: int) -> None:
        """Move slots between a backend and a replica's holdings. A replica never returns more
        than it holds, and a backend's counts never go below zero, whatever raced (a release
        after a reap): the counts stay exact once the last holder registers again. Returned
        sequences wake replicas (:meth:`_wake_for`): a claim refused as full may pass now."""
        held = self.replica(replica).holds.setdefault(backend, [0, 0])
        seqs = max(seqs, -held[0])
        kv = max(kv, -held[1])
        counts = self.slots.setdefault(backend, [0, 0])
        counts[0] = max(0, counts[0] + seqs)
        counts[1] = max(0, counts[1] + kv)
        held[0] += seqs
        held[1] += kv
        if seqs < 0:
            self._wake_for(backend)

    def _wake_for(self, backend: str) -> None:
        """Who hears ``b:<backend>`` when sequences return to a backend: the replicas where
        the tenants first in the order wait, for each model a claim named the backend a
        candidate for, as many tenants (in order) as their demand (at least one request each)
        takes to fill the backend's room now (its sequence limit as the last claim said, less
        its sequences in flight; at least one). Each such replica hears it once: their claims
        are the ones the room rule lets pass first, and a replica further back hears a later
        release or ``m:<model>``, or retries on a tick. With no model or limit known for the
        backend (no claim named it yet), every replica hears it."""
        msg = f"b:{backend}"
        models = self.models_of.get(backend)
        cap = self.capacity.get(backend)
        if not models or cap is None:
            self.wakes.append((None, msg))
            return
        room = max(1, cap - self.slots.get(backend, [0, 0])[0])
        sent: set[str] = set()
        for model in models:
            order = self.orders.get(model, ModelOrder())
            need = 0
            for tenant in order.ranked()[:room]:
                for r in order.sites.get(tenant, ()):
                    if r not in sent:
                        sent.add(r)
                        self.wakes.append((r, msg))
                need += max(1, order.demand.get(tenant, 0))
                if need >= room:
                    break

    def _room(self, candidates: Sequence[Candidate], tokens: int) -> tuple[str | None, int]:
        """Room for a request of ``tokens`` KV tokens: per candidate, the fewer of its free
        sequences and of such requests its free KV budget holds. Returns the candidate with
        the most room (the first listed on a tie; None if none has any) and the room of all
        candidates together."""
        best: str | None = None
        best_room = total = 0
        for cand in candidates:
            seqs, kv = self.slots.get(cand.name, (0, 0))
            room = min(cand.max_seqs - seqs, (cand.max_kv - kv) // tokens)
            if room > 0:
                total += room
                if room > best_room:
                    best, best_room = cand.name, room
        return best, total
