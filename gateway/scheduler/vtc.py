"""Virtual Token Counter (Sheng et al., OSDI 2024) and its relatives ``lcf`` and ``vtc-predict``.

Each tenant t has a counter c[t]; dispatch serves the backlogged tenant with the smallest counter
and charges ``w_in * prompt / weight`` (plus the prediction for ``vtc-predict``, and for a busy
tenant's request under ``vtc``, below); every output token charges ``w_out / weight``. A tenant
whose queue was empty is lifted on arrival:

* others backlogged: ``c[t] = max(c[t], min(c[k] for backlogged k))``;
* none backlogged:   ``c[t] = max(c[t], c[last])``, ``last`` the tenant that most recently left
  the backlogged set (its counter now).

A *busy* tenant is not an idle one. Concurrency-limited clients (an SDK with N requests in
flight, a batch job with N workers) send their next request a moment after one finishes; their
queue empties not because they stopped asking but because everything they sent was dispatched.
Lifting such a tenant to the floor on every arrival would throw away, again and again, the
lead its weight earned it. So the lift keeps a bounded credit for a tenant that *resubmits*:
one whose arrivals mostly come within ``follow_s`` (the dispatcher's hold time) of one of its
own requests finishing (a moving average over its arrivals, > 1/2), or whose arrival takes over
a slot held for it (see :class:`gateway.core.DispatchCore`):

* ``c[t] = max(c[t], floor - credit[t])`` with ``credit[t]`` the expected cost of t's requests
  in flight and of those whose next request is expected (``(w_in * prompt + w_out * expected
  output) / weight`` each, booked at dispatch; the expected output is the tenant's recent
  average, at most ``max_tokens``); every other arrival to an empty queue gets the paper's
  lift (credit 0).

A tenant can therefore never be more than the cost of its own in-flight work behind the floor
when it arrives: after a demand-limited period (one request in flight for a minute, then a
burst) it catches up by at most that much, so the 2U bound between backlogged tenants grows to
at most 2U + C, C <= the cost of what one tenant can have in flight (<= max(w_in, w_out) * M).

For the credit to hold what a busy tenant is owed, the order must see work when it is
committed. So a request of a tenant that resubmits is also charged its expected output at
dispatch (``w_out * expected / weight``, as ``vtc-predict`` charges every request), then only
the tokens beyond it as they stream, reconciled with the real count at the end. Charged only
as it streams, a batch of slots freed together (requests of one size finish together) would go
wholesale to whichever tenant is behind at that moment, since each grant moves its counter by
the prompt alone; its output then lands on its counter over the next seconds, putting the
other tenant behind by up to the batch's output (``w_out * M``). A busy tenant that is behind
by more than its credit when its queue empties (all its requests running, the next one not yet
sent) is lifted, and the excess is lost, every cycle: weights 1:4 with 16 vs 16 clients of
80-token prompts and 250-token outputs on 16 slots gave 1:2.9. With the expected output
charged up front the two counters move together and the weights hold. Tenants that do not
resubmit (open-loop traffic, the paper's workloads) are charged exactly as in the paper.

``lcf`` (least counter first) is VTC without the lift.

A paused tenant (see :class:`~gateway.scheduler.interface.Scheduler`) stays backlogged but
leaves the heap: its entry is dropped when it reaches the top and ``resume`` pushes a fresh one,
so the order passes over it at O(log T) and never stalls behind it.

Priority tiers: a tenant's tier (``Scheduler.set_tenant(..., tier=)``, higher first) picks its
root; the head of the order is the least counter under the highest tier's root with a
backlogged tenant, so a lower tier is served only while no higher-tier request waits in this
pool. The lift's floor (both cases) is taken within the arriving tenant's tier: tiers are fair
within themselves.

Hierarchy (``set_group``; ``set_tenant(..., parent=)``): every group has a counter and a heap
of its backlogged children. A flat config is the one-level case: each tier's root holds its
tenants, and every rule below reads as the flat algorithm above. A charge of ``cost`` priced
tokens to a tenant adds ``cost / w`` to the tenant and to each of its groups (each at its own
weight): O(depth), no sibling is looked at. A pick descends from the tier's root, taking at
each level the backlogged child with the least counter (ties: the earliest to become
backlogged): O(depth · log fan-out). The lift applies among siblings: a node whose subtree was
idle is lifted, on the arrival that makes it backlogged, to the least counter of its
backlogged siblings, else to the counter of the sibling that last left the backlog (both
cases, per level). So each level is flat VTC among siblings, with the parent's service as the
capacity they share, and the flat bound holds per level: two siblings ``a``, ``b`` backlogged
over an interval get services ``S`` with ``|S_a / w_a - S_b / w_b| <= U / w_a + U / w_b``
(``2·U`` at equal weights 1; U the most one request is charged while others wait, as in the
flat bound), whatever happens below them. The busy-tenant credit applies at the tenant's own
level only (a group is lifted by the paper's rules), and a slot is held for a tenant only if
its next request would compete with the head under the same parent. Tiers are the top level:
a tenant's tier is its top-level node's.

Finding the smallest counter is O(log fan-out) per level: backlogged children sit in their
parent's heap keyed by ``(counter, seq of head job)`` (a group: the arrival that made it
backlogged). Output tokens only *raise* counters, which leaves heap keys stale-but-low;
``_best`` repairs stale entries lazily when they reach the top (a key that is correct at the
top is the true minimum, since every true key is >= its stored key). Changes that *lower* a key
or change the head (refunds, cancelling the head job) push a fresh entry under a new version
and the old one is skipped when met. So a per-token charge is O(depth) and a pick is amortised
O(depth · log fan-out); nothing scans all tenants.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Iterable

from .interface import Job, Prices, Scheduler, job_key
from .predictor import OutputPredictor

_Entry = tuple[float, int, int, str]  # (counter key, seq, version, node): a heap entry

#: the counters of a tier's minimum share (:meth:`VTCScheduler.set_min_share`) as nodes of a
#: shared order (:mod:`gateway.cluster.rule`): that tier's group, and the tiers above it
SHARE_NODES = {"~share": 0, "~rest": 1}


class _Queue:
    """A tenant: its FIFO queue, its place in the order and its busy-tenant bookkeeping."""

    __slots__ = (
        "anc",
        "committed",
        "follows",
        "held",
        "jobs",
        "last_finish",
        "resubmits",
        "running",
        "tenant",
        "up",
        "version",
    )

    def __init__(self, tenant: str, up: _Group, anc: tuple[_Group, ...]) -> None:
        self.tenant = tenant
        self.up = up  # its parent (a tier's root at the top level)
        self.anc = anc  # its groups, nearest first (none in a flat config)
        self.jobs: OrderedDict[int, Job] = OrderedDict()  # seq -> job, FIFO
        self.version = 0
        # seq -> expected cost in priced tokens (w_in * prompt + w_out * expected output)
        self.running: dict[int, float] = {}  # dispatched, not finished
        self.held: dict[int, float] = {}  # finished, the tenant's next request expected
        self.committed = 0.0  # sum of both: the credit before dividing by the weight
        self.last_finish = float("-inf")  # when one of the tenant's requests last finished
        #: moving average of "this arrival came right after one of the tenant's finishes"
        self.resubmits = 0.0
        self.follows = False  # the tenant behaves as a closed-loop client (resubmits > 1/2)

    def head(self) -> Job:
        return next(iter(self.jobs.values()))


class _Group:
    """An inner node of the tenant tree (or a tier's root): its counter and a heap of its
    backlogged children, entries ``(counter key, seq, version, name)`` as for tenants."""

    __slots__ = (
        "committed",
        "counter",
        "heap",
        "kids",
        "last_left",
        "name",
        "queued",
        "since",
        "tier",
        "version",
        "weight",
    )

    def __init__(self, name: str, weight: float = 1.0, tier: int = 0) -> None:
        self.name = name
        self.weight = weight
        self.counter = 0.0
        self.heap: list[_Entry] = []
        self.kids: dict[str, None] = {}  # children (tenants and groups), as an ordered set
        self.queued = 0  # jobs waiting in the subtree
        self.since = 0  # seq of the arrival that made the subtree backlogged (ties)
        self.version = 0
        self.last_left: str | None = None  # the child that last left the backlog
        self.tier = tier
        self.committed = 0.0  # its tenants' committed costs (their credit, see credit())


class VTCScheduler(Scheduler):
    name = "vtc"
    lift = True

    def __init__(self, prices: Prices | None = None, window: int = 10) -> None:
        super().__init__(prices)
        self.window = window
        self.predictor = OutputPredictor(mean_window=window)
        self._lifts: dict[str, list[float]] = {}  # tenant -> [count, units added]
        self._queues: dict[str, _Queue] = {}
        self._total = 0
        self._share: tuple[int, float] | None = None  # (tier, its minimum share); None: strict
        #: with a share: [counter of that tier, counter of the tiers above it, together]
        self._group = [0.0, 0.0]
        # the tenant tree: a root per tier, groups under it (set_group), tenants at the leaves
        self._roots: dict[int, _Group] = {}  # tier -> its root
        self._levels: list[_Group] = []  # the roots, highest tier first
        self._groups: dict[str, _Group] = {}
        self._up: dict[str, _Group] = {}  # tenant or group -> its parent (a root at the top)
        self._anc: dict[str, tuple[_Group, ...]] = {}  # tenant -> its groups, nearest first
        self._dirty = False  # the tree changed since the last _rebuild

    # -- the order ---------------------------------------------------------------------------
    def _root(self, tier: int) -> _Group:
        root = self._roots.get(tier)
        if root is None:
            root = self._roots[tier] = _Group(f"<tier {tier}>", tier=tier)
            self._levels = sorted(self._roots.values(), key=lambda r: -r.tier)
        return root

    def _top(self) -> _Queue | None:
        """The head of the fair order: the least counter of the highest tier with work (or of
        the tier with a minimum share, while it is owed service; see :meth:`set_min_share`)."""
        if self._dirty:
            self._rebuild()
        for root in self._levels:
            top = self._best(root.heap)
            if top is not None and not isinstance(top, _Queue):
                top = self._descend(root.heap)  # a group leads: down the tree
            if top is not None:
                share = self._share
                if share is not None and root.tier > share[0] and self._group[0] < self._group[1]:
                    low = self._roots.get(share[0])
                    low_top = self._descend(low.heap) if low is not None else None
                    if low_top is not None:
                        return low_top
                return top
        return None

    def _best(self, heap: list[_Entry]) -> _Queue | _Group | None:
        """The least backlogged, unpaused node of one heap (stale entries repaired lazily)."""
        while heap:
            key, seq, version, name = heap[0]
            node: _Queue | _Group
            q = self._queues.get(name)
            if q is not None:
                if version != q.version or not q.jobs or name in self._paused:
                    heapq.heappop(heap)  # stale, or paused (resume pushes a fresh entry)
                    continue
                node, counter = q, self._counters[name]
            else:
                g = self._groups.get(name)
                if g is None or version != g.version or not g.queued or name in self._paused:
                    heapq.heappop(heap)
                    continue
                node, counter = g, g.counter
            if key != counter:
                heapq.heapreplace(heap, (counter, seq, version, name))
                continue
            return node
        return None

    def _descend(self, heap: list[_Entry]) -> _Queue | None:
        """From a tier's root down: at each level the child with the least counter (a flat
        config: one heap). A group whose backlogged children are all paused leaves its
        parent's heap (it comes back with :meth:`_push_node`). O(depth · log fan-out)
        amortised."""
        node = self._best(heap)
        stack: list[list[_Entry]] = []
        while True:
            if node is None:
                if not stack:
                    return None
                heap = stack.pop()
                heapq.heappop(heap)  # its top: a group with nothing to run now
            elif isinstance(node, _Queue):
                return node
            else:
                stack.append(heap)
                heap = node.heap
            node = self._best(heap)

    def _level_floor(self, up: _Group) -> float | None:
        """The lift's floor among ``up``'s children: their least backlogged counter, else the
        counter of the child that last left the backlog."""
        heap = up.heap
        while (best := self._best(heap)) is not None:
            if isinstance(best, _Queue):
                return self._counters[best.tenant]
            if self._descend(best.heap) is not None:
                return best.counter
            heapq.heappop(heap)  # a group whose tenants are all paused is no floor (as a tenant)
        return self._node_counter(up.last_left) if up.last_left is not None else None

    def _node_counter(self, name: str) -> float | None:
        g = self._groups.get(name)
        return g.counter if g is not None else self._counters.get(name)

    def _queued_at(self, node: str) -> int:
        g = self._groups.get(node)
        return g.queued if g is not None else self.queued(node)

    def _push_node(self, name: str) -> None:
        """Enter the backlogged node ``name`` in its parent's heap under a fresh entry (the old
        ones become stale), and each ancestor in its parent's (one of them may have left it,
        all its children paused): O(depth · log)."""
        up = self._up.get(name)
        while up is not None:
            g = self._groups.get(name)
            if g is None:
                q = self._queues[name]
                q.version += 1
                entry = (self._counters[name], q.head().seq, q.version, name)
            else:
                g.version += 1
                entry = (g.counter, g.since, g.version, name)
            heap = up.heap
            heapq.heappush(heap, entry)
            if len(heap) > 2 * max(up.queued + 32, len(up.kids)):
                self._compact(up)
            name = up.name
            up = self._up.get(name)

    def _compact(self, g: _Group) -> None:
        """Drop stale entries of ``g``'s heap (left by churn such as submit/cancel with no pick
        in between). Runs after a heap doubles past max(queued jobs, children): amortised O(1)
        per push."""
        entries = []
        for kid in g.kids:
            if kid in self._paused or not self._queued_at(kid):
                continue
            sub = self._groups.get(kid)
            if sub is None:
                q = self._queues[kid]
                entries.append((self._counters[kid], q.head().seq, q.version, kid))
            else:
                entries.append((sub.counter, sub.since, sub.version, kid))
        g.heap[:] = entries
        heapq.heapify(g.heap)

    # -- minimum share of a tier -------------------------------------------------------------
    def set_min_share(self, tier: int, share: float) -> None:
        """Bound the strict priority: while jobs of ``tier`` and of higher tiers both wait,
        ``tier`` gets ``share`` of the service (0 < share < 1; 0 restores strict priority).
        ``tier`` and all tiers above it, together, form two groups ordered by VTC with
        weights ``share : 1 - share`` (group counters charged with every charge, lifted when
        a group's queue fills after it emptied); inside each group tiers and tenants go as
        before. Jobs of tiers below ``tier`` still wait for both groups."""
        if not 0 <= share < 1:
            raise ValueError(f"a minimum share must be in [0, 1), got {share!r}")
        self._share = (tier, share) if share > 0 else None

    def _queued_in(self, tier: int, n: int) -> None:
        """``n`` more (fewer, if negative) jobs queued in ``tier``; with a minimum share, lift
        its group's counter when its queue fills after it emptied."""
        self._roots[tier].queued += n
        share = self._share
        if share is None or n <= 0 or tier < share[0] or not self.lift:
            return  # (a cluster replica: the shared order lifts)
        g = 0 if tier == share[0] else 1
        if not self._group_queued(g, without=(tier, n)):
            self._group[g] = max(self._group)

    def _group_queued(self, g: int, without: tuple[int, int] = (0, 0)) -> bool:
        """Does group ``g`` have queued jobs (not counting ``n`` just added to ``tier``)?"""
        share = self._share
        assert share is not None
        total = 0
        for tier, root in self._roots.items():
            if (tier == share[0]) == (g == 0) and tier >= share[0]:
                total += root.queued - (without[1] if tier == without[0] else 0)
        return total > 0

    # -- hooks -------------------------------------------------------------------------------
    def _on_counter_change(self, tenant: str, delta: float) -> None:
        if self._groups or self._dirty:
            self._charge_groups(tenant, delta)
        elif delta < 0 and self.queued(tenant):
            self._push_node(tenant)  # a lowered key needs a fresh entry (see _charge_groups)
        share = self._share
        if share is not None:  # the groups' counters follow every charge
            tier = self._tiers.get(tenant, 0)
            if tier >= share[0]:
                cost = delta * self._weights.get(tenant, 1.0)
                if tier == share[0]:
                    self._group[0] += cost / share[1]
                else:
                    self._group[1] += cost / (1 - share[1])

    def _charge_groups(self, tenant: str, delta: float) -> None:
        """Charge ``tenant``'s groups what its counter moved by (in priced tokens over each
        group's weight): O(depth), no sibling is looked at."""
        if self._dirty:
            self._rebuild()
        anc = self._anc.get(tenant)
        if anc:
            cost = delta * self._weights.get(tenant, 1.0)
            for g in anc:
                g.counter += cost / g.weight
        # Raising a counter leaves a stale-low key that _best repairs; lowering needs fresh
        # entries, from the lowest backlogged node up.
        if delta < 0:
            if self.queued(tenant):
                self._push_node(tenant)
            elif anc:
                for g in anc:
                    if g.queued:
                        self._push_node(g.name)
                        break

    def _on_tier_change(self, tenant: str, tier: int) -> None:
        up = self._up.get(tenant)
        if up is None:
            return  # indexed with its tier when it arrives (_attach) or at the next rebuild
        if self._dirty or tenant in self._parents:
            self._dirty = True  # the tree is rebuilt with the new tier
            return
        # a top-level tenant moves to its new tier's root: O(log)
        root = self._root(tier)
        del up.kids[tenant]
        root.kids[tenant] = None
        self._up[tenant] = root
        q = self._queues.get(tenant)
        if q is not None:
            q.up = root
            if q.jobs:
                self._queued_in(up.tier, -len(q.jobs))
                self._queued_in(tier, len(q.jobs))
                self._push_node(tenant)  # a fresh entry in its new tier; the old one is stale

    def _on_pause(self, tenant: str, paused: bool) -> None:
        if self._dirty:
            return  # the rebuild before the next decision reads the paused set itself
        if not paused and self._queued_at(tenant):
            self._push_node(tenant)  # back in its parent's order, and its ancestors

    def _on_tree_change(self, node: str) -> None:
        if self._dirty or not self._attach(node):
            self._dirty = True  # rebuilt before the next decision: a reload sets many at once

    # -- the tenant tree ---------------------------------------------------------------------
    def _attach(self, tenant: str) -> bool:
        """Index a tenant new since the last rebuild, without queued jobs, under a group (or
        tier) that is indexed already: O(depth). False when a rebuild is needed instead."""
        if tenant not in self._weights or tenant in self._up or self.queued(tenant):
            return False
        parent = self._parents.get(tenant)
        up = self._groups.get(parent) if parent is not None else self._root(self.tier(tenant))
        if up is None:
            return False
        self._up[tenant] = up
        up.kids[tenant] = None
        anc = []
        g = up
        while g.name in self._groups:
            anc.append(g)
            g = self._up[g.name]
        self._anc[tenant] = tuple(anc)
        return True

    def _rebuild(self) -> None:
        """Index the tree as it is now: parents, ancestors, per-node queued counts and heaps.
        O(tenants + groups); runs after a change of the tree only (start-up, reload)."""
        self._dirty = False
        old = self._groups
        groups: dict[str, _Group] = {}
        for name, weight in self._group_weights.items():
            g = groups[name] = old.get(name) or _Group(name)
            g.weight, g.queued, g.kids, g.last_left, g.committed = weight, 0, {}, None, 0.0
            g.heap = []
        for root in self._roots.values():  # a root keeps its last_left (the lift's floor)
            root.queued, root.kids, root.heap = 0, {}, []
        up: dict[str, _Group] = {}
        for node in [*groups, *self._weights]:
            path = self.path(node)
            tier = self._tiers.get(path[0], 0)
            parent = self._parents.get(node)
            up[node] = self._root(tier) if parent is None else groups[parent]
            up[node].kids[node] = None
            if node in groups:
                groups[node].tier = tier
        self._groups, self._up = groups, up
        self._anc = {
            t: tuple(groups[g] for g in reversed(self.path(t)[:-1])) for t in self._weights
        }
        self._requeue()

    def _requeue(self) -> None:
        """After :meth:`_rebuild` linked the tree: the queued counts and the heaps."""
        groups, up = self._groups, self._up
        for t, q in self._queues.items():
            q.up, q.anc = up[t], self._anc[t]
            for g in q.anc:
                g.committed += q.committed
            if not q.jobs:
                continue
            n = len(q.jobs)
            self._roots[q.up.tier].queued += n
            for g in q.anc:
                g.queued += n
            q.version += 1
            if t not in self._paused:
                heapq.heappush(up[t].heap, (self._counters[t], q.head().seq, q.version, t))
        for name, g in groups.items():
            g.version += 1
            if g.queued and name not in self._paused:
                heapq.heappush(up[name].heap, (g.counter, g.since, g.version, name))

    def group_counter(self, name: str) -> float:
        if self._dirty:
            self._rebuild()
        g = self._groups.get(name)
        return g.counter if g is not None else 0.0

    def node_counter(self, node: str) -> float:
        share = SHARE_NODES.get(node)
        if share is not None:
            return self._group[share]
        return super().node_counter(node)

    def set_node_counter(self, node: str, value: float) -> None:
        """As the base, for tenants, groups and the two nodes of a tier's minimum share
        (:data:`SHARE_NODES`); a lowered key gets a fresh heap entry (see the module
        docstring), a raised one is repaired when it reaches the top."""
        share = SHARE_NODES.get(node)
        if share is not None:
            self._group[share] = value
            return
        if self._dirty:
            self._rebuild()
        g = self._groups.get(node)
        if g is None and node not in self._weights:
            self.set_tenant(node)
        old = g.counter if g is not None else self._counters[node]
        if g is not None:
            g.counter = value
        else:
            self._counters[node] = value
        if value < old and self._queued_at(node) and node not in self._paused:
            self._push_node(node)

    def group_credit(self, name: str) -> float:
        if self._dirty:
            self._rebuild()
        g = self._groups.get(name)
        return g.committed / g.weight if g is not None else 0.0

    def queued_under(self, node: str) -> int:
        if self._dirty:
            self._rebuild()
        return self._queued_at(node)

    # -- policy ------------------------------------------------------------------------------
    def _admit(self, job: Job, now: float) -> None:
        """Queue ``job``: a node whose subtree was idle is lifted among its siblings, level by
        level (the paper's rules at every level; a flat config has one)."""
        tenant = job.tenant
        if self._dirty:
            self._rebuild()
        q = self._queues.get(tenant)
        if q is None:
            if tenant not in self._up and not self._attach(tenant):
                self._rebuild()  # a tenant added since the last rebuild, under a new group
            q = self._queues[tenant] = _Queue(tenant, self._up[tenant], self._anc[tenant])
        follows = self.follow_s > 0 and now - q.last_finish <= self.follow_s
        q.resubmits = 0.75 * q.resubmits + (0.25 if follows else 0)
        q.follows = q.resubmits > 0.5
        anc = q.anc
        if q.jobs:
            q.jobs[job.seq] = job
        else:
            if self.lift:
                self._lift(tenant, q, now, self._level_floor(q.up))
            if anc:
                self._lift_groups(anc, job, self.credit(tenant, now) > 0)
            q.jobs[job.seq] = job
            self._push_node(tenant)
        for g in anc:
            g.queued += 1
        self._total += 1
        self._queued_in(q.up.tier, 1)

    def _lift_groups(self, anc: tuple[_Group, ...], job: Job, busy: bool) -> None:
        """The groups of a tenant whose queue was empty, up to the first that was backlogged
        already: each is lifted among its siblings (a busy tenant's group keeps the credit of
        what its subtree has in flight)."""
        for g in anc:
            if g.queued:
                break  # this group and those above it were backlogged already
            g.since = job.seq
            floor = self._level_floor(self._up[g.name]) if self.lift else None
            if floor is not None:
                target = floor - (g.committed / g.weight if busy else 0.0)
                if target > g.counter:
                    g.counter = target

    def _leave(self, q: _Queue) -> None:
        """One job of ``q`` left it (dispatched or cancelled)."""
        self._total -= 1
        self._roots[q.up.tier].queued -= 1
        for g in q.anc:
            g.queued -= 1
            if not g.queued:
                self._up[g.name].last_left = g.name

    def credit(self, tenant: str, now: float) -> float:
        """Counter units a tenant arriving now may stay below the lift's floor: for one that
        resubmits (see the module docstring), the expected cost of its requests in flight and
        of those whose next request is expected; 0 otherwise. O(1)."""
        q = self._queues.get(tenant)
        if q is None or not (q.held or (q.running and q.follows)):
            return 0.0
        return q.committed / self._weights.get(tenant, 1.0)

    def _lift(self, tenant: str, q: _Queue, now: float, floor: float | None) -> None:
        if floor is None:
            return
        target = floor - self.credit(tenant, now)
        delta = target - self._counters[tenant]
        if delta > 0:
            stat = self._lifts.get(tenant)
            if stat is None:
                stat = self._lifts[tenant] = [0, 0.0]
            stat[0] += 1
            stat[1] += delta
            self._counters[tenant] = target

    def _commit(self, q: _Queue, cost: float) -> None:
        """A job's expected cost enters (or leaves) its tenant's credit, and its groups'."""
        q.committed += cost
        for g in q.anc:
            g.committed += cost

    def lift_stats(self) -> dict[str, tuple[int, float]]:
        return {t: (int(c), u) for t, (c, u) in self._lifts.items()}

    def resubmits(self, tenant: str) -> bool:
        q = self._queues.get(tenant)
        return q is not None and q.follows

    def entitled(self, tenant: str, now: float) -> bool:
        q = self._queues.get(tenant)
        if q is None or q.jobs:
            return False  # its queued work competes in the fair order itself
        if tenant in self._paused:
            return False  # at its cap: a slot held for it would stay unused
        top = self._top()
        if top is None:
            return False  # nobody waits: a free slot stays free for its next request anyway
        if top.up.tier != q.up.tier:
            return q.up.tier > top.up.tier  # a higher tier goes first, a lower one after
        if q.up is not top.up:
            return self._entitled_above(tenant, top.tenant, now)
        head = self._counters[top.tenant]
        # its next request is lifted to at least head - credit (see _lift)
        return max(self._counters[tenant], head - self.credit(tenant, now)) < head

    def _entitled_above(self, tenant: str, head: str, now: float) -> bool:
        """``entitled`` where the order diverges above ``tenant``: at ``x``, its group that is
        a sibling of ``y`` on the head's path. A backlogged ``x`` lost to ``y`` already; an idle
        one is lifted to ``y``'s counter less its credit (see :meth:`_admit`), and then
        its subtree holds nothing but the tenant's next request."""
        parents: dict[int, _Group | None] = {
            id(self._up[g.name]): g for g in self._anc.get(head, ())
        }
        parents[id(self._up[head])] = None  # the head itself, under its parent
        credit = self.credit(tenant, now)
        y = parents.get(id(self._up[tenant]), False)
        if isinstance(y, _Group):  # the tenant is a sibling of the head's group
            return max(self._counters[tenant], y.counter - credit) < y.counter
        for x in self._anc.get(tenant, ()):
            key = id(self._up[x.name])
            if key in parents:
                y = parents[key]
                if x.queued or x.name in self._paused or credit <= 0:
                    return False
                head_counter = y.counter if y is not None else self._counters[head]
                return max(x.counter, head_counter - x.committed / x.weight) < head_counter
        return False

    def hold(self, job: Job) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            cost = self.prices.cost(job.prompt_tokens, job.expected_output)
            q.held[job.seq] = cost
            self._commit(q, cost)

    def unhold(self, job: Job) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            self._commit(q, -q.held.pop(job.seq, 0.0))

    def peek(self, now: float) -> Job | None:
        top = self._top()
        return top.head() if top is not None else None

    def pop(self, now: float) -> Job | None:
        q = self._top()
        if q is None:
            return None
        tenant = q.tenant
        up = q.up  # _top left the tenant's entry at the top of its heap
        _, job = q.jobs.popitem(last=False)
        self._leave(q)
        self._predict(job, q)
        self._dispatched(job, now)  # raises the counter: the heap is not touched (lazy)
        cost = self.prices.cost(job.prompt_tokens, job.expected_output)
        q.running[job.seq] = cost
        self._commit(q, cost)
        if q.jobs:  # the tenant stays backlogged: re-key its entry at the top in one sift
            q.version += 1
            heapq.heapreplace(up.heap, (self._counters[tenant], q.head().seq, q.version, tenant))
        else:
            heapq.heappop(up.heap)
            up.last_left = tenant
        return job

    def prediction(self, tenant: str, max_tokens: int, model: str = "", endpoint: str = "") -> int:
        """Expected output of a request: the moving average of the last ``window`` actual
        output lengths of the tenant (on ``model`` and ``endpoint``), at most ``max_tokens``
        (``max_tokens`` with no history): :meth:`OutputPredictor.mean`."""
        return self.predictor.mean((tenant, model, endpoint), max_tokens)

    def _predict(self, job: Job, q: _Queue) -> None:
        """Set the job's expected output (the lift's credit counts it) before dispatch, and
        what of it is charged up front (:meth:`_upfront`)."""
        job.expected_output = self.predictor.mean(job_key(job), job.max_tokens)
        if self._upfront(q):
            job.predicted_output = job.expected_output

    def _upfront(self, q: _Queue | None) -> bool:
        """Is the expected output of the tenant's next request charged at dispatch? Yes if it
        resubmits (see the module docstring; not under ``lcf``, which has no lift). The
        policy decides, not the instance: a replica in cluster mode turns its local lift off
        while the shared order lifts, and still charges up front."""
        return type(self).lift and q is not None and q.follows

    def dispatch_cost(self, job: Job) -> float:
        q = self._queues.get(job.tenant)
        if not self._upfront(q):
            return self.prices.cost(job.prompt_tokens, 0)
        return self.prices.cost(
            job.prompt_tokens, self.predictor.mean(job_key(job), job.max_tokens)
        )

    def _finished(self, job: Job, now: float, ran: bool) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            self._commit(q, -q.running.pop(job.seq, 0.0))
            q.last_finish = now

    def cancel(self, job: Job, now: float) -> bool:
        if self._dirty:
            self._rebuild()
        q = self._queues.get(job.tenant)
        if q is None or q.jobs.pop(job.seq, None) is None:
            return False
        self._leave(q)
        if q.jobs:
            self._push_node(job.tenant)  # the head may have changed
        else:
            q.version += 1
            q.up.last_left = job.tenant
        return True

    def queued(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return len(q.jobs) if q is not None else 0

    def queued_jobs(self, tenant: str, n: int) -> list[Job]:
        q = self._queues.get(tenant)
        return list(itertools.islice(q.jobs.values(), n)) if q is not None else []

    def total_queued(self) -> int:
        return self._total

    def backlogged(self) -> Iterable[str]:
        return [t for t, q in self._queues.items() if q.jobs]


class LCFScheduler(VTCScheduler):
    """Least counter first: VTC without the counter lift (a returning tenant keeps its low
    counter and is served exclusively until it catches up)."""

    name = "lcf"
    lift = False


class VTCPredictScheduler(VTCScheduler):
    """VTC charging a predicted output length at dispatch; the rest as generated, refund at end.

    The prediction is the moving average of the tenant's last ``window`` actual output lengths,
    bounded by the request's ``max_tokens``; with no history it is ``max_tokens`` (the
    over-charge is refunded when the job finishes). Jobs finished with ``ran=False`` never
    produced output and do not enter the history.
    """

    name = "vtc-predict"

    def _upfront(self, q: _Queue | None) -> bool:
        return True
