"""The lift tells an idle tenant from a busy one; the dispatch core holds a slot for a
resubmitting tenant. Hand-checked numbers (prices 1/2, unit weights)."""

from __future__ import annotations

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import DispatchCore, Grant
from gateway.scheduler import Job, VTCScheduler


def job(t: str, now: float, prompt: int = 10, mx: int = 10) -> Job:
    return Job(t, prompt, mx, now, "m")


def busy_pair() -> tuple[VTCScheduler, Job, Job]:
    """b has two requests running and one finished at t=1.0; a is backlogged far ahead."""
    s = VTCScheduler()
    s.follow_s = 0.02
    b1, b2, b3 = job("b", 0.0), job("b", 0.0), job("b", 0.0)
    for j in (b1, b2, b3):
        s.submit(j, 0.0)
    for _ in range(3):
        s.pop(0.0)  # each charges 10 (prompt)
    s.finish(b3, 1.0)  # charged 10 + 0 output
    for _ in range(5):
        s.submit(job("a", 1.0), 1.0)
    s._counters["a"] = 1000.0  # a has been served far more
    return s, b1, b2


def test_an_idle_tenant_gets_the_papers_lift() -> None:
    s = VTCScheduler()
    s.submit(job("a", 0.0), 0.0)
    s._counters["a"] = 500.0
    s.submit(job("b", 5.0), 5.0)  # b: nothing in flight, arrives to an empty queue
    assert s.counter("b") == 500.0
    assert s.lift_stats()["b"] == (1, 500.0)


def test_a_resubmitting_busy_tenant_keeps_credit_for_its_work_in_flight() -> None:
    s, _b1, _b2 = busy_pair()
    before = s.counter("b")  # 30
    s.submit(job("b", 1.01), 1.01)  # 10 ms after its own finish: a resubmission
    # credit = expected cost of the two requests in flight: 2 * (10 + 2 * 10) = 60
    assert s.counter("b") == 1000.0 - 60.0
    assert s.lift_stats()["b"] == (1, 1000.0 - 60.0 - before)


def test_a_busy_tenant_that_does_not_resubmit_is_lifted_fully() -> None:
    s, _b1, _b2 = busy_pair()
    s.submit(job("b", 2.0), 2.0)  # a second after its last finish: not a resubmission
    assert s.counter("b") == 1000.0


def test_entitled_only_for_a_resubmitting_tenant_behind_the_head() -> None:
    s, b1, _b2 = busy_pair()
    s.submit(job("b", 1.01), 1.01)
    s.pop(1.02)  # b is behind a: its request goes first, its queue empties
    s.finish(b1, 1.03)
    assert s.entitled("b", 1.03)  # its next request would be served before a's head
    assert not s.entitled("a", 1.03)  # a has requests queued
    s._counters["b"] = 2000.0
    assert not s.entitled("b", 1.03)  # ahead of a even with its credit


def core_with(
    seqs: int, hold_s: float
) -> tuple[DispatchCore, list[tuple[Job, Grant]], list[float]]:
    slots = BackendSlots("x", frozenset({"m"}), max_num_seqs=seqs, max_kv_tokens=10_000)
    grants: list[tuple[Job, Grant]] = []
    timers: list[float] = []
    now = [0.0]
    core = DispatchCore(
        AdmissionController([slots]),
        lambda j, g: grants.append((j, g)),
        clock=lambda: now[0],
        hold_s=hold_s,
        on_hold=timers.append,
    )
    core.clock = lambda: now[0]
    core.now = now  # type: ignore[attr-defined]
    for t in ("a", "b"):
        core.set_tenant(t, 1.0)
    return core, grants, timers


def test_core_holds_the_slot_for_the_resubmitting_tenant_and_lets_it_lapse() -> None:
    core, grants, timers = core_with(seqs=2, hold_s=0.05)
    now = core.now  # type: ignore[attr-defined]
    for t in ("b", "b"):
        core.submit(job(t, 0.0))
    core.pump("m")
    assert [j.tenant for j, _ in grants] == ["b", "b"]
    # b's second request is a resubmission of a finished one (b "follows")
    first_job, first_grant = grants[0]
    now[0] = 1.0
    core.release(first_job, first_grant)  # nobody waits: plain release, the slot is free
    assert core.held() == 0
    now[0] = 1.01
    core.submit(job("b", 1.01))  # follows b's finish
    core.pump("m")
    for _ in range(3):
        core.submit(job("a", 1.01))
    core.pump("m")
    core.pool("m")._counters["a"] = 1000.0  # a far ahead of b
    j, g = grants[1]
    now[0] = 2.0
    core.release(j, g)  # b's queue is empty but it resubmits and is behind a: hold
    assert core.held() == 1 and timers == [2.05]
    assert core.admission.in_flight() == 2  # the held slot stays booked
    now[0] = 2.01
    core.submit(job("b", 2.01))  # b's next request takes the hold over; the fair order
    core.pump("m")  # gives the slot to b (behind a)
    assert core.held() == 0 and grants[-1][0].tenant == "b"
    j, g = grants[-1]
    now[0] = 3.0
    core.release(j, g)
    assert core.held() == 0 or core.next_hold_expiry() == 3.05
    core.expire_holds(3.05)  # lapses: a gets the slot
    assert core.held() == 0 and grants[-1][0].tenant == "a"
