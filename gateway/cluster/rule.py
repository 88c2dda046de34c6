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
                                   [P:c, P:up, P:q, P:w, P:d, P:bl, P:last, P:tiers]
    slots[backend]     [sequences in flight, KV tokens booked]        [P:be:<backend>]
    capacity[backend]  its sequence limit, as the last claim said     [P:cap]
    models_of[backend] the models claims named it a candidate for     [P:bm:<backend>]
    replicas[replica]  what one replica holds and has waiting         [P:hold, P:rq, P:rd]
    wakes              messages published: (replica, message), None   [P:wake:<replica>,
                       for every replica                               P:wake]

The order is a tree, as in one process (:mod:`gateway.scheduler.vtc`): each tier has a root
(``~t<tier>``), under it the top-level nodes (groups, or tenants in a flat config), under a
group its children; every node has a counter, and siblings are ordered by counter with VTC's
lift among them. A replica names a tenant's place with every operation that may add it to the
order (its *path*: :class:`Node` per level, top-level node first, the tenant last, and its
tier), so the shared state needs no copy of the configuration, and a reload that moves a node
takes effect with the next mark or claim naming it. A minimum share for a tier
(``batch_min_share``) is two more nodes above the top level, ``~share`` and ``~rest``, weighted
``share : 1 - share`` (the replica builds them into the path: :mod:`gateway.cluster.dispatch`).

Every operation but :meth:`SharedState.leave` first renews the caller's lease (a *heartbeat*),
reaping replicas whose lease ran out. Counters are never reaped: a tenant keeps its position
however its replicas come and go.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

Key = tuple[str, str]  # (model, tenant)

#: Relative tolerance of the order check: counters this close count as equal (float sums of
#: charges made in different orders at different replicas differ in the last bits).
ORDER_TOLERANCE = 1e-9


#: The first character of a *tally*'s name: a count each replica reports with its running
#: requests per capped node (``runs``, set per replica and summed over replicas, as those are)
#: that no claim checks, and that every sync's reply returns summed: what a replica limits
#: against what waits or was admitted elsewhere (``max_queued``, the ``rpm`` policy's limit).
#: No configured name starts with it.
TALLY = "~"


def root(tier: int) -> str:
    """The name of a tier's root in the shared order (no configured name starts with ``~``)."""
    return f"~t{tier}"


@dataclass(frozen=True, slots=True)
class Node:
    """One level of a tenant's place in the tenant tree: a group, or the tenant itself (last
    in a path), with its weight, the counter units it may stay below the lift's floor when it
    enters the backlog (a resubmitting tenant's credit, and its groups'; else 0) and its cap."""

    name: str
    weight: float = 1.0
    credit: float = 0.0
    #: its ``max_in_flight``, all replicas together (0: none; claims check it)
    cap: int = 0


@dataclass(frozen=True, slots=True)
class Place:
    """Where a tenant sits: its path (top-level node first, the tenant last) and its tier."""

    path: tuple[Node, ...]
    tier: int = 0

    @property
    def tenant(self) -> str:
        return self.path[-1].name

    def parent(self, i: int) -> str:
        """The parent of ``path[i]``: the node above it, or the tier's root."""
        return self.path[i - 1].name if i else root(self.tier)


def flat(tenant: str, weight: float = 1.0, credit: float = 0.0, tier: int = 0) -> Place:
    """A tenant of a flat config: one level under its tier's root."""
    return Place((Node(tenant, weight, credit),), tier)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A backend a claim may book, with the capacity the claiming replica knows for it."""

    name: str
    max_seqs: int
    max_kv: int


@dataclass(frozen=True, slots=True)
class Flush:
    """A replica's charges to one node's counter (a tenant's or a group's) since its previous
    flush: ``sent`` counter units are added to the shared counter; ``base`` re-creates a
    counter the shared state lost (Redis restarted empty) from the replica's last known
    value."""

    model: str
    tenant: str  # the node
    base: float
    sent: float


@dataclass(frozen=True, slots=True)
class Claim:
    """What a replica asks for in one claim (see :meth:`SharedState.claim`)."""

    model: str
    #: the tenant's place, with the credit of each level
    place: Place
    #: the tenant's requests waiting at the replica, the claimed ones included; None: a hold
    waiting: int | None
    #: ``(cost, tokens)`` per request, the head request first: ``cost`` priced tokens are
    #: charged when it is granted (``cost / weight`` to each node of the path), ``tokens`` KV
    #: tokens booked
    requests: tuple[tuple[float, int], ...]
    #: the backends it may go to
    candidates: tuple[Candidate, ...]
    #: the replica's unsent charges (the claimant's first)
    flushes: tuple[Flush, ...] = ()
    #: the replica granted the requests already, on slots it leased on the first candidate
    #: (see :meth:`SharedState.claim`)
    forced: bool = False

    @property
    def tenant(self) -> str:
        return self.place.tenant


@dataclass(frozen=True, slots=True)
class SyncResult:
    known: bool  # whether the replica still held a lease (if not, it registers again)
    replicas: int  # live replicas
    counters: tuple[float, ...] = ()  # the shared counter per flush, in order
    #: per model asked about: whether a tenant waits for it anywhere (its backlog)
    waiting: tuple[bool, ...] = ()
    #: per backend asked about: (sequences, KV tokens) booked, all replicas together
    used: tuple[tuple[int, int], ...] = ()
    #: every tally (a reported count named ``~...``: :data:`TALLY`), all replicas together,
    #: in name order
    tallies: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimResult:
    status: str  # "ok" (all granted) | "full" | "order" | "cap" (why the rest was refused)
    counters: tuple[float, ...] = ()  # the counter of each node of the claim's path
    lower: int = 0  # backlogged nodes ahead of the claimant's (at the last check)
    backends: tuple[str, ...] = ()  # one per granted request, in order
    #: requests of the last one's size the candidates still have room for after the grants
    room: int = 0
    flushed: tuple[float, ...] = ()  # the shared counter per flush, in order

    @property
    def counter(self) -> float:
        """The tenant's counter."""
        return self.counters[-1] if self.counters else 0.0

    @property
    def backend(self) -> str | None:
        """The first request's backend, if granted."""
        return self.backends[0] if self.backends else None


@dataclass(slots=True)
class ModelOrder:
    """One model's shared fair order: a tree of counters (see the module docstring)."""

    #: node -> counter (weighted service, counter units) [P:c:<model>]
    counters: dict[str, float] = field(default_factory=dict)
    #: node -> its parent (a tier's root at the top), as the last place naming it said
    #: [P:up:<model>]
    up: dict[str, str] = field(default_factory=dict)
    #: tenant -> the replicas where it waits [P:w:<model>\x1f<tenant>], their number
    #: [P:q:<model>]
    sites: dict[str, set[str]] = field(default_factory=dict)
    #: node -> the requests waiting in its subtree, all replicas together: its demand (tier
    #: roots too) [P:d:<model>]
    demand: dict[str, int] = field(default_factory=dict)
    #: parent -> {child: counter} for its children with a tenant waiting somewhere below: the
    #: backlog, per parent [P:bl:<model>\x1f<parent>]
    backlog: dict[str, dict[str, float]] = field(default_factory=dict)
    #: parent -> the child that most recently left its backlog [P:last:<model>]
    last: dict[str, str] = field(default_factory=dict)
    #: root -> tier, for the tiers with a backlog [P:tiers:<model>]
    tiers: dict[str, int] = field(default_factory=dict)

    def counter(self, node: str) -> float:
        return self.counters.get(node, 0.0)

    def set_counter(self, node: str, value: float) -> None:
        """Set a counter; a backlogged node moves to its new place among its siblings."""
        self.counters[node] = value
        siblings = self.backlog.get(self.up.get(node, ""))
        if siblings is not None and node in siblings:
            siblings[node] = value

    def floor(self, parent: str) -> float | None:
        """The counter a child of ``parent`` entering its backlog is lifted to: the smallest of
        the backlogged children or, with none, that of the child that left last (VTC's rule,
        per level, as in :mod:`gateway.scheduler.vtc`); None on a fresh parent."""
        siblings = self.backlog.get(parent)
        if siblings:
            return min(siblings.values())
        last = self.last.get(parent)
        return self.counter(last) if last is not None else None

    def lift(self, node: str, parent: str, credit: float) -> float:
        """Entering its parent's backlog, a node's counter becomes ``max(own, floor - credit)``:
        idle time earns no credit, so a returning tenant cannot starve those that kept waiting.
        ``credit > 0`` only for a busy tenant resubmitting (and its groups): it may stay that
        far below the floor (:meth:`gateway.scheduler.vtc.VTCScheduler.lift`)."""
        c = self.counter(node)
        floor = self.floor(parent)
        if floor is not None and floor - credit > c:
            c = floor - credit
            self.counters[node] = c
        return c

    def ranked(self, parent: str) -> list[str]:
        """``parent``'s backlogged children, first in the order first (ties by name, as a
        Redis sorted set orders them)."""
        siblings = self.backlog.get(parent, {})
        return sorted(siblings, key=lambda t: (siblings[t], t))

    def below(self, parent: str, c: float) -> list[str]:
        """``parent``'s backlogged children ahead of a counter ``c`` (smaller beyond the
        tolerance), first in the order first."""
        limit = c - ORDER_TOLERANCE * max(1.0, abs(c))
        siblings = self.backlog.get(parent, {})
        return [t for t in self.ranked(parent) if siblings[t] < limit]

    def ahead(self, place: Place, counters: Sequence[float]) -> list[str]:
        """The backlogged nodes whose tenants come before a tenant at ``place`` whose path's
        counters are ``counters``: every tier root above its tier (in tier order), then per
        level from the top the siblings with a smaller counter."""
        out = [
            r
            for r in sorted(self.tiers, key=lambda r: -self.tiers[r])
            if self.tiers[r] > place.tier
        ]
        for i in range(len(place.path)):
            out += self.below(place.parent(i), counters[i])
        return out

    def add_demand(self, node: str, n: int) -> None:
        """``n`` more (fewer) requests wait in ``node``'s subtree: it and every node above it."""
        at: str | None = node if n else None
        while at is not None:
            total = self.demand.get(at, 0) + n
            if total > 0:
                self.demand[at] = total
            else:
                self.demand.pop(at, None)
            at = self.up.get(at)

    def enter(self, place: Place, lift: bool = True) -> None:
        """A tenant waits somewhere at ``place``: first every node is put under the parent the
        place names (a reload may have moved it: its demand moves along, and out of its old
        parent's backlog it goes), then, from the tenant up, each node not yet in its parent's
        backlog enters it, lifted (:meth:`lift`; not with ``lift`` False: a registration),
        as long as it has a tenant waiting below."""
        path = place.path
        for i, node in enumerate(path):
            parent, old = place.parent(i), self.up.get(node.name)
            if old == parent:
                continue
            d = self.demand.get(node.name, 0)
            if old is not None:
                self.add_demand(old, -d)
                if node.name in self.backlog.get(old, {}):
                    self.leave(node.name)
            self.up[node.name] = parent
            self.add_demand(parent, d)
        for i in range(len(path) - 1, -1, -1):
            node, parent = path[i], place.parent(i)
            if i < len(path) - 1 and not self.backlog.get(node.name):
                break  # nothing waits below this group (its tenant is not waiting yet)
            siblings = self.backlog.setdefault(parent, {})
            if node.name in siblings:
                continue
            siblings[node.name] = (
                self.lift(node.name, parent, node.credit) if lift else self.counter(node.name)
            )
            if i == 0:
                self.tiers[parent] = place.tier

    def leave(self, node: str) -> None:
        """``node`` leaves its parent's backlog and becomes its ``last``; a parent left with
        no backlogged child leaves its own parent's (a tier root: the tier has none)."""
        parent = self.up[node]
        siblings = self.backlog[parent]
        del siblings[node]
        self.last[parent] = node
        if siblings:
            return
        del self.backlog[parent]
        if parent in self.up:
            self.leave(parent)
        else:
            self.tiers.pop(parent, None)

    def tenants_in_order(self) -> Iterator[str]:
        """The backlogged tenants, first in the order first: tiers from the highest, then at
        each level down the children by counter."""

        def walk(parent: str) -> Iterator[str]:
            for child in self.ranked(parent):
                if child in self.backlog:
                    yield from walk(child)
                else:
                    yield child

        for r in sorted(self.tiers, key=lambda r: (-self.tiers[r], r)):
            yield from walk(r)


@dataclass(slots=True)
class ReplicaState:
    """What one replica has told the shared state."""

    #: backend -> [sequences, KV tokens] this replica holds [P:hold:<replica>]
    holds: dict[str, list[int]] = field(default_factory=dict)
    #: (model, tenant) the replica has waiting [P:rq:<replica>]
    waits: set[Key] = field(default_factory=set)
    #: (model, tenant) -> its requests waiting there, as the replica last said [P:rd:<replica>]
    queued: dict[Key, int] = field(default_factory=dict)
    #: capped node -> its requests running there (and slots held for it), as the replica last
    #: said plus those its claims were granted since [P:rr:<replica>]
    runs: dict[str, int] = field(default_factory=dict)


def _operation(method: Callable[..., T]) -> Callable[..., T]:
    """One of :class:`SharedState`'s operations: its wake-ups go out when it ends (or, inside
    :meth:`SharedState.batch`, when the batch ends)."""

    @functools.wraps(method)
    def run(self: SharedState, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        finally:
            if not self._batching:
                self._wake_released()

    return run


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
        #: capped node -> its requests running, all replicas together [P:run]
        self.running: dict[str, int] = {}
        #: capped node -> its cap, as the last claim naming it said [P:caps]
        self.caps: dict[str, int] = {}
        self.wakes: list[tuple[str | None, str]] = []
        #: backends sequences returned to in the operation (or batch) running: woken after it
        self._released: list[str] = []
        self._batching = False

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
    @_operation
    def sync(
        self,
        replica: str,
        lease_ms: float,
        flushes: Sequence[Flush],
        runs: Sequence[tuple[str, int]] = (),
        kv: Sequence[tuple[str, int]] = (),
        models: Sequence[str] = (),
        backends: Sequence[str] = (),
    ) -> SyncResult:
        """Heartbeat, merge of a replica's charges, its running requests per capped node and
        its KV demand per backend (``SYNC``, every sync interval).

        Charges are *added*, never set: replicas charge the same tenant concurrently, and each
        sends only what it charged since its last flush. Running counts are *set*
        (:meth:`_set_runs`): what runs at the replica now, whatever was lost. So is the KV
        demand of its requests on each backend ``(backend, tokens)``: what its own admission
        ledger plans for them now (under ``predict``, each one's current use and predicted rest;
        a claim books a request's prompt and predicted output, and the next sync replaces the
        sum by this), so the backend's KV count follows the requests as they grow and end. A
        replica whose lease ran out still gets its charges counted (not its running counts or
        KV); ``known`` False tells it to register again. The reply also says, per model of
        ``models``, whether a tenant waits for it anywhere and, per backend of ``backends``,
        its sequences and KV tokens booked: the view a replica grants from without asking
        (a claim's ``forced``), and every tally (:data:`TALLY`) summed over the replicas."""
        known, _ = self._heartbeat(replica, lease_ms)
        live = len(self.leases)
        if known:
            for node, n in runs:
                self._set_runs(replica, node, n)
            state = self.replica(replica)
            for backend, tokens in kv:
                held = state.holds.get(backend, [0, 0])[1]
                self._add_slots(replica, backend, 0, tokens - held)
        counters = self._flush(flushes)
        waiting = tuple(bool(self.orders[m].tiers) if m in self.orders else False for m in models)
        used = tuple((self.slots.get(b, [0, 0])[0], self.slots.get(b, [0, 0])[1]) for b in backends)
        tallies = tuple(sorted((n, c) for n, c in self.running.items() if n.startswith(TALLY)))
        return SyncResult(known, live, counters, waiting, used, tallies)

    @_operation
    def register(
        self,
        replica: str,
        lease_ms: float,
        holdings: Iterable[tuple[str, int, int]],
        waiting: Iterable[tuple[str, Place, int]],
        runs: Iterable[tuple[str, int]] = (),
    ) -> bool:
        """(Re)register a replica with its whole local state (``REGISTER``): the slots it holds,
        ``(backend, seqs, kv)``, its requests running per capped node, ``(node, n)``, and
        where its tenants wait, ``(model, place, requests)``.

        This makes the shared state exact again after anything was lost (a reaped lease, a
        Redis that restarted empty, a round trip whose outcome is unknown, a reload that moved
        tenants): holdings are set to what the replica says (the difference moves the
        backend's counts), tenants no longer waiting there are unmarked (in name order), the
        others marked in the order given, each entering the backlog with its counter as it is:
        a tenant a replica registers as waiting has been waiting there all along (through an
        outage, or a Redis that restarted empty), so it is not lifted, and what it is owed for
        an outage's unfairness it keeps."""
        _, now = self._heartbeat(replica, lease_ms)
        for backend, seqs, kv in holdings:
            held = self.replicas.get(replica, ReplicaState()).holds.get(backend, [0, 0])
            self._add_slots(replica, backend, seqs - held[0], kv - held[1])
        told = dict(runs)
        for node in sorted(self.replicas.get(replica, ReplicaState()).runs.keys() - told.keys()):
            self._set_runs(replica, node, 0)
        for node, n in told.items():
            self._set_runs(replica, node, n)
        wanted = [(model, place, n) for model, place, n in waiting]
        keep = {(model, place.tenant) for model, place, _ in wanted}
        state = self.replicas.get(replica)
        for key in sorted(state.waits if state is not None else ()):
            if key not in keep:
                self._unmark(replica, *key)
        for model, place, n in wanted:
            bare = Place(tuple(Node(x.name, x.weight, 0.0, x.cap) for x in place.path), place.tier)
            self._mark(replica, model, bare, n, lift=False)
        self.leases[replica] = now + lease_ms
        return True

    @_operation
    def mark(
        self,
        replica: str,
        lease_ms: float,
        model: str,
        tenant: str,
        on: Place | None,
        waiting: int = 1,
    ) -> float | None:
        """A tenant starts waiting at this replica, at place ``on`` (with the credit of each
        level), or stops (``on`` None) (``MARK``). Returns its counter (lifted if it entered
        the backlog), or None when the replica is unknown (it registers its whole state
        instead)."""
        known, _ = self._heartbeat(replica, lease_ms)
        if not known:
            return None
        if on is not None:
            self._mark(replica, model, on, waiting)
        else:
            self._unmark(replica, model, tenant)
        return self.order(model).counter(tenant)

    @_operation
    def claim(self, replica: str, lease_ms: float, claim: Claim) -> ClaimResult | None:
        """Claim batch slots for the next requests of a tenant at this replica (``CLAIM``).

        The claim's charges (:attr:`Claim.flushes`) are merged first (as by :meth:`sync`), so
        the order check sees this replica's own counters exact; they count even when the
        replica is unknown, which returns None (it must register first).

        The tenant joins the backlog (as by :meth:`mark`), then the requests are granted in
        order, each on the candidate with the most room (:meth:`_room`), the first refusal
        ending the claim. The nodes *ahead* of the tenant (:meth:`ModelOrder.ahead`) are the
        backlogged tiers above its tier and, at every level of its path, the siblings with a
        smaller counter: in one process their tenants would be served first.

        * the first request when some candidate has room and either nothing is ahead of the
          claimant or, after this booking, the candidates still have room for a request of
          this size for every request waiting under the nodes ahead (their demand, at least
          one each). Their replicas claim that room: a batch of slots freed at once goes to
          the tenants first in the order whichever replica asks first, and the room beyond
          their demand is taken (work-conserving). A stale demand holds back what its replica
          last said waits there, no more;
        * each further one only while the tenant, charged for the ones before (each node of
          its path ``cost / weight``), still has nothing ahead and a candidate has room.

        None of them while a capped node of its path (:attr:`Node.cap`) has as many requests
        running over all replicas as its cap ("cap"); each grant counts one more running at
        this replica for every capped node of the path (:meth:`_set_runs`).

        A *forced* claim reports requests the replica granted on its own, each on a slot it
        leased (a hold claim made while nobody waited, which the order and the room rule
        granted) on the first candidate, while its view (at most two syncs old) had nobody
        waiting for the model: the tenant enters the backlog (the lift), the requests are
        charged, and each one's ``tokens`` is the KV the leased slot's booking changes by (its
        size less the slot's; no sequence is booked), all without any check.

        A *hold* books slots for the expected next requests of a busy tenant that waits
        nowhere (:meth:`gateway.core.DispatchCore.hold`): it does not enter the backlog, and
        the order check takes each node not in its parent's backlog with its counter as it
        would be lifted on arrival, ``max(own, smallest backlogged sibling - credit)``.

        Every candidate's sequence limit and the claim's model are noted for it (what a
        release needs to know whom to wake: :meth:`_wake_for`). Afterwards what still waits
        here is the tenant's demand at this replica (none: it leaves the backlog here).
        Returns the status ("ok": all granted; "full", "order" or "cap": why the first one not
        granted was refused), the counter of each node of the path, how many nodes were ahead
        at the last check, the backend per granted request, the room the candidates still have
        for requests of the last one's size (none: the replica waits for a release's wake-up
        instead of claiming again) and the counter per flush."""
        known, _ = self._heartbeat(replica, lease_ms)
        self._flush(claim.flushes)
        if not known:
            return None
        model, place, waiting = claim.model, claim.place, claim.waiting
        order = self.order(model)
        if waiting is not None:
            self._mark(replica, model, place, waiting)
        cs = [order.counter(node.name) for node in place.path]
        if waiting is None:
            for i, node in enumerate(place.path):
                siblings = order.backlog.get(place.parent(i), {})
                if siblings and node.name not in siblings:
                    cs[i] = max(cs[i], min(siblings.values()) - node.credit)
        for cand in claim.candidates:
            self.capacity[cand.name] = cand.max_seqs
            self.models_of.setdefault(cand.name, set()).add(model)
        capped = [node for node in place.path if node.cap > 0]
        for node in capped:
            self.caps[node.name] = node.cap
        runs = self.replica(replica).runs
        status, lower = "ok", 0
        granted: list[str] = []
        for j, (cost, size) in enumerate(claim.requests):
            tokens = max(1, size)
            if claim.forced:  # granted already, on a slot leased on the backend it went to
                best: str | None = claim.candidates[0].name
            else:
                status, low, best = self._check(order, place, cs, capped, claim, j, tokens)
                lower = lower if low is None else low
                if best is None:
                    break
            assert best is not None
            if claim.forced:  # a leased slot becomes the request: its KV is adjusted
                self._add_slots(replica, best, 0, size)
            else:
                self._add_slots(replica, best, 1, tokens)
            granted.append(best)
            for node in capped:
                self._set_runs(replica, node.name, runs.get(node.name, 0) + 1)
            for i, node in enumerate(place.path):
                cs[i] += cost / node.weight
                order.set_counter(node.name, cs[i])
        if waiting is not None:
            left = waiting - len(granted)
            if left > 0:
                self._set_demand(replica, model, place.tenant, left)
            else:
                self._unmark(replica, model, place.tenant)
        last = max(1, claim.requests[-1][1]) if claim.requests else 1
        return ClaimResult(
            status,
            tuple(order.counter(node.name) for node in place.path),
            lower,
            tuple(granted),
            self._room(claim.candidates, last)[1],
            tuple(self.order(f.model).counter(f.tenant) for f in claim.flushes),
        )

    def _check(
        self,
        order: ModelOrder,
        place: Place,
        cs: list[float],
        capped: list[Node],
        claim: Claim,
        j: int,
        tokens: int,
    ) -> tuple[str, int | None, str | None]:
        """The checks of :meth:`claim` for its ``j``-th request: (status, nodes ahead (None:
        not counted), the candidate to book, None if refused)."""
        if any(self.running.get(node.name, 0) >= node.cap for node in capped):
            return "cap", None, None
        ahead = order.ahead(place, cs)
        lower = len(ahead)
        if j > 0 and lower:
            return "order", lower, None
        best, total = self._room(claim.candidates, tokens)
        if best is None:
            return "full", lower, None
        if lower and sum(max(1, order.demand.get(x, 0)) for x in ahead) > total - 1:
            return "order", lower, None
        return "ok", lower, best

    @_operation
    def add_slots(self, replica: str, lease_ms: float, backend: str, seqs: int, kv: int) -> bool:
        """Book (+) or return (-) slots without any check (``SLOTS``): a release, or a request
        moved to another backend after its first refused it. An unknown replica books nothing
        and gets False (its next registration carries its whole holdings)."""
        known, _ = self._heartbeat(replica, lease_ms)
        if known:
            self._add_slots(replica, backend, seqs, kv)
        return known

    @_operation
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
            for node in sorted(state.runs):
                self._set_runs(replica, node, 0)
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

    def _mark(
        self, replica: str, model: str, place: Place, waiting: int, lift: bool = True
    ) -> None:
        """The tenant waits at ``replica`` (``waiting`` requests, at least one counted), at
        ``place``: it enters the backlog at the first replica where it waits, and each mark
        puts its nodes where the place says (:meth:`ModelOrder.enter`, with ``lift``)."""
        state = self.replica(replica)
        tenant = place.tenant
        key = (model, tenant)
        order = self.order(model)
        if key not in state.waits:
            state.waits.add(key)
            order.sites.setdefault(tenant, set()).add(replica)
        order.enter(place, lift)
        self._set_demand(replica, model, tenant, max(1, waiting))

    def _unmark(self, replica: str, model: str, tenant: str) -> None:
        """The tenant no longer waits at ``replica``; waiting nowhere any more, it leaves the
        backlog (and each group it leaves without a tenant waiting: :meth:`ModelOrder.leave`)
        and every replica hears ``m:<model>`` (the order changed: a claim refused for it may
        pass now)."""
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
        if tenant in order.backlog.get(order.up.get(tenant, ""), {}):
            order.leave(tenant)
        self.wakes.append((None, f"m:{model}"))

    def _set_demand(self, replica: str, model: str, tenant: str, n: int) -> None:
        """How many of a tenant's requests wait at a replica, as the replica last said; the
        sum over replicas is the tenant's demand (and, up its path, its groups'), the room a
        claim of a tenant further back in the order must leave (see :meth:`claim`)."""
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
        self.order(model).add_demand(tenant, n - old)

    def _set_runs(self, replica: str, node: str, n: int) -> None:
        """A capped node has ``n`` requests running at ``replica`` (and slots held for it):
        the difference moves its count over all replicas. A count that falls below the node's
        cap wakes every replica (``c:<node>``): a claim refused for it may pass now."""
        runs = self.replica(replica).runs
        old = runs.get(node, 0)
        if n == old:
            return
        if n > 0:
            runs[node] = n
        else:
            runs.pop(node, None)
        before = self.running.get(node, 0)
        after = max(0, before + n - old)
        if after > 0:
            self.running[node] = after
        else:
            self.running.pop(node, None)
        cap = self.caps.get(node)
        if cap is not None and before >= cap > after:
            self.wakes.append((None, f"c:{node}"))

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
        if seqs < 0 and backend not in self._released:
            self._released.append(backend)

    def _wake_released(self) -> None:
        """At the end of an operation, or of a batch of them (:meth:`batch`): wake-ups for
        the backends sequences returned to (:meth:`_wake_for`), on the state as it is then, so
        that a release and the releasing replica's own claims in one round trip wake nobody
        for room those claims took."""
        released, self._released = self._released, []
        for backend in released:
            self._wake_for(backend)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Run several operations as one round trip (``BATCH``): their wake-ups come once,
        after the last."""
        self._batching = True
        try:
            yield
        finally:
            self._batching = False
            self._wake_released()

    def _wake_for(self, backend: str) -> None:
        """Who hears ``b:<backend>`` when sequences return to a backend: the replicas where the
        tenants first in the order wait (:meth:`ModelOrder.tenants_in_order`), for each model a
        claim named the backend a candidate for, as many tenants (in order) as their demand (at
        least one request each) takes to fill the backend's room now (its sequence limit as the last
        claim said, less its sequences in flight). Each such replica hears it once:
        their claims are the ones the room rule lets pass first, and a replica further back hears a
        later release or ``m:<model>``, or retries on a tick. With no model or limit known for the
        backend (no claim named it yet), every replica hears it; with no room left (claims in
        the same round trip took it), nobody."""
        msg = f"b:{backend}"
        models = self.models_of.get(backend)
        cap = self.capacity.get(backend)
        if not models or cap is None:
            self.wakes.append((None, msg))
            return
        room = cap - self.slots.get(backend, [0, 0])[0]
        if room <= 0:
            return
        sent: set[str] = set()
        for model in models:
            order = self.orders.get(model, ModelOrder())
            need = 0
            for tenant in itertools.islice(order.tenants_in_order(), room):
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
