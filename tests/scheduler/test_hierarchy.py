"""Hierarchical VTC: groups of tenants, counters at every level.

``RefTree`` is the textbook algorithm written the slow, obvious way: the pick walks down from
the root and at each level scans the backlogged children for the least ``(counter, tie)``
(``tie``: a tenant's head job, a group's arrival that made it backlogged); a charge of ``cost``
adds ``cost / w`` to the tenant and each group above it; an arrival to an idle node lifts it
to its backlogged siblings' least counter, else to the counter of the sibling that last left.
The shipped :class:`VTCScheduler` must take exactly its decisions, idle periods included.

The per-level bound (derived from the flat one, see ``gateway/scheduler/vtc.py``): each level
is flat VTC among siblings, with the parent's share as their capacity. A sibling ``a`` is
served only while its counter is the least of its backlogged siblings'; afterwards it grows by
at most what its subtree's running jobs still cost, which fits in the batch: ``U = max(w_in *
L_input, w_out * M)`` priced tokens, ``U / w_a`` counter units. So two siblings backlogged
throughout satisfy ``|c_a - c_b| <= U / min(w_a, w_b)`` at all times and, over every window,

    | S_a / w_a  -  S_b / w_b |  <=  2 * U / min(w_a, w_b)

with ``S`` the service of a node's whole subtree (the flat ``2U`` at weights 1), at every
level, whatever the shape below the two siblings.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.scheduler import Job, Prices, VTCScheduler, make_scheduler

from .batchsim import BatchLoop, make_job
from .test_caps import Harness, job
from .test_fairness import backlogged_loop

# -- trees ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """``parents``: node -> its parent (None at the top); ``weights`` of every node."""

    parents: dict[str, str | None]
    weights: dict[str, float]

    @property
    def groups(self) -> list[str]:
        return [n for n in self.parents if n in set(self.parents.values())]

    @property
    def leaves(self) -> list[str]:
        inner = set(self.parents.values())
        return [n for n in self.parents if n not in inner]

    def children(self, node: str | None) -> list[str]:
        return [n for n, p in self.parents.items() if p == node]

    def path(self, node: str) -> list[str]:
        """``node`` and its groups, nearest first."""
        out = [node]
        while (up := self.parents[out[-1]]) is not None:
            out.append(up)
        return out

    def install(self, sched: VTCScheduler) -> None:
        for g in self.groups:  # parents come first in ``parents``
            sched.set_group(g, self.weights[g], self.parents[g])
        for t in self.leaves:
            sched.set_tenant(t, self.weights[t], parent=self.parents[t])


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    """2-3 top-level nodes; a node is a tenant or a group of 1-3 children, depth <= 3."""
    parents: dict[str, str | None] = {}
    weights: dict[str, float] = {}
    names = (f"n{i}" for i in itertools.count())

    def node(parent: str | None, depth: int) -> None:
        name = next(names)
        parents[name] = parent
        weights[name] = draw(st.sampled_from([1.0, 1.0, 2.0, 3.0]))
        if depth < 3 and draw(st.booleans()):
            for _ in range(draw(st.integers(1, 3))):
                node(name, depth + 1)

    for _ in range(draw(st.integers(2, 3))):
        node(None, 1)
    return Tree(parents, weights)


ORGS = Tree(  # org A (weight 3: teams a1, a2 at 1:1) and org B (weight 1: one team b)
    {"A": None, "a1": "A", "a2": "A", "B": None, "b": "B"},
    {"A": 3.0, "a1": 1.0, "a2": 1.0, "B": 1.0, "b": 1.0},
)


# -- the reference -------------------------------------------------------------------------------


@dataclass
class RefTree:
    tree: Tree
    prices: Prices
    counters: dict[str, float] = field(default_factory=dict)
    queues: dict[str, list[Job]] = field(default_factory=dict)
    since: dict[str, int] = field(default_factory=dict)
    last_left: dict[str | None, str] = field(default_factory=dict)
    seq: int = 0

    def backlogged(self, node: str) -> bool:
        if node in self.tree.leaves:
            return bool(self.queues.get(node))
        return any(self.backlogged(c) for c in self.tree.children(node))

    def key(self, node: str) -> tuple[float, int]:
        tie = self.queues[node][0].seq if node in self.tree.leaves else self.since[node]
        return (self.counters.get(node, 0.0), tie)

    def peek(self, now: float) -> Job | None:
        node: str | None = None
        while True:
            kids = [c for c in self.tree.children(node) if self.backlogged(c)]
            if not kids:
                return None
            node = min(kids, key=self.key)
            if node in self.tree.leaves:
                return self.queues[node][0]

    def submit(self, job: Job, now: float) -> None:
        self.seq += 1
        job.seq = self.seq
        for x in self.tree.path(job.tenant):
            if self.backlogged(x):
                break
            parent = self.tree.parents[x]
            floors = [
                self.counters.get(s, 0.0)
                for s in self.tree.children(parent)
                if s != x and self.backlogged(s)
            ]
            if not floors and parent in self.last_left:
                floors = [self.counters.get(self.last_left[parent], 0.0)]
            if floors:
                self.counters[x] = max(self.counters.get(x, 0.0), min(floors))
            self.since[x] = job.seq
        self.queues.setdefault(job.tenant, []).append(job)

    def charge(self, tenant: str, cost: float) -> None:
        units = cost / self.tree.weights[tenant]
        self.counters[tenant] = self.counters.get(tenant, 0.0) + units
        for g in self.tree.path(tenant)[1:]:  # the same float operations as the shipped class
            self.counters[g] = (
                self.counters.get(g, 0.0)
                + units * self.tree.weights[tenant] / (self.tree.weights[g])
            )

    def pop(self, now: float) -> Job | None:
        job = self.peek(now)
        if job is None:
            return None
        self.queues[job.tenant].pop(0)
        job.dispatched_at = now
        self.charge(job.tenant, self.prices.input * job.prompt_tokens)
        for x in self.tree.path(job.tenant):
            if not self.backlogged(x):
                self.last_left[self.tree.parents[x]] = x
        return job

    def on_output(self, job: Job, n: int, now: float) -> None:
        job.output_tokens += n
        self.charge(job.tenant, self.prices.output * n)

    def finish(self, job: Job, now: float) -> None:
        pass  # output equals max_tokens here: nothing to reconcile

    def queued(self, tenant: str) -> int:
        return len(self.queues.get(tenant, []))


# -- driving both --------------------------------------------------------------------------------


def run_open_loop(sched: object, tree: Tree, seed: int, ticks: int, max_seqs: int) -> list[str]:
    """Random arrivals with idle spells (every node goes idle and comes back, so the lift acts
    at every level); returns the dispatch order as ``tenant#seq``."""
    rng = random.Random(seed)
    rates = {t: rng.choice([0.0, 0.1, 0.3, 0.8]) for t in tree.leaves}
    order: list[str] = []
    running: list[Job] = []
    for now in range(ticks):
        if now % 40 == 0:  # phases: tenants change their rate (some go idle, some return)
            rates = {t: rng.choice([0.0, 0.1, 0.3, 0.8]) for t in tree.leaves}
        for t in tree.leaves:
            if rng.random() < rates[t]:
                sched.submit(make_job(t, rng.randint(1, 30), rng.randint(1, 20), now), now)  # type: ignore[attr-defined]
        while len(running) < max_seqs and (job := sched.pop(now)) is not None:  # type: ignore[attr-defined]
            running.append(job)
            order.append(f"{job.tenant}#{job.seq}")
        still = []
        for job in running:
            sched.on_output(job, 1, now)  # type: ignore[attr-defined]
            if job.output_tokens >= job.payload:
                sched.finish(job, now)  # type: ignore[attr-defined]
            else:
                still.append(job)
        running = still
    return order


def shipped(tree: Tree, prices: Prices) -> VTCScheduler:
    sched = VTCScheduler(prices)
    sched.follow_s = -1.0  # no busy-tenant credit: the reference has none
    tree.install(sched)
    return sched


@settings(max_examples=60, deadline=None, derandomize=True)
@given(tree=trees(), seed=st.integers(0, 10_000), max_seqs=st.integers(1, 5))
def test_decisions_match_the_reference(tree: Tree, seed: int, max_seqs: int) -> None:
    prices = Prices(input=1.0, output=2.0)
    real = shipped(tree, prices)
    ref = RefTree(tree, prices)
    got = run_open_loop(real, tree, seed, 240, max_seqs)
    want = run_open_loop(ref, tree, seed, 240, max_seqs)
    assert got == want
    for node in tree.parents:
        counter = real.group_counter(node) if node in tree.groups else real.counter(node)
        assert counter == ref.counters.get(node, 0.0), node


def test_reference_detects_a_wrong_lift() -> None:
    """Control: the same comparison fails against a scheduler that skips the group lift."""
    prices = Prices(input=1.0, output=2.0)

    class NoGroupLift(VTCScheduler):
        def _level_floor(self, up):  # type: ignore[no-untyped-def]
            return (
                None
                if up.name in ("A", "B") or up.name.startswith("<")
                else super()._level_floor(up)
            )

    diverged = 0
    for seed in range(5):
        real = NoGroupLift(prices)
        real.follow_s = -1.0
        ORGS.install(real)
        got = run_open_loop(real, ORGS, seed, 240, 2)
        diverged += got != run_open_loop(RefTree(ORGS, prices), ORGS, seed, 240, 2)
    assert diverged


# -- the per-level bound -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    tree: Tree
    prices: Prices
    shapes: dict[str, list[tuple[int, int]]]
    kv: int
    max_seqs: int | None

    @property
    def u(self) -> float:
        l_input = max(p for s in self.shapes.values() for p, _ in s)
        return max(self.prices.input * l_input, self.prices.output * self.kv)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tree = draw(trees())
    w_in = draw(st.sampled_from([0.5, 1.0, 2.0]))
    w_out = draw(st.sampled_from([1.0, 2.0, 4.0]).filter(lambda x: x >= w_in))
    shape = st.tuples(st.integers(1, 40), st.integers(1, 40))
    shapes = {t: draw(st.lists(shape, min_size=1, max_size=4)) for t in tree.leaves}
    biggest = max(p + o for s in shapes.values() for p, o in s)
    kv = draw(st.integers(biggest, 3 * biggest))
    max_seqs = draw(st.none() | st.integers(1, 6))
    return Scenario(tree, Prices(input=w_in, output=w_out), shapes, kv, max_seqs)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(sc=scenarios())
def test_siblings_service_gap_is_bounded_at_every_level(sc: Scenario) -> None:
    """Every tenant stays backlogged; at every tick and for every pair of siblings (at any
    level): the counter lemma ``|c_a - c_b| <= U / min w`` and the window bound on their
    subtrees' services ``<= 2U / min w`` (module docstring)."""
    tree = sc.tree
    sched = make_scheduler("vtc", sc.prices)
    assert isinstance(sched, VTCScheduler)
    tree.install(sched)
    loop = backlogged_loop(sched, sc.shapes, max_seqs=sc.max_seqs, kv_tokens=sc.kv)
    pairs = [
        (a, b)
        for parent in [None, *tree.groups]
        for a, b in itertools.combinations(tree.children(parent), 2)
    ]

    def counter(n: str) -> float:
        return sched.group_counter(n) if n in tree.groups else sched.counter(n)

    def service(n: str) -> float:
        return sum(loop.service.get(t, 0.0) for t in tree.leaves if n in tree.path(t))

    lo: dict[tuple[str, str], float] = {}
    hi: dict[tuple[str, str], float] = {}
    for _ in range(200):
        loop.tick()
        assert all(sched.queued(t) > 0 for t in tree.leaves)  # the premise
        for a, b in pairs:
            wa, wb = tree.weights[a], tree.weights[b]
            bound = sc.u / min(wa, wb)
            gap = counter(a) - counter(b)
            assert abs(gap) <= bound + 1e-9, ("counter lemma", a, b, gap, bound)
            d = service(a) / wa - service(b) / wb
            lo[a, b] = min(lo.get((a, b), 0.0), d)
            hi[a, b] = max(hi.get((a, b), 0.0), d)
            assert hi[a, b] - lo[a, b] <= 2 * bound + 1e-9, ("window bound", a, b)
    for n in tree.parents:  # no lift while all stay backlogged: service is counter growth
        assert service(n) / tree.weights[n] == pytest.approx(counter(n))


# -- shares ----------------------------------------------------------------------------------------


def shares(sched: VTCScheduler, tenants: list[str], ticks: int) -> dict[str, float]:
    loop = backlogged_loop(sched, {t: [(16, 32)] for t in tenants}, max_seqs=8)
    for _ in range(ticks):
        loop.tick()
    total = sum(loop.service.values())
    return {t: loop.service[t] / total for t in tenants}


def test_orgs_share_3_8_3_8_2_8_then_a1_takes_a2s_part() -> None:
    sched = shipped(ORGS, Prices())
    got = shares(sched, ["a1", "a2", "b"], 3000)
    assert got == pytest.approx({"a1": 3 / 8, "a2": 3 / 8, "b": 2 / 8}, abs=0.01)
    # a2 idle (never submits): work conserving inside A, A's share unchanged
    got = shares(shipped(ORGS, Prices()), ["a1", "b"], 3000)
    assert got == pytest.approx({"a1": 3 / 4, "b": 1 / 4}, abs=0.01)


def test_a_returning_team_is_lifted_within_its_org_only() -> None:
    """a2 idles while a1 and b run, then returns: it is lifted to a1 (its sibling), not left
    with its old low counter (which would starve a1), and A is not reset against B."""
    sched = shipped(ORGS, Prices())
    for t in ("a1", "a2", "b"):
        sched.submit(make_job(t, 10, 10), 0)
    loop = BatchLoop(sched, max_seqs=2)
    for _ in range(25):
        loop.tick()  # everyone ran one job
    assert sched.queued("a2") == 0
    for _ in range(40):
        sched.submit(make_job("a1", 10, 10), 0)
        sched.submit(make_job("b", 10, 10), 0)
    for _ in range(200):
        loop.tick()
    before = sched.counter("a2")
    assert sched.counter("a1") > before + 50  # a2 fell behind while idle
    a_before = sched.group_counter("A")
    sched.submit(make_job("a2", 10, 10), loop.now)
    assert sched.counter("a2") == sched.counter("a1")  # lifted to its backlogged sibling
    assert sched.group_counter("A") == a_before  # A was backlogged: not lifted


def test_flat_tenants_wrapped_in_one_group_take_the_flat_decisions() -> None:
    """Differential: a tree whose only group holds every tenant decides exactly as the flat
    scheduler (same lift floors, same ties, same charges), idle spells included."""
    flat = Tree({"a": None, "b": None, "c": None}, {"a": 1.0, "b": 2.0, "c": 3.0})
    wrapped = Tree(
        {"all": None, "a": "all", "b": "all", "c": "all"},
        {"all": 5.0, "a": 1.0, "b": 2.0, "c": 3.0},
    )
    for seed in range(8):
        one, two = shipped(flat, Prices()), shipped(wrapped, Prices())
        assert run_open_loop(one, flat, seed, 300, 3) == run_open_loop(two, wrapped, seed, 300, 3)
        for t in "abc":
            assert one.counter(t) == two.counter(t)


# tenant -> (weight, tier); the wrapped config puts each tier's tenants under one group
SCRIPT_TENANTS = {"a": (1.0, 0), "b": (2.0, 0), "c": (3.0, 0), "d": (1.0, -1), "e": (2.0, -1)}


def scripted_run(sched: VTCScheduler, seed: int, steps: int = 500) -> list[object]:
    """A seeded random event script through every decision of the order: arrivals (idle
    spells, resubmissions within ``follow_s``), picks, output, finishes (ran or not, with
    the backend's count), cancels, pauses, holds and ``entitled``, refunds by
    ``set_counter``; returns what was decided and every tenant's counter after each step."""
    rng = random.Random(seed)
    tenants = list(SCRIPT_TENANTS)
    queued: list[Job] = []
    running: list[Job] = []
    held: list[Job] = []
    log: list[object] = []
    now = 0.0
    for _ in range(steps):
        now += rng.choice((0.005, 0.01, 0.05, 0.5))
        op = rng.random()
        t = rng.choice(tenants)
        if op < 0.34:
            j = make_job(t, rng.randint(1, 40), rng.randint(1, 30), now)
            sched.submit(j, now)
            queued.append(j)
        elif op < 0.50:
            peek = sched.peek(now)
            cost = sched.dispatch_cost(peek) if peek is not None else None
            j = sched.pop(now)
            assert j is peek
            if j is not None:
                queued.remove(j)
                running.append(j)
                log.append(("pop", j.tenant, j.seq, cost, j.charged))
            else:
                log.append(("pop", None))
        elif op < 0.62 and running:
            sched.on_output(running[rng.randrange(len(running))], rng.randint(1, 8), now)
        elif op < 0.74 and running:
            j = running.pop(rng.randrange(len(running)))
            ran = rng.random() < 0.9
            sched.finish(j, now, ran=ran, output_tokens=rng.randint(0, 30) if ran else None)
            if sched.resubmits(j.tenant) and rng.random() < 0.7:
                log.append(("entitled", j.tenant, sched.entitled(j.tenant, now)))
                sched.hold(j)
                held.append(j)
        elif op < 0.80 and held:
            sched.unhold(held.pop(rng.randrange(len(held))))
        elif op < 0.86 and queued:
            j = queued.pop(rng.randrange(len(queued)))
            assert sched.cancel(j, now)
        elif op < 0.92:
            (sched.resume if sched.paused(t) else sched.pause)(t)
        elif op < 0.96:
            log.append(("entitled", t, sched.entitled(t, now)))
        else:
            sched.set_counter(t, sched.counter(t) + rng.choice((-20.0, -1.0, 5.0)))
        log.append(tuple(sched.counter(x) for x in tenants))
    log.append(sorted(sched.lift_stats().items()))
    return log


@pytest.mark.parametrize("policy", ["vtc", "lcf", "vtc-predict"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("min_share", [0.0, 0.25])
def test_a_flat_config_and_one_group_per_tier_decide_identically(
    policy: str, seed: int, min_share: float
) -> None:
    """Differential: flat tenants (one-level trees, one per tier) and the same tenants under
    one explicit group per tier take the same decisions on a seeded script, busy-tenant
    credit, holds, pauses and a tier's minimum share included."""
    flat, wrapped = make_scheduler(policy), make_scheduler(policy)
    assert isinstance(flat, VTCScheduler) and isinstance(wrapped, VTCScheduler)
    wrapped.set_group("hi", 3.0, tier=0)
    wrapped.set_group("lo", 0.5, tier=-1)
    for t, (weight, tier) in SCRIPT_TENANTS.items():
        flat.set_tenant(t, weight, tier=tier)
        wrapped.set_tenant(t, weight, tier=tier, parent="hi" if tier == 0 else "lo")
    for sched in (flat, wrapped):
        sched.set_min_share(-1, min_share)
    assert scripted_run(flat, seed) == scripted_run(wrapped, seed)


def test_paused_team_passes_its_turn_to_its_sibling_then_to_other_orgs() -> None:
    sched = shipped(ORGS, Prices())
    for _ in range(3):
        for t in ("a1", "a2", "b"):
            sched.submit(make_job(t, 10, 10), 0)
    sched.pause("a1")
    assert {sched.pop(0).tenant for _ in range(3)} == {"a2", "b"}  # type: ignore[union-attr]
    sched.pause("a2")  # all of A paused: the order passes over A to B
    assert sched.pop(0).tenant == "b"  # type: ignore[union-attr]
    sched.pause("b")
    assert sched.pop(0) is None
    sched.resume("a1")  # A comes back into the root's order with a1
    assert sched.pop(0).tenant == "a1"  # type: ignore[union-attr]
    sched.pause("A")  # a group pause (its max_in_flight) hides its whole subtree
    sched.resume("a2")
    assert sched.peek(0) is None
    sched.resume("A")
    assert sched.peek(0) is not None and sched.peek(0).tenant in ("a1", "a2")  # type: ignore[union-attr]


def test_refund_lowers_the_group_counter_and_reorders() -> None:
    sched = shipped(ORGS, Prices())
    for t in ("a1", "b"):
        sched.submit(make_job(t, 100, 10), 0)
        sched.submit(make_job(t, 100, 10), 0)
    first = sched.pop(0)
    assert first is not None and first.tenant == "a1"
    assert sched.group_counter("A") == pytest.approx(100 / 3)
    assert sched.pop(0).tenant == "b"  # type: ignore[union-attr]
    sched.finish(first, 0, ran=False)  # never ran: refunded along its path
    assert sched.group_counter("A") == 0
    assert sched.peek(0).tenant == "a1"  # type: ignore[union-attr]


def test_reparenting_keeps_queued_jobs_and_counters() -> None:
    sched = shipped(ORGS, Prices())
    for t in ("a1", "a2", "b"):
        for _ in range(4):
            sched.submit(make_job(t, 10, 10), 0)
    for _ in range(3):
        sched.pop(0)
    counters = {t: sched.counter(t) for t in ("a1", "a2", "b")}
    sched.set_tenant("a2", 1.0, parent="B")  # a2 moves to org B
    sched.set_group("C", 1.0)
    sched.set_tenant("b", 1.0, parent="C")  # b moves to a new org
    assert {t: sched.counter(t) for t in counters} == counters
    assert sum(sched.queued(t) for t in counters) == 9
    assert sched.queued_under("B") == sched.queued("a2")
    popped = [sched.pop(0) for _ in range(9)]
    assert all(j is not None for j in popped)
    assert sched.total_queued() == 0
    with pytest.raises(ValueError, match="not a tree"):
        sched.set_group("A", 1.0, parent="A")


# -- the dispatch core: caps per group -----------------------------------------------------------


def _org_core(seqs: int, cap_a: int | None) -> Harness:
    h = Harness(seqs=seqs, models=frozenset({"m", "n"}))
    h.core.set_group("A", 3.0, max_in_flight=cap_a)
    h.core.set_group("B", 1.0)
    h.core.set_tenant("a1", 1.0, parent="A")
    h.core.set_tenant("a2", 1.0, parent="A")
    h.core.set_tenant("b", 1.0, parent="B")
    return h


def test_a_group_cap_counts_its_whole_subtree_in_every_pool() -> None:
    h = _org_core(seqs=6, cap_a=2)
    h.submit(*(job(t, m) for t in ("a1", "a2") for m in ("m", "n") for _ in range(2)))
    h.submit(*(job("b", "m") for _ in range(6)))
    assert h.running("a1") + h.running("a2") == 2  # A at its cap: b gets the other 4 slots
    assert h.running("b") == 4
    assert h.core.group_running == {"A": 2, "B": 4}
    assert h.core.queued_under("A") == 6
    h.release("b")  # a freed slot goes to b: A is still at its cap
    assert h.running("b") == 4 and h.core.group_running["A"] == 2
    h.release("a1" if h.running("a1") else "a2")  # A below its cap: resumed, takes the slot
    assert h.core.group_running["A"] == 2 and h.core.queued_under("A") == 5
    while h.granted:
        h.release(h.granted[0][0].tenant)
    assert h.core.total_queued() == 0
    assert h.core.group_running == {"A": 0, "B": 0}
    assert h.admission.in_flight() == 0 and h.backend.booked_tokens == 0


def test_core_shares_slots_by_the_tree() -> None:
    """Equal jobs, all teams flooding: dispatches follow 3/8, 3/8, 2/8 (within one job)."""
    h = _org_core(seqs=1, cap_a=None)
    for t in ("a1", "a2", "b"):
        h.submit(*(job(t) for _ in range(20)))
    order = []
    for _ in range(40):
        j = h.release(h.granted[0][0].tenant)
        order.append(j.tenant)
    for t, want in (("a1", 15), ("a2", 15), ("b", 10)):
        assert abs(order.count(t) - want) <= 1, order


def test_moving_a_running_tenant_keeps_group_counts_right() -> None:
    h = _org_core(seqs=2, cap_a=1)
    h.submit(job("a1"), job("a1"))
    assert h.core.group_running["A"] == 1
    h.core.set_tenant("a1", 1.0, parent="B")  # reload: a1 moves to B while one request runs
    h.core.pump("m")
    assert h.running("a1") == 2  # A's cap no longer covers it
    while h.granted:
        h.release(h.granted[0][0].tenant)
    assert h.core.group_running == {"A": 0, "B": 0}  # each release counted where it started


def test_a_group_with_only_paused_tenants_is_no_lift_floor() -> None:
    """As a paused tenant in a flat order: an organisation that cannot run now does not lift
    a returning one to its counter."""
    sched = shipped(ORGS, Prices())
    for _ in range(5):
        sched.submit(make_job("a1", 100, 10), 0)
    for _ in range(3):
        sched.pop(0)
    assert sched.group_counter("A") == 100
    sched.pause("a1")
    sched.submit(make_job("b", 10, 10), 0)
    assert sched.group_counter("B") == 0
    sched.resume("a1")
    sched.pause("b")
    sched.submit(make_job("a2", 10, 10), 0)  # a1 runs again: a2 is lifted to it
    assert sched.counter("a2") == sched.counter("a1")


def test_a_slot_is_held_for_a_busy_tenant_ahead_at_the_level_where_paths_diverge() -> None:
    sched = shipped(ORGS, Prices())
    done = make_job("a1", 10, 10)
    sched.submit(done, 0)
    sched.pop(0)
    sched.finish(done, 0)
    assert not sched.entitled("a1", 0)  # nobody waits: nothing to hold against
    sched.submit(make_job("b", 10, 10), 0)
    sched.set_counter("b", 1000.0)  # org B far ahead of org A
    assert not sched.entitled("a1", 0)  # not busy: no credit, no hold
    sched.hold(done)  # a1's next request is expected: A keeps what a1 has committed
    assert sched.entitled("a1", 0)  # A (idle) would be lifted below B: a1 goes first
    sched.set_counter("a1", 5000.0)  # A's counter passes B's
    assert not sched.entitled("a1", 0)
    sched.unhold(done)
