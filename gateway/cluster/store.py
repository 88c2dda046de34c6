"""The gateway's link to the shared state in Redis: one ordered writer, batched round trips.

Everything a replica tells Redis goes through one writer task, in order, as pipelined batches:
one round trip carries whatever accumulated since the previous one (claims, releases, backlog
changes); every ``sync_interval_s`` a ``SYNC`` renews the replica's lease and flushes the
charges its local schedulers accumulated, and a claim carries the unsent charges itself.
Nothing crosses the network per output token; a claim (one script call) dispatches one or
several requests.

Counters are mirrored: the local schedulers keep charging as always, and for every (model,
tenant) the store remembers ``sent`` — the local counter value that Redis already reflects.
``local - sent`` is what the next batch flushes. Each reply carries Redis's counter, which
becomes the local value plus whatever was charged meanwhile, so every replica orders its own
queue by the global counters, at most one sync interval stale.

Failure: any Redis error puts the store *down* (a round trip past the socket timeout only if
the next one, a registration sent at once, times out too: one slow round trip on a loaded
machine is no outage): claims raise :class:`ClusterUnavailable` (the dispatcher falls back to
its local fair order), one warning is logged, ``fallbacks`` counts it.
Every sync interval (at least every 0.5 s) it tries again; on success it re-registers its whole
state (slots held, tenants waiting) and re-merges its charges, which also rebuilds a Redis that
restarted empty. Counters are merged, never reset: a counter Redis lost is re-created from the
replica's last known value.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis import asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeout

from .rule import Candidate, Claim, ClaimResult, Flush, Node, Place
from .scripts import (
    SCRIPTS,
    batch_args,
    claim_args,
    claim_reply,
    mark_args,
    mark_reply,
    register_args,
    slots_args,
    sync_args,
    sync_reply,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model, tenant)


#: Longest wait of one pub/sub read: how late :meth:`ClusterStore.close` may find the listener
#: if its cancellation was lost (a message ends the wait at once).
_LISTEN_POLL_S = 0.5


class ClusterUnavailable(Exception):
    """Redis cannot be reached now; decide locally."""


class LocalView(Protocol):
    """What the store needs from the replica's schedulers (implemented by the dispatcher)."""

    def counter(self, model: str, node: str) -> float: ...
    def set_counter(self, model: str, node: str, value: float) -> None: ...
    def waiting(self, model: str, tenant: str) -> int: ...
    def busy(self, model: str, node: str) -> bool: ...
    def place(self, model: str, tenant: str, credit: bool = True) -> Place: ...
    def groups(self, model: str, tenant: str) -> tuple[str, ...]: ...
    def runs(self) -> dict[str, int]: ...
    def kv(self) -> dict[str, int]: ...
    def watched(self) -> tuple[list[str], list[str]]: ...
    def wake(self, message: str) -> None: ...
    def tick(self) -> None: ...


@dataclass
class StoreStats:
    round_trips: int = 0
    commands: int = 0
    fallbacks: int = 0
    last_sync: float = 0.0  # monotonic time of the last successful round trip
    rtt_sum: float = 0.0
    live_replicas: int = 1
    alone: int = 0  # requests granted without a round trip (ClusterStore.granted)

    def observe(self, seconds: float) -> None:
        self.rtt_sum += seconds


@dataclass(slots=True)
class _Op:
    script: str
    args: list[Any]
    key: Key | None = None
    on_result: Callable[[Any], None] | None = None
    #: a claim, without the charges it carries (added when its batch is built)
    claim: Claim | None = None
    #: a claim's flushed counters (the claimant's first), set when its batch is built
    flushed: list[Key] = field(default_factory=list)
    #: news that may wait for the next round trip (the tick's at the latest): what a grant
    #: on a leased slot tells the shared order, so it costs no round trip of its own
    lazy: bool = False


class ClusterStore:
    def __init__(
        self,
        client: aioredis.Redis,
        listener: aioredis.Redis,
        local: LocalView,
        *,
        replica: str,
        prefix: str = "{vtc}",
        sync_interval_s: float = 0.01,
        lease_s: float = 5.0,
    ) -> None:
        self.redis = client
        self._listener = listener
        self.local = local
        self.replica = replica
        self.prefix = prefix
        self.sync_interval_s = sync_interval_s
        self.lease_ms = int(lease_s * 1000)
        self.stats = StoreStats()
        self.up = False
        #: slots this replica holds per backend: [sequences, KV tokens] (the truth it registers)
        self.held: dict[str, list[int]] = {}
        self._marked: set[Key] = set()  # tenants Redis believes wait here
        #: capped node -> running here, tally -> its count here, as last sent
        self._reported: dict[str, int] = {}
        #: every tally summed over the replicas, as the last sync said (:data:`rule.TALLY`)
        self._tallies: dict[str, int] = {}
        self._reported_kv: dict[str, int] = {}  # backend -> KV demand here, as last sent
        #: (when, model -> a tenant waits for it, backend -> (seqs, KV) booked), from the
        #: last sync: what :meth:`lease_for` and :meth:`lease` go by
        self._view: tuple[float, dict[str, bool], dict[str, tuple[int, int]]] | None = None
        #: backend -> the KV tokens of each slot leased there and not used yet; leases in flight
        self._lease: dict[str, list[int]] = {}
        self._leasing: dict[str, int] = {}
        #: how old a view may be to grant from (two sync intervals)
        self.view_s = 2 * sync_interval_s
        #: slots leased per backend at most
        self.lease_slots = 2
        #: charges of requests granted alone, made locally, that their forced claims charge:
        #: left out of the next flush of the key
        self._precharged: dict[Key, float] = {}
        self._sent: dict[Key, float] = {}  # local counter value Redis already reflects
        self._active: set[Key] = set()  # keys whose counter may still change here
        self._dirty: set[Key] = set()  # keys whose waiting state may have changed
        self._ops: list[_Op] = []
        self._register_due = True
        self._kick = asyncio.Event()
        #: the batch script's SHA in this Redis (None: load it first; a restarted Redis forgets)
        self._sha: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._warned = False  # the outage in progress has been logged
        self._slow = False  # the last round trip timed out (once is not an outage)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and register (or start down, retrying in the background)."""
        with contextlib.suppress(ClusterUnavailable):
            await self._batch(full=True)
        self._tasks = [
            asyncio.create_task(self._writer(), name="cluster-writer"),
            asyncio.create_task(self._listen(), name="cluster-listen"),
        ]

    async def close(self) -> None:
        """Stop; a replica that can still reach Redis flushes its charges and leaves (its
        slots return at once instead of after the lease)."""
        self._closed = True
        self._kick.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.up:
            with contextlib.suppress(ClusterUnavailable):
                self._ops.append(_Op("leave", []))
                await self._batch(full=True)
        await self.redis.aclose()
        await self._listener.aclose()

    # -- what the dispatcher tells the store ------------------------------------------------
    def touch(self, model: str, tenant: str) -> None:
        """The tenant's queue or charges here may have changed (submit, cancel, dispatch);
        its groups' charges too (they are flushed as their own counters)."""
        key = (model, tenant)
        for node in (*self.local.groups(model, tenant), tenant):
            k = (model, node)
            if k not in self._sent:  # charges from here on are this replica's to flush
                self._sent[k] = self.local.counter(model, node)
            self._active.add(k)
        self._dirty.add(key)
        self._kick.set()

    def register_again(self) -> None:
        """Send the whole local state with the next round trip (after a reload)."""
        self._register_due = True
        self._kick.set()

    def claim(
        self,
        model: str,
        tenant: str,
        requests: Sequence[tuple[float, int]],
        waiting: int,
        candidates: Iterable[Candidate],
        on_result: Callable[[ClaimResult], None] | None = None,
        *,
        hold: bool = False,
        place: Place | None = None,
        forced: bool = False,
        lazy: bool = False,
    ) -> asyncio.Future[ClaimResult]:
        """Ask for slots for ``tenant``'s next requests, ``(cost, tokens)`` each: the head
        request and those queued behind it, granted in order while the tenant keeps its place
        (:meth:`gateway.cluster.rule.SharedState.claim`); queued at once, the future resolves
        when the reply is in (:class:`ClusterUnavailable` if Redis is down or goes down). The
        claim carries the tenant's unsent charges. ``on_result`` runs synchronously inside the
        writer as the reply is processed (so the local pops and the counter mirror move
        together), after the counters of the tenant's path are set to Redis's. ``waiting``:
        the tenant's requests waiting here, these included (the demand that tenants behind it
        in the order must leave room for). ``hold``: one slot for the expected next request of
        a tenant waiting nowhere, checked against the order but charged nothing (``requests``
        holds its size). ``forced``: see :meth:`granted`; ``place`` given: a lease, see
        :meth:`lease`; ``lazy``: see :attr:`_Op.lazy`."""
        if not self.up:
            fut: asyncio.Future[ClaimResult] = asyncio.get_running_loop().create_future()
            fut.set_exception(ClusterUnavailable())
            return fut
        waiting = max(waiting, len(requests))
        leasing = place is not None
        if place is None:
            place = self.local.place(model, tenant)
        claim = Claim(
            model,
            place,
            None if hold else waiting,
            tuple(requests),
            tuple(candidates),
            forced=forced,
        )
        fut = asyncio.get_running_loop().create_future()
        key = (model, tenant)
        op = _Op("claim", [], key, claim=claim, lazy=lazy)
        if forced:  # charged locally already: the claim charges it, the flushes must not
            for node in place.path:
                k = (model, node.name)
                self._precharged[k] = self._precharged.get(k, 0.0) + requests[0][0] / node.weight

        def done(raw: Any) -> None:
            if isinstance(raw, BaseException):
                if not fut.done():
                    fut.set_exception(ClusterUnavailable())
                return
            reply = claim_reply(raw)
            if reply is None:
                self._register_due = True
                self._kick.set()
                res = ClaimResult("full")
            else:
                res = reply
                if not forced:  # (a forced grant was counted when it was made)
                    for backend, (_, tokens) in zip(res.backends, requests, strict=False):
                        held = self.held.setdefault(backend, [0, 0])
                        held[0] += 1
                        held[1] += tokens
                if not hold and len(res.backends) >= waiting:
                    self._marked.discard(key)
                    self._dirty.add(key)
            if reply is not None and not leasing:
                # the shared counters first (the script's charge for the grants taken out,
                # which the local pops make next), so that the local order is the shared one
                # when the grants are dispatched
                cost = 0.0 if hold or forced else sum(e for e, _ in requests[: len(res.backends)])
                for node, remote in zip(place.path, res.counters, strict=True):
                    self._apply((model, node.name), remote, cost / node.weight)
                    if cost:  # a grant given back unpopped is refunded by the next flush,
                        self._active.add((model, node.name))  # the groups' charge too
                path = {(model, node.name) for node in place.path}
                for other, remote in zip(op.flushed[1:], res.flushed[1:], strict=True):
                    if other not in path:
                        self._apply(other, remote)
            if on_result is not None:
                on_result(res)  # the local pops (or, if a job left meanwhile, a release)
            if not fut.done():
                fut.set_result(res)

        op.on_result = done
        if not leasing:
            self._active.add(key)
        self._push(op)
        return fut

    # -- tallies: counts limited over every replica ---------------------------------------------
    def tally_elsewhere(self, name: str) -> int:
        """The tally ``name`` (:data:`gateway.cluster.rule.TALLY`) at the other replicas, as
        the last sync summed it less what this replica reported (0 while Redis is down: each
        replica limits on its own then)."""
        if not self.up:
            return 0
        return max(0, self._tallies.get(name, 0) - self._reported.get(name, 0))

    def tallies_elsewhere(self, prefix: str) -> dict[str, int]:
        """:meth:`tally_elsewhere` for every tally named ``prefix...``, by the rest of its
        name (those above 0)."""
        out = {}
        for name in self._tallies if self.up else ():
            if name.startswith(prefix):
                n = self.tally_elsewhere(name)
                if n > 0:
                    out[name[len(prefix) :]] = n
        return out

    # -- leased slots: granting without a round trip -----------------------------------------
    def lease_for(self, model: str, backend: str, tokens: int) -> int | None:
        """The size of a slot this replica leased on ``backend`` that holds a request of
        ``tokens`` KV tokens (the smallest), if it may grant one of ``model`` without asking:
        while its view, from a sync at most ``view_s`` old, has nobody waiting for the model
        anywhere. None: ask (claim)."""
        if not self._idle(model):
            return None
        fits = [size for size in self._lease.get(backend, ()) if size >= tokens]
        return min(fits) if fits else None

    def leases_fit(self, model: str, backend: str, tokens: list[int]) -> bool:
        """Whether requests of ``model`` needing ``tokens`` KV tokens each could all be granted
        alone on slots leased on ``backend`` (:meth:`lease_for`)."""
        if not self._idle(model):
            return False
        free = sorted(self._lease.get(backend, ()))
        for need in sorted(tokens):
            i = next((i for i, size in enumerate(free) if size >= need), None)
            if i is None:
                return False
            del free[i]
        return True

    def leased(self) -> dict[str, tuple[int, int]]:
        """backend -> (slots, KV tokens) leased there and not used yet."""
        return {b: (len(sizes), sum(sizes)) for b, sizes in self._lease.items() if sizes}

    def _idle(self, model: str | None = None) -> bool:
        """Whether the view is fresh (at most ``view_s`` old) and has nobody waiting for
        ``model`` anywhere (None: for any model)."""
        view = self._view
        if not self.up or view is None or time.monotonic() - view[0] > self.view_s:
            return False
        return not (any(view[1].values()) if model is None else view[1].get(model, True))

    def granted(
        self, model: str, tenant: str, cost: float, tokens: int, backend: Candidate, slot: int
    ) -> None:
        """This replica granted a request of ``tenant`` needing ``tokens`` KV tokens on a slot
        of ``slot`` it leased on ``backend`` (:meth:`lease_for`; the local pop charged ``cost``
        priced tokens): the shared order hears it with the next round trip, as a *forced*
        claim (the tenant's lift as an arrival, the charge, the slot's KV booking adjusted to
        the request's), and another slot is leased."""
        self._lease[backend.name].remove(slot)
        self.held.setdefault(backend.name, [0, 0])[1] += tokens - slot
        self.stats.alone += 1
        waiting = self.local.waiting(model, tenant) + 1
        requests = [(cost, tokens - slot)]
        fut = self.claim(model, tenant, requests, waiting, [backend], forced=True, lazy=True)
        fut.add_done_callback(retrieved)
        self.lease(model, backend, slot, lazy=True)

    def lease(self, model: str, backend: Candidate, size: int, lazy: bool = False) -> None:
        """Lease slots of ``size`` KV tokens on ``backend`` for requests of ``model`` to come
        (up to ``lease_slots`` per backend, in one claim), while the view is idle and shows a
        free sequence: a hold claim at a place below every tier, so that the order and the
        room rule grant them only from what nobody waiting needs. They are returned once the
        view shows a tenant waiting anywhere (:meth:`_return_leases`)."""
        name = backend.name
        view = self._view
        if view is None or not self._idle(model):
            return
        want = self.lease_slots - len(self._lease.get(name, ())) - self._leasing.get(name, 0)
        if want < 1 or view[2].get(name, (backend.max_seqs, 0))[0] >= backend.max_seqs:
            return
        self._leasing[name] = self._leasing.get(name, 0) + want

        def on_result(res: ClaimResult) -> None:
            for b in res.backends:
                leased = self._lease.setdefault(b, [])
                if len(leased) < self.lease_slots:
                    leased.append(size)
                else:  # slots kept meanwhile (:meth:`release`) filled the leases already
                    self._slots(b, -1, -size, lazy=True)

        def done(_: asyncio.Future[ClaimResult]) -> None:
            self._leasing[name] -= want

        requests = [(0.0, size)] * want
        fut = self.claim(
            model, LEASE.tenant, requests, 0, [backend], on_result,
            hold=True, place=LEASE, lazy=lazy,
        )  # fmt: skip
        fut.add_done_callback(done)
        fut.add_done_callback(retrieved)

    def _return_leases(self) -> None:
        """A tenant waits somewhere: the leased slots go back (the shared order decides)."""
        for backend, sizes in self._lease.items():
            for size in sizes:
                self.release(backend, size)
            sizes.clear()

    def book(self, backend: str, tokens: int) -> None:
        """Book a slot without a check (local fallback, or a request moved between backends):
        Redis hears of it now if up, else from the next registration."""
        self._slots(backend, 1, tokens)

    def release(self, backend: str, tokens: int, keep: bool = False) -> None:
        """Give back a slot of ``tokens`` KV tokens on ``backend``. ``keep`` (a request
        ended): while the view shows nobody waiting anywhere, the slot stays leased instead
        (up to ``lease_slots``), which costs nothing, or else goes back with the next tick's
        round trip: nobody needs it sooner."""
        idle = keep and self._idle()
        if idle:
            leased = self._lease.setdefault(backend, [])
            if len(leased) < self.lease_slots:
                leased.append(tokens)
                return
        self._slots(backend, -1, -tokens, lazy=idle)

    def _slots(self, backend: str, seqs: int, tokens: int, lazy: bool = False) -> None:
        held = self.held.setdefault(backend, [0, 0])
        held[0] = max(0, held[0] + seqs)
        held[1] = max(0, held[1] + tokens)
        if self.up:
            self._push(_Op("slots", slots_args(backend, seqs, tokens), lazy=lazy))

    def _push(self, op: _Op) -> None:
        self._ops.append(op)
        if not op.lazy:
            self._kick.set()

    def _news(self) -> bool:
        """Whether something queued must go out now (not only lazy news)."""
        return bool(self._dirty) or any(not op.lazy for op in self._ops)

    # -- the writer ---------------------------------------------------------------------------
    async def _writer(self) -> None:
        """Send the queued operations as soon as there are any, one round trip at a time. The
        sync (charges flushed, view refreshed, lease renewed) rides with the first round trip
        once an interval has passed since the last one carried it; only a replica with nothing
        else to say sends it alone, on the tick."""
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.sync_interval_s
        synced = loop.time()  # when a round trip last carried the sync
        retry_s = max(self.sync_interval_s, 0.5)
        while not self._closed:
            now = loop.time()
            if not self.up:  # only the tick tries again; news waits for the registration
                await asyncio.sleep(max(0.0, next_tick - now))
            elif now < next_tick and not self._news():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next_tick - now):
                        await self._kick.wait()
            self._kick.clear()
            await asyncio.sleep(0)  # let the claims this wake-up triggers join the batch
            if self._closed:
                return
            now = loop.time()
            tick = now >= next_tick
            if tick:
                next_tick = now + (self.sync_interval_s if self.up else retry_s)
                if self.up:  # the queues it retries claim in this round trip, after the sync
                    self.local.tick()
                    await asyncio.sleep(0)
            if not self.up and not tick:
                continue  # the registration that ends an outage carries the whole state
            was_up = self.up
            full = not self.up or now - synced >= self.sync_interval_s
            try:
                await self._batch(full=full)
            except ClusterUnavailable:
                continue
            if full:
                synced = now
            if not was_up:
                log.warning("cluster: Redis reachable again; shared fair order resumed")
            await asyncio.sleep(0)  # let granted handlers run before the next batch

    async def _batch(self, full: bool) -> None:
        """One round trip: [register] + sync + queued ops. Raises ClusterUnavailable."""
        ops, self._ops = self._ops, []
        local = self.local
        # backlog changes since the last batch become mark/unmark ops
        marks: list[_Op] = []
        claims = {op.key for op in ops if op.claim is not None and op.claim.waiting is not None}
        for key in self._dirty:
            want = local.waiting(*key) > 0
            if want != (key in self._marked):
                (self._marked.add if want else self._marked.discard)(key)
                if not (want and key in claims):  # a claim enters the backlog itself
                    marks.append(self._mark_op(key, want))
        self._dirty.clear()
        register = self._register_due or not self.up
        if not (full or register or marks) and all(op.lazy for op in ops):
            self._ops[:0] = ops  # nothing to say between ticks that cannot wait for one
            return
        if register:  # the registration carries the whole waiting set
            marks = []
            self._marked = {k for k in self._active if local.waiting(*k)}
        before: dict[Key, float] = {}

        def flush(key: Key) -> Flush:
            """``key``'s charges since its last flush (less those a forced claim charges); now
            counted as sent."""
            value = local.counter(*key)
            sent = self._sent.get(key, value)
            before.setdefault(key, sent)
            self._sent[key] = value
            pre = self._precharged.pop(key, 0.0)
            return Flush(key[0], key[1], sent, value - sent - pre)

        claimed: set[Key] = set()
        for op in ops:  # a claim carries the claimant's unsent charges, the first the others'
            if op.claim is not None and op.claim.place is LEASE:
                op.args = claim_args(op.claim)  # a lease: no charges
            elif op.claim is not None and op.key is not None:
                others = (
                    []
                    if claimed
                    else [
                        k
                        for k in self._active
                        if k != op.key and local.counter(*k) != self._sent.get(k)
                    ]
                )
                # a forced claim flushes its groups too: every charge it makes is left out of
                # the flushes of its own round trip (see ``_precharged``)
                path = [
                    (op.key[0], node.name)
                    for node in (op.claim.place.path[:-1] if op.claim.forced else ())
                ]
                op.flushed = [op.key, *path, *(k for k in others if k not in path)]
                claimed.update(op.flushed)
                charges = tuple(flush(k) for k in op.flushed)
                op.args = claim_args(dataclasses.replace(op.claim, flushes=charges))
        # the SYNC renews the lease and flushes everything else once per interval; between
        # ticks the claims, releases and backlog changes go alone (each renews the lease too)
        sync = full
        entries = [key for key in self._active if key not in claimed] if sync else []
        flushes = [flush(key) for key in entries]
        # the whole round trip is one script call (scripts.BATCH) running the operations in order
        calls: list[tuple[str, list[Any]]] = []
        runs = local.runs() if register or sync else {}
        kv = local.kv() if register or sync else {}
        if register or sync:
            for backend, sizes in self._lease.items():  # leased slots are this replica's too
                kv[backend] = kv.get(backend, 0) + sum(sizes)
            # the KV changes made here already that this round trip's operations make in
            # Redis after the report (releases, bookings, forced claims): left out of it
            for op in ops:
                for backend, tokens in _kv_changes(op):
                    kv[backend] = kv.get(backend, 0) - tokens
        if register:
            holdings = []  # the KV tokens its ledger plans for, else what it booked
            moved: Counter[str] = Counter()  # sequences this round trip's releases and
            for op in ops:  # bookings move after the registration (made here already)
                if op.script == "slots":
                    moved[op.args[0]] += int(op.args[1])
            for backend in {**self.held, **kv}:
                seqs, tokens = self.held.get(backend, (0, 0))
                holdings.append((backend, seqs - moved[backend], kv.get(backend, tokens)))
            waiting = [(m, local.place(m, t, False), local.waiting(m, t)) for m, t in self._marked]
            calls.append(("register", register_args(holdings, waiting, runs.items())))
        built = time.monotonic()
        if sync:  # running counts and KV demand that changed since the last report
            models, backends = local.watched()
            calls.append(
                (
                    "sync",
                    sync_args(
                        flushes,
                        changed(runs, runs if register else self._reported),
                        changed(kv, kv if register else self._reported_kv),
                        models,
                        backends,
                    ),
                )
            )
        calls += [(op.script, op.args) for op in (*marks, *ops)]
        n = len(calls)
        start = time.perf_counter()
        try:
            if self._sha is None:
                self._sha = await self.redis.script_load(SCRIPTS["batch"])
            results = await self.redis.evalsha(
                self._sha, 0, self.prefix, self.replica, self.lease_ms, *batch_args(calls)
            )
        except (RedisError, OSError) as exc:
            for key, sent in before.items():
                self._sent[key] = sent
            # every forced claim is lost (this round trip's and those queued): their charges
            # go with the flushes after all
            self._precharged.clear()
            self._view = None
            if self.up and not self._slow and isinstance(exc, (RedisTimeout, TimeoutError)):
                # one slow round trip (a loaded machine) is not an outage: its outcome is
                # unknown, so re-register at once (that makes the ledger exact again); only if
                # that fails too does the replica fall back
                self._slow = True
                self._lost(ops)
                self._kick.set()
                raise ClusterUnavailable from None
            self._down(exc, ops)
            raise ClusterUnavailable from None
        rtt = time.perf_counter() - start
        stats = self.stats
        stats.round_trips += 1
        stats.commands += n
        stats.observe(rtt)
        stats.last_sync = time.monotonic()
        self.up = True
        self._warned = False
        self._slow = False
        if register or sync:
            self._reported, self._reported_kv = runs, kv
            for backend, tokens in kv.items():  # what the ledger counts now, before the claims
                self.held.setdefault(backend, [0, 0])[1] = tokens
        i = 0
        if register:
            self._register_due = False
            i = 1
        if sync:
            synced = sync_reply(results[i])
            i += 1
            if not synced.known:
                self._register_due = True
                self._kick.set()
            stats.live_replicas = max(1, synced.replicas)
            for key, remote in zip(entries, synced.counters, strict=True):
                self._apply(key, remote)
            self._view = (
                built,
                dict(zip(models, synced.waiting, strict=True)),
                dict(zip(backends, synced.used, strict=True)),
            )
            self._tallies = dict(synced.tallies)
            if any(synced.waiting):
                self._return_leases()
        for op, raw in zip((*marks, *ops), results[i:], strict=True):
            if op.script == "mark":
                marked = mark_reply(raw)
                if marked is None:
                    self._register_due = True
                    self._kick.set()
                elif op.key is not None:
                    self._apply(op.key, marked)
            elif op.script == "slots" and not raw:
                self._register_due = True  # Redis no longer knows this replica
                self._kick.set()
            elif op.on_result is not None:
                op.on_result(raw)
        if full:  # forget keys that can no longer change here
            for key in [k for k in self._active if not local.waiting(*k) and not local.busy(*k)]:
                if local.counter(*key) == self._sent.get(key):
                    self._active.discard(key)
                    del self._sent[key]

    def _apply(self, key: Key, remote: float, extra: float = 0.0) -> None:
        """Redis says ``key``'s counter is ``remote``, which includes everything sent so far
        plus ``extra`` charged by the script itself: local = remote + what is still unsent."""
        local = self.local.counter(*key)
        unsent = local - self._sent.get(key, local) - extra
        value = remote + unsent
        if value != local:
            self.local.set_counter(key[0], key[1], value)
        self._sent[key] = remote

    def _mark_op(self, key: Key, on: bool) -> _Op:
        if not on:
            return _Op("mark", mark_args(key[0], key[1], None), key)
        place = self.local.place(*key)
        return _Op("mark", mark_args(key[0], key[1], place, self.local.waiting(*key)), key)

    def _down(self, exc: BaseException, ops: list[_Op]) -> None:
        if not self._warned:
            self._warned = True
            self.stats.fallbacks += 1
            log.warning(
                "cluster: Redis unreachable (%s); each replica keeps serving in its local "
                "fair order until it returns",
                exc.__class__.__name__,
            )
        self.up = False
        self._sha = None
        self._lost(ops, exc)

    def _lost(self, ops: list[_Op], exc: BaseException | None = None) -> None:
        """The outcome of ``ops`` is unknown: fail them and every queued op; the next batch
        registers the replica's whole state instead."""
        self._register_due = True
        self._marked.clear()
        err = exc if exc is not None else ClusterUnavailable()
        pending, self._ops = [*ops, *self._ops], []
        for op in pending:
            if op.on_result is not None:
                op.on_result(err)

    # -- wake-ups from other replicas ------------------------------------------------------------
    async def _listen(self) -> None:
        """Relay the wake-ups until :meth:`close`. The read waits at most ``_LISTEN_POLL_S``
        and the loop re-checks ``_closed``: redis-py's blocking pub/sub read can lose the
        task's cancellation (redis 8.2: a cancel soon after subscribing leaves the task in a
        new read, forever), which made ``close()``, hence a worker's shutdown, hang."""
        channels = (f"{self.prefix}:wake", f"{self.prefix}:wake:{self.replica}")
        while not self._closed:
            try:
                async with self._listener.pubsub() as ps:
                    await ps.subscribe(*channels)
                    while not self._closed:
                        msg = await ps.get_message(timeout=_LISTEN_POLL_S)
                        if msg is not None and msg.get("type") == "message":
                            self.local.wake(msg["data"].decode())
            except (RedisError, OSError):
                if not self._closed:
                    await asyncio.sleep(max(self.sync_interval_s, 0.5))


#: The place of a lease's hold claim: below every tier, so only room nobody waiting needs.
LEASE = Place((Node("~lease"),), -1000)


def retrieved(fut: asyncio.Future[ClaimResult]) -> None:
    """Done callback of a claim nobody awaits: its exception (Redis down) is expected."""
    if not fut.cancelled():
        fut.exception()


def _kv_changes(op: _Op) -> list[tuple[str, int]]:
    """(backend, KV tokens) an operation adds to this replica's bookings that the local ledger
    made already: a release or booking, or a forced claim's adjustment of its leased slots."""
    if op.script == "slots":
        return [(op.args[0], int(op.args[2]))]
    claim = op.claim
    if claim is not None and claim.forced:
        return [(claim.candidates[0].name, tokens) for _, tokens in claim.requests]
    return []


def changed(now: dict[str, int], told: dict[str, int]) -> list[tuple[str, int]]:
    """The counts of ``now`` that differ from ``told`` (those gone from it: 0)."""
    out = [(k, n) for k, n in now.items() if told.get(k) != n]
    return out + [(k, 0) for k in told if k not in now]


def make_store(
    url: str,
    local: LocalView,
    *,
    replica: str,
    prefix: str,
    sync_interval_s: float,
    lease_s: float,
) -> ClusterStore:
    """A store on ``url`` (``redis://host:port/db``); one connection for the ordered writer and
    one for wake-ups. Timeouts are short (a third of the lease, at most 1 s): an unreachable
    Redis must not hold requests; one round trip past it is retried at once with a
    registration, a second in a row is an outage."""
    timeout = min(1.0, lease_s / 3)
    client = aioredis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, max_connections=2
    )
    listener = aioredis.Redis.from_url(url, socket_connect_timeout=timeout)
    return ClusterStore(
        client,
        listener,
        local,
        replica=replica,
        prefix=prefix,
        sync_interval_s=sync_interval_s,
        lease_s=lease_s,
    )
