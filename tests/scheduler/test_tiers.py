"""Priority tiers: a lower tier is served only while no higher-tier job waits; fair (by the
policy's own rule) within a tier. Plain synchronous tests (time is a number)."""

from __future__ import annotations

import pytest

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import DispatchCore, Grant
from gateway.scheduler import POLICIES, TIERS, Job, Scheduler, VTCScheduler, make_scheduler

BATCH = TIERS["batch"]


def job(tenant: str, prompt: int = 10, mx: int = 10) -> Job:
    return Job(tenant, prompt, mx, 0.0, "m")


def pops(s: Scheduler, n: int) -> list[str]:
    out = []
    for _ in range(n):
        j = s.pop(0.0)
        assert j is not None
        out.append(j.tenant)
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_waits_while_any_interactive_job_waits(policy: str) -> None:
    s = make_scheduler(policy, rpm_limit=100)
    s.set_tenant("c", 1.0, tier=BATCH)
    for _ in range(3):
        s.submit(job("c"), 0.0)  # batch arrives first: in a flat order it would go first
    for _ in range(2):
        s.submit(job("a"), 0.0)
        s.submit(job("b"), 0.0)
    first = pops(s, 4)
    assert sorted(first) == ["a", "a", "b", "b"]
    if policy != "fcfs" and policy != "rpm":
        assert first == ["a", "b", "a", "b"]  # fair within the tier
    s.submit(job("a"), 0.0)  # a newcomer of the higher tier jumps ahead of waiting batch
    assert pops(s, 4) == ["a", "c", "c", "c"]
    assert s.pop(0.0) is None


def test_the_lift_is_taken_within_the_tier() -> None:
    s = make_scheduler("vtc")
    s.set_tenant("c", 1.0, tier=BATCH)
    s.set_tenant("d", 1.0, tier=BATCH)
    s.submit(job("a"), 0.0)
    s.set_counter("a", 1000.0)  # interactive a is backlogged, far ahead
    s.submit(job("c"), 0.0)  # no batch tenant is backlogged or has left: no lift
    assert s.counter("c") == 0.0
    s.set_counter("c", 50.0)
    s.submit(job("d"), 0.0)  # lifted to the batch floor (c's 50), not to a's 1000
    assert s.counter("d") == 50.0
    assert pops(s, 3) == ["a", "c", "d"]


def test_a_tier_change_moves_queued_jobs() -> None:
    s = make_scheduler("vtc")
    for t in ("a", "b"):
        for _ in range(2):
            s.submit(job(t), 0.0)
    s.set_tenant("a", 1.0, tier=BATCH)
    assert pops(s, 2) == ["b", "b"]
    s.submit(job("b"), 0.0)
    s.set_tenant("a", 1.0, tier=TIERS["interactive"])  # back: a's counter 0 < b's 40
    assert pops(s, 3) == ["a", "a", "b"]


def test_entitled_follows_the_tiers() -> None:
    s = make_scheduler("vtc")
    s.set_tenant("c", 1.0, tier=BATCH)
    done = job("c")
    s.submit(done, 0.0)
    s.pop(0.0)
    s.finish(done, 0.0)
    s.submit(job("a"), 0.0)  # interactive a waits: a batch tenant never precedes it
    assert not s.entitled("c", 0.0)
    s.set_tenant("c", 1.0, tier=1)  # a tier above interactive precedes whatever counters say
    s.set_counter("c", 1e6)
    assert s.entitled("c", 0.0)


def test_core_gives_batch_the_whole_backend_when_interactive_is_idle() -> None:
    backend = BackendSlots("b0", frozenset({"m"}), 2, 1_000_000)
    admission = AdmissionController([backend])
    granted: list[tuple[Job, Grant]] = []
    order: list[str] = []

    def on_grant(j: Job, g: Grant) -> None:
        granted.append((j, g))
        order.append(j.tenant)

    core = DispatchCore(admission, on_grant)
    core.set_tenant("a", 1.0)
    core.set_tenant("c", 1.0, tier=BATCH)
    for _ in range(4):
        core.submit(job("c"))
    core.pump("m")
    assert order == ["c", "c"]  # interactive is idle: batch takes the whole backend
    for _ in range(3):
        core.submit(job("a"))
        core.pump("m")
    while granted:
        j, g = granted.pop(0)
        core.release(j, g)
    assert order == ["c", "c", "a", "a", "a", "c", "c"]  # freed slots: interactive first
    assert core.total_queued() == 0 and admission.in_flight() == 0


def test_a_minimum_share_bounds_the_priority() -> None:
    s = make_scheduler("vtc")
    assert isinstance(s, VTCScheduler)
    s.set_min_share(BATCH, 0.25)
    s.set_tenant("c", 1.0, tier=BATCH)
    waiting = []
    for _ in range(60):
        waiting.append(job("a"))
        s.submit(waiting[-1], 0.0)
        s.submit(job("c"), 0.0)
    first = pops(s, 40)  # equal jobs: batch gets a quarter of them while both wait
    assert abs(first.count("c") - 10) <= 1, first
    assert first[:4].count("c") <= 1  # interleaved, not in a block
    for j in waiting:
        s.cancel(j, 0.0)  # interactive leaves: batch gets everything
    assert pops(s, s.queued("c")) == ["c"] * (60 - first.count("c"))
    for _ in range(40):
        s.submit(job("a"), 0.0)
    assert pops(s, 20) == ["a"] * 20  # batch idle: interactive takes all, no debt builds
    for _ in range(8):
        s.submit(job("c"), 0.0)
    back = pops(s, 8)  # batch returns: lifted, it gets its quarter, not a catch-up burst
    assert 1 <= back.count("c") <= 3, back


def test_without_a_share_batch_waits_for_every_interactive_job() -> None:
    s = make_scheduler("vtc")
    assert isinstance(s, VTCScheduler)
    s.set_min_share(BATCH, 0.25)
    s.set_min_share(BATCH, 0)  # back to strict priority
    s.set_tenant("c", 1.0, tier=BATCH)
    for _ in range(4):
        s.submit(job("c"), 0.0)
        s.submit(job("a"), 0.0)
    assert pops(s, 8) == ["a"] * 4 + ["c"] * 4
    with pytest.raises(ValueError, match="minimum share"):
        s.set_min_share(BATCH, 1.0)
