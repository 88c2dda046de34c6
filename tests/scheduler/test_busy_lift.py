"""The lift tells an idle tenant from a busy one; the dispatch core holds a slot for a
resubmitting tenant. Hand-checked numbers (prices 1/2, unit weights)."""

from __future__ import annotations

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import CoreOptions, DispatchCore, Grant
from gateway.scheduler import Job, LCFScheduler, VTCScheduler


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


def resubmitting(s: VTCScheduler, tenant: str, now: float) -> None:
    """Mark ``tenant`` as a closed-loop client (its recent arrivals followed its finishes)."""
    q = s._queues[tenant]
    q.resubmits, q.follows = 1.0, True


def test_a_resubmitting_busy_tenant_keeps_credit_for_its_work_in_flight() -> None:
    s, _b1, _b2 = busy_pair()
    resubmitting(s, "b", 1.0)
    before = s.counter("b")  # 30
    s.submit(job("b", 1.01), 1.01)  # 10 ms after its own finish
    # credit = expected cost of the two requests in flight: 2 * (10 + 2 * 10) = 60
    assert s.counter("b") == 1000.0 - 60.0
    assert s.lift_stats()["b"] == (1, 1000.0 - 60.0 - before)


def test_a_busy_tenant_that_does_not_resubmit_is_lifted_fully() -> None:
    s, _b1, _b2 = busy_pair()
    s.submit(job("b", 2.0), 2.0)  # a second after its last finish: not a resubmission
    assert s.counter("b") == 1000.0
    assert not s.resubmits("b")


def test_resubmissions_are_recognised_from_the_arrival_pattern() -> None:
    s = VTCScheduler()
    s.follow_s = 0.05
    t = 0.0
    seen = []
    for _ in range(6):  # each request arrives 10 ms after the previous one finished
        j = job("a", t)
        s.submit(j, t)
        s.pop(t)
        t += 1.0
        s.finish(j, t)
        t += 0.01
        seen.append(s.resubmits("a"))
    assert seen[0] is False and seen[-1] is True
    for _ in range(6):  # then requests come 1 s after a finish: no longer a closed loop
        j = job("a", t)
        s.submit(j, t)
        s.pop(t)
        t += 1.0
        s.finish(j, t)
        t += 1.0
    assert not s.resubmits("a")


def test_entitled_when_its_next_request_would_precede_the_head() -> None:
    s, b1, _b2 = busy_pair()
    resubmitting(s, "b", 1.0)
    s.finish(b1, 1.03)
    assert s.entitled("b", 1.03)  # b (30 + credit) is far behind a's head (1000)
    assert not s.entitled("a", 1.03)  # a has requests queued: they compete themselves
    s._counters["b"] = 2000.0
    assert not s.entitled("b", 1.03)  # ahead of a even with its credit


def make_core(seqs: int, hold_s: float) -> tuple[DispatchCore, list[Job], list[float]]:
    slots = BackendSlots("x", frozenset({"m"}), max_num_seqs=seqs, max_kv_tokens=10_000)
    granted: list[Job] = []
    grants: dict[int, Grant] = {}
    timers: list[float] = []
    clock = [0.0]

    def on_grant(j: Job, g: Grant) -> None:
        granted.append(j)
        grants[id(j)] = g

    core = DispatchCore(
        AdmissionController([slots]),
        on_grant,
        CoreOptions(hold_s=hold_s),
        clock=lambda: clock[0],
        on_hold=timers.append,
    )
    core.test_clock = clock  # type: ignore[attr-defined]
    core.test_grants = grants  # type: ignore[attr-defined]
    for t in ("a", "b"):
        core.set_tenant(t, 1.0)
    return core, granted, timers


def test_core_holds_a_slot_for_an_expected_request_that_precedes_the_head() -> None:
    core, granted, timers = make_core(seqs=1, hold_s=0.05)
    clock, grants = core.test_clock, core.test_grants  # type: ignore[attr-defined]
    pool = core.pool("m")
    b_job = job("b", 0.0)
    core.submit(b_job)
    core.pump("m")
    for _ in range(3):
        core.submit(job("a", 0.0))
    core.pump("m")  # the only slot is b's
    assert granted == [b_job]
    resubmitting(pool, "b", 0.0)  # type: ignore[arg-type]
    pool._counters["a"] = 1000.0  # a far ahead of b
    clock[0] = 1.0
    core.release(b_job, grants[id(b_job)])  # b's next request is expected: the slot waits
    assert granted == [b_job] and core.held() == 1 and timers == [1.05]
    assert core.admission.in_flight() == 1  # the held slot stays booked
    clock[0] = 1.01
    b_next = job("b", 1.01)
    core.submit(b_next)  # it came: the hold is released, the fair order gives the slot to b
    core.pump("m")
    assert granted[-1] is b_next and core.held() == 0 and core.holds_used == 1
    clock[0] = 2.0
    core.release(b_next, grants[id(b_next)])
    assert core.held() == 1  # expected again
    core.expire_holds(2.05)  # it did not come: the slot goes to a
    assert core.held() == 0 and granted[-1].tenant == "a"
    assert core.holds_total == 2 and core.holds_used == 1


def test_no_hold_without_resubmission_or_when_nobody_waits() -> None:
    core, _granted, _timers = make_core(seqs=1, hold_s=0.05)
    clock, grants = core.test_clock, core.test_grants  # type: ignore[attr-defined]
    b_job = job("b", 0.0)
    core.submit(b_job)
    core.pump("m")
    clock[0] = 1.0
    core.release(b_job, grants[id(b_job)])  # b does not resubmit: nothing expected
    assert core.next_hold_expiry() is None and core.admission.in_flight() == 0


def _history(s: VTCScheduler, tenant: str, output: int, n: int, gap: float) -> float:
    """``n`` requests of ``tenant`` (prompt 10), each producing ``output`` tokens, the next one
    sent ``gap`` seconds after the previous one finished; returns the time after the last."""
    t = 0.0
    for _ in range(n):
        j = job(tenant, t, prompt=10, mx=50)
        s.submit(j, t)
        s.pop(t)
        s.on_output(j, output, t + 0.5)
        s.finish(j, t + 1.0)
        t += 1.0 + gap
    return t


def test_a_resubmitting_tenant_is_charged_its_expected_output_at_dispatch() -> None:
    s = VTCScheduler()
    s.follow_s = 0.05
    t = _history(s, "b", output=30, n=4, gap=0.01)
    assert s.resubmits("b")
    j = job("b", t, prompt=10, mx=50)
    s.submit(j, t)
    before = s.counter("b")
    assert s.dispatch_cost(j) == 70  # what a shared order charges when it grants the slot
    s.pop(t)
    assert j.predicted_output == j.expected_output == 30  # its recent mean, below max_tokens
    assert s.counter("b") - before == 10 + 2 * 30  # prompt and expected output, up front
    s.on_output(j, 30, t + 0.5)
    assert s.counter("b") - before == 70  # tokens within the expectation cost nothing more
    s.on_output(j, 5, t + 0.6)
    assert s.counter("b") - before == 80  # beyond it, each token as it streams
    s.finish(j, t + 1.0, output_tokens=33)  # reconciled with the backend's count
    assert s.counter("b") - before == 10 + 2 * 33


def test_a_tenant_that_does_not_resubmit_is_charged_as_in_the_paper() -> None:
    s = VTCScheduler()
    s.follow_s = 0.05
    t = _history(s, "b", output=30, n=4, gap=1.0)  # a second between finish and arrival
    assert not s.resubmits("b")
    j = job("b", t, prompt=10, mx=50)
    s.submit(j, t)
    before = s.counter("b")
    assert s.dispatch_cost(j) == 10
    s.pop(t)
    assert j.predicted_output == 0 and j.expected_output == 30
    assert s.counter("b") - before == 10  # the prompt only; output as it streams


def test_lcf_charges_a_resubmitting_tenant_as_it_streams() -> None:
    s = LCFScheduler()
    s.follow_s = 0.05
    t = _history(s, "b", output=30, n=4, gap=0.01)
    j = job("b", t, prompt=10, mx=50)
    s.submit(j, t)
    before = s.counter("b")
    s.pop(t)
    assert j.predicted_output == 0 and s.counter("b") - before == 10


def test_hold_zero_turns_the_busy_tenant_rules_off() -> None:
    """``hold_ms: 0``: no resubmission is recognised, so no credit and no up-front charge."""
    for hold_s, busy in ((0.05, True), (0.0, False)):
        core, _granted, _timers = make_core(seqs=4, hold_s=hold_s)
        pool = core.pool("m")
        assert isinstance(pool, VTCScheduler)
        _history(pool, "b", output=30, n=4, gap=0.0)  # back the instant one finishes
        assert pool.resubmits("b") is busy
