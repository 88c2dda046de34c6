"""Lazy-heap VTC against a naive O(T) reference, op for op.

``RefVTC`` is the textbook algorithm written the slow, obvious way: the pick is an argmin over
the backlogged tenants by ``(counter, seq of head job)``; charges are computed with the same
formulas (and in the same order, so floats agree bit for bit). Random sequences of submit, pop,
on_output, finish (ran or not, with usage corrections), cancel (queued, running, finished) and
weight changes are applied to both; after every op the picks, counters, per-job charges, queue
counts and backlogged sets must agree exactly. Run for ``vtc``, ``lcf`` and ``vtc-predict``.
The reference includes the busy-tenant rules of ``vtc`` for a tenant that resubmits (ops are
0.25 s apart and ``follow_s`` is 2 s, so arrivals soon after a finish count as resubmissions):
the lift's credit, and its requests charged their expected output at dispatch (as
``vtc-predict`` charges every request), so that the order sees a busy tenant's work when it is
committed.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.scheduler import (
    Job,
    LCFScheduler,
    Prices,
    VTCPredictScheduler,
    VTCScheduler,
)

TENANTS = ("a", "b", "c", "d", "e")
WEIGHTS = (0.5, 1.0, 2.0, 3.0)


@dataclass
class RefJob:
    tenant: str
    prompt: int
    max_tokens: int
    seq: int
    output: int = 0
    predicted: int = 0
    expected: int = 0
    dispatched_cost: float = 0.0
    charged: float = 0.0
    charged_cost: float = 0.0
    dispatched: bool = False


@dataclass
class RefVTC:
    prices: Prices
    lift: bool = True
    predict: bool = False
    window: int = 10
    weights: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    queues: dict[str, list[RefJob]] = field(default_factory=dict)
    history: dict[str, deque[int]] = field(default_factory=dict)
    last_left: str | None = None
    seq: int = 0
    follow_s: float = 2.0
    running: dict[str, list[RefJob]] = field(default_factory=dict)
    last_finish: dict[str, float] = field(default_factory=dict)
    resubmits: dict[str, float] = field(default_factory=dict)

    def credit(self, t: str) -> float:
        """Busy-tenant credit: the expected cost of its running jobs when it resubmits."""
        running = self.running.get(t, [])
        if not running or self.resubmits.get(t, 0.0) <= 0.5:
            return 0.0
        total = 0.0
        for j in running:
            total += j.dispatched_cost
        return total / self.weights.get(t, 1.0)

    def set_tenant(self, t: str, w: float = 1.0) -> None:
        self.weights[t] = float(w)
        self.counters.setdefault(t, 0.0)

    def backlogged(self) -> list[str]:
        return [t for t, q in self.queues.items() if q]

    def submit(self, t: str, prompt: int, max_tokens: int, now: float) -> RefJob:
        if t not in self.weights:
            self.set_tenant(t)
        self.seq += 1
        j = RefJob(t, prompt, max_tokens, self.seq)
        q = self.queues.setdefault(t, [])
        follows = now - self.last_finish.get(t, float("-inf")) <= self.follow_s
        self.resubmits[t] = 0.75 * self.resubmits.get(t, 0.0) + (0.25 if follows else 0)
        if not q and self.lift:
            others = [k for k in self.backlogged() if k != t]
            floor: float | None = None
            if others:
                floor = min(self.counters[k] for k in others)
            elif self.last_left is not None:
                floor = self.counters[self.last_left]
            if floor is not None:
                target = floor - self.credit(t)
                if target > self.counters[t]:
                    self.counters[t] = target
        q.append(j)
        return j

    def pick(self) -> RefJob | None:
        cands = self.backlogged()
        if not cands:
            return None
        t = min(cands, key=lambda k: (self.counters[k], self.queues[k][0].seq))
        return self.queues[t][0]

    def _charge(self, j: RefJob, cost: float) -> None:
        """Charge priced tokens at the tenant's weight now (a later reweight does not re-price)."""
        if cost:
            j.charged_cost += cost
            self._units(j, cost / self.weights.get(j.tenant, 1.0))

    def _units(self, j: RefJob, units: float) -> None:
        if units:
            j.charged += units
            self.counters[j.tenant] += units

    def pop(self) -> RefJob | None:
        j = self.pick()
        if j is None:
            return None
        q = self.queues[j.tenant]
        q.pop(0)
        if not q:
            self.last_left = j.tenant
        hist = self.history.get(j.tenant)
        j.expected = min(j.max_tokens, round(sum(hist) / len(hist))) if hist else j.max_tokens
        if self.predict or (self.lift and self.resubmits.get(j.tenant, 0.0) > 0.5):
            j.predicted = j.expected
        j.dispatched_cost = self.prices.cost(j.prompt, j.expected)
        j.dispatched = True
        self.running.setdefault(j.tenant, []).append(j)
        self._charge(j, self.prices.cost(j.prompt, j.predicted))
        return j

    def on_output(self, j: RefJob, n: int) -> None:
        if n <= 0:
            return
        before = max(j.output, j.predicted)
        j.output += n
        beyond = max(j.output, j.predicted) - before
        if beyond:
            self._charge(j, self.prices.output * beyond)

    def finish(self, j: RefJob, ran: bool, now: float) -> None:
        if not j.dispatched:
            return
        self.running[j.tenant].remove(j)
        self.last_finish[j.tenant] = now
        if ran:
            self._charge(j, self.prices.cost(j.prompt, j.output) - j.charged_cost)
        else:
            j.charged_cost = 0.0
            self._units(j, -j.charged)
        if ran:
            self.history.setdefault(j.tenant, deque(maxlen=self.window)).append(j.output)

    def cancel(self, j: RefJob) -> bool:
        q = self.queues.get(j.tenant, [])
        if j not in q:
            return False
        q.remove(j)
        if not q:
            self.last_left = j.tenant
        return True


POLICIES: dict[str, tuple[type[VTCScheduler], bool, bool]] = {  # class, lift, predict
    "vtc": (VTCScheduler, True, False),
    "lcf": (LCFScheduler, False, False),
    "vtc-predict": (VTCPredictScheduler, True, True),
}


class Pair:
    """The real scheduler and the reference, driven in lockstep, compared after each op."""

    def __init__(self, policy: str, prices: Prices) -> None:
        cls, lift, predict = POLICIES[policy]
        self.real = cls(prices)
        self.real.follow_s = 2.0  # ops are 0.25 s apart: arrivals soon after a finish follow it
        self.ref = RefVTC(prices, lift=lift, predict=predict)
        self.queued: list[tuple[Job, RefJob]] = []
        self.running: list[tuple[Job, RefJob]] = []
        self.done: list[tuple[Job, RefJob]] = []
        self.now = 0.0

    def tick(self) -> float:
        self.now += 0.25
        return self.now

    def set_weight(self, t: str, w: float) -> None:
        self.real.set_tenant(t, w)
        self.ref.set_tenant(t, w)

    def submit(self, t: str, prompt: int, max_tokens: int) -> None:
        j = Job(tenant=t, prompt_tokens=prompt, max_tokens=max_tokens, arrival=self.tick())
        self.real.submit(j, self.now)
        r = self.ref.submit(t, prompt, max_tokens, self.now)
        assert j.seq == r.seq
        self.queued.append((j, r))

    def pop(self) -> None:
        want = self.ref.pick()
        got_peek = self.real.peek(self.tick())
        cost = self.real.dispatch_cost(got_peek) if got_peek is not None else None
        got = self.real.pop(self.now)
        r = self.ref.pop()
        assert r is want
        if r is None:
            assert got is None and got_peek is None
            return
        assert got is not None and got is got_peek
        assert (got.tenant, got.seq) == (r.tenant, r.seq), "picks diverge"
        pair = next(p for p in self.queued if p[0] is got)
        self.queued.remove(pair)
        self.running.append(pair)
        assert got.predicted_output == r.predicted
        assert got.charged_cost == cost  # dispatch_cost said what pop charges

    def output(self, i: int, n: int) -> None:
        if not self.running:
            return
        j, r = self.running[i % len(self.running)]
        self.real.on_output(j, n, self.tick())
        self.ref.on_output(r, n)

    def finish(self, i: int, ran: bool, prompt_delta: int) -> None:
        if not self.running:
            return
        pair = self.running.pop(i % len(self.running))
        j, r = pair
        if ran:  # the backend's usage may correct the prompt estimate
            j.prompt_tokens = r.prompt = max(0, j.prompt_tokens + prompt_delta)
        self.real.finish(j, self.tick(), ran=ran)
        self.ref.finish(r, ran, self.now)
        self.done.append(pair)

    def cancel(self, i: int, which: str) -> None:
        pool = {"queued": self.queued, "running": self.running, "done": self.done}[which]
        if not pool:
            return
        pair = pool[i % len(pool)]
        j, r = pair
        ok = self.real.cancel(j, self.tick())
        assert ok == self.ref.cancel(r) == (which == "queued")
        if ok:
            self.queued.remove(pair)

    def check(self) -> None:
        real, ref = self.real, self.ref
        for t in set(ref.counters) | set(real.tenants()):
            assert real.counter(t) == ref.counters.get(t, 0.0), t
            assert real.weight(t) == ref.weights.get(t, 1.0), t
            assert real.queued(t) == len(ref.queues.get(t, [])), t
        assert sorted(real.backlogged()) == sorted(ref.backlogged())
        assert real.total_queued() == len(self.queued)
        for j, r in self.queued + self.running + self.done:
            assert j.charged == r.charged
        want = ref.pick()
        got = real.peek(self.now)
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert got.seq == want.seq


def run_random(policy: str, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    prices = Prices(input=rng.choice([1.0, 0.5, 3.0]), output=rng.choice([2.0, 1.0, 5.0]))
    pair = Pair(policy, prices)
    tenants = TENANTS[: rng.randint(2, len(TENANTS))]
    for _ in range(steps):
        op = rng.random()
        if op < 0.30:
            pair.submit(rng.choice(tenants), rng.randint(0, 60), rng.randint(0, 40))
        elif op < 0.50:
            pair.pop()
        elif op < 0.72:
            pair.output(rng.randrange(1 << 16), rng.randint(0, 6))
        elif op < 0.84:
            pair.finish(rng.randrange(1 << 16), rng.random() < 0.8, rng.randint(-5, 5))
        elif op < 0.95:
            which = rng.choices(["queued", "running", "done"], weights=[6, 1, 1])[0]
            pair.cancel(rng.randrange(1 << 16), which)
        else:
            pair.set_weight(rng.choice(tenants), rng.choice(WEIGHTS))
        pair.check()


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(15))
def test_random_op_sequences_match_reference(policy: str, seed: int) -> None:
    run_random(policy, seed, steps=400)


def test_reference_detects_a_wrong_pick() -> None:
    """The harness has teeth: a scheduler that breaks ties the wrong way is caught."""

    class NewestHeadFirst(VTCScheduler):
        def _push_node(self, name: str) -> None:
            super()._push_node(name)
            q = self._queues[name]  # a fresh entry keyed by the newest job first
            q.version += 1
            heapq.heappush(q.up.heap, (self._counters[name], -q.head().seq, q.version, name))

    POLICIES["broken"] = (NewestHeadFirst, True, False)
    try:
        with pytest.raises(AssertionError):
            for seed in range(10):
                run_random("broken", seed, steps=200)
    finally:
        del POLICIES["broken"]


# -- the same comparison as a hypothesis state machine (shrinks failures to a short script) -----


class VTCMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair: Pair | None = None

    @precondition(lambda self: self.pair is None)
    @rule(
        policy=st.sampled_from(sorted(POLICIES)),
        w_in=st.sampled_from([0.5, 1.0, 3.0]),
        w_out=st.sampled_from([1.0, 2.0, 5.0]),
    )
    def start(self, policy: str, w_in: float, w_out: float) -> None:
        self.pair = Pair(policy, Prices(input=w_in, output=w_out))

    @precondition(lambda self: self.pair is not None)
    @rule(t=st.sampled_from(TENANTS[:3]), prompt=st.integers(0, 50), mx=st.integers(0, 30))
    def submit(self, t: str, prompt: int, mx: int) -> None:
        assert self.pair is not None
        self.pair.submit(t, prompt, mx)

    @precondition(lambda self: self.pair is not None)
    @rule()
    def pop(self) -> None:
        assert self.pair is not None
        self.pair.pop()

    @precondition(lambda self: self.pair is not None)
    @rule(i=st.integers(0, 20), n=st.integers(0, 8))
    def output(self, i: int, n: int) -> None:
        assert self.pair is not None
        self.pair.output(i, n)

    @precondition(lambda self: self.pair is not None)
    @rule(i=st.integers(0, 20), ran=st.booleans(), delta=st.integers(-5, 5))
    def finish(self, i: int, ran: bool, delta: int) -> None:
        assert self.pair is not None
        self.pair.finish(i, ran, delta)

    @precondition(lambda self: self.pair is not None)
    @rule(i=st.integers(0, 20), which=st.sampled_from(["queued", "queued", "running", "done"]))
    def cancel(self, i: int, which: str) -> None:
        assert self.pair is not None
        self.pair.cancel(i, which)

    @precondition(lambda self: self.pair is not None)
    @rule(t=st.sampled_from(TENANTS[:3]), w=st.sampled_from(WEIGHTS))
    def weight(self, t: str, w: float) -> None:
        assert self.pair is not None
        self.pair.set_weight(t, w)

    @invariant()
    def agree(self) -> None:
        if self.pair is not None:
            self.pair.check()


TestVTCMachine = VTCMachine.TestCase
TestVTCMachine.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
