"""VTC, LCF and vtc-predict: the rules of DESIGN.md "VTC, precisely", one scenario at a time.

Plain synchronous tests; time is a number passed in (the fake clock).
"""

from __future__ import annotations

import pytest

from gateway.scheduler import (
    Job,
    LCFScheduler,
    Prices,
    Scheduler,
    VTCPredictScheduler,
    VTCScheduler,
)


def job(tenant: str, prompt: int = 10, max_tokens: int = 100, now: float = 0.0) -> Job:
    return Job(tenant=tenant, prompt_tokens=prompt, max_tokens=max_tokens, arrival=now)


def drain_tenants(sched: Scheduler, n: int, now: float = 0.0) -> list[str]:
    """Pop ``n`` jobs and return the tenants they belong to, in dispatch order."""
    out: list[str] = []
    for _ in range(n):
        j = sched.pop(now)
        assert j is not None
        out.append(j.tenant)
    return out


# -- counter lift ------------------------------------------------------------------------------


def test_lift_to_min_of_backlogged_tenants() -> None:
    s = VTCScheduler(Prices(input=1, output=2))
    s.submit(job("a", prompt=100), 0)
    s.submit(job("a", prompt=10), 0)
    s.submit(job("b", prompt=40), 0)
    s.submit(job("b", prompt=10), 0)
    assert drain_tenants(s, 2) == ["a", "b"]  # tie at 0 goes to the oldest head (a's)
    assert (s.counter("a"), s.counter("b")) == (100, 40)
    assert set(s.backlogged()) == {"a", "b"}

    s.submit(job("c"), 1)  # brand-new tenant: lifted to min over backlogged = b's 40
    assert s.counter("c") == 40
    assert s.counter("a") == 100 and s.counter("b") == 40  # nobody else moved


def test_lift_never_lowers_a_counter() -> None:
    s = VTCScheduler(Prices(input=1, output=1))
    s.submit(job("hi", prompt=1000), 0)
    s.submit(job("lo", prompt=1), 0)
    s.submit(job("lo", prompt=1), 0)
    assert drain_tenants(s, 2) == ["hi", "lo"]  # hi: 1000 and idle; lo: 1, still backlogged
    s.submit(job("hi"), 1)  # others backlogged, floor = lo's 1 < 1000: hi keeps 1000
    assert s.counter("hi") == 1000
    lo_head = s.peek(1)
    assert lo_head is not None and lo_head.tenant == "lo"
    assert s.cancel(lo_head, 1)  # lo leaves the backlog (counter 1)
    hi_job = s.pop(1)  # hi: 1010, leaves last
    assert hi_job is not None and s.counter("hi") == 1010
    s.submit(job("lo"), 2)  # none backlogged: floor is hi's 1010
    assert s.counter("lo") == 1010
    s.pop(2)  # lo: 1020, now the most recent leaver
    s.on_output(hi_job, 2000, 2)  # hi's running job generates: hi 3010, far above lo
    s.submit(job("hi"), 3)  # none backlogged, floor = lo's 1020 < 3010: unchanged
    assert s.counter("hi") == 3010


def test_lift_when_none_backlogged_uses_most_recent_leaver() -> None:
    s = VTCScheduler(Prices(input=1, output=2))
    c1 = job("c", prompt=500)
    a1 = job("a", prompt=100)
    s.submit(c1, 0)
    s.submit(a1, 0)
    assert s.pop(0) is c1  # tie at 0: c's head is older; c leaves the backlogged set first
    assert s.pop(0) is a1  # a served and leaves second: the most recent leaver
    assert list(s.backlogged()) == []
    assert (s.counter("c"), s.counter("a")) == (500, 100)

    # a's running job keeps generating: the floor is a's counter *now*, not at leave time
    s.on_output(a1, 10, 1)
    assert s.counter("a") == 120

    s.submit(job("b"), 2)  # none backlogged: lifted to a's 120 (not c's 500, not 0)
    assert s.counter("b") == 120


def test_leaving_by_cancel_counts_as_leaving() -> None:
    s = VTCScheduler(Prices(input=1, output=1))
    s.submit(job("a", prompt=300), 0)
    s.pop(0)  # a: 300, left
    late = job("x", prompt=1)
    s.submit(late, 1)  # lifted to 300
    s.submit(job("x", prompt=1), 1)
    s.pop(1)  # x: 301
    # x's remaining job is cancelled: x is now the most recent tenant to leave the backlog
    remaining = s.peek(1)
    assert remaining is not None
    assert s.cancel(remaining, 2)
    assert list(s.backlogged()) == []
    s.submit(job("n"), 3)
    assert s.counter("n") == s.counter("x") == 301


def test_first_tenant_ever_is_not_lifted() -> None:
    s = VTCScheduler()
    s.submit(job("a"), 0)
    assert s.counter("a") == 0
    s2 = VTCScheduler()
    s2.set_tenant("a")
    s2.set_tenant("b")
    s2.submit(job("b"), 0)
    assert s2.counter("b") == 0


# -- LCF: no lift --------------------------------------------------------------------------------


def _newcomer_run(sched: VTCScheduler) -> list[str]:
    """a has been served 1000 units and stays backlogged; b arrives with 20 small requests."""
    s = sched
    s.submit(job("a", prompt=1000), 0)
    for _ in range(20):
        s.submit(job("a", prompt=100), 0)
    s.pop(0)  # a: 1000
    for _ in range(20):
        s.submit(job("b", prompt=100), 1)
    return drain_tenants(s, 12, 2)


def test_lcf_serves_newcomer_exclusively_until_it_catches_up() -> None:
    order = _newcomer_run(LCFScheduler(Prices(input=1, output=1)))
    # b starts at 0 and a sits at 1000: b gets every dispatch until b's counter reaches 1000
    assert order[:10] == ["b"] * 10
    assert order[10] == "a"  # b at 1000 ties a at 1000; a's head is older


def test_vtc_lifts_newcomer_so_service_alternates() -> None:
    s = VTCScheduler(Prices(input=1, output=1))
    order = _newcomer_run(s)
    assert s.counter("b") >= 1000 - 100
    assert order.count("a") == order.count("b") == 6
    assert "b,b" not in ",".join(order) and "a,a" not in ",".join(order)


def test_lcf_long_idle_tenant_starves_others_until_caught_up() -> None:
    """None backlogged case: under LCF a returning idle tenant keeps its old low counter."""
    for cls, expect_exclusive in ((LCFScheduler, True), (VTCScheduler, False)):
        s = cls(Prices(input=1, output=1))
        s.submit(job("idle", prompt=10), 0)
        s.pop(0)  # idle: 10, then idle for a long time
        for t in range(50):  # busy is served alone for a while: 50 * 100 = 5000 units
            s.submit(job("busy", prompt=100), t)
            s.pop(t)
        for _ in range(10):
            s.submit(job("busy", prompt=100), 60)
        for _ in range(10):
            s.submit(job("idle", prompt=100), 60)
        order = drain_tenants(s, 10, 61)
        if expect_exclusive:
            assert order == ["idle"] * 10, cls.name
        else:
            assert order.count("idle") == 5, (cls.name, order)


# -- charging ------------------------------------------------------------------------------------


def test_every_output_token_is_charged_including_the_first() -> None:
    s = VTCScheduler(Prices(input=1, output=2))
    j = job("a", prompt=10)
    s.submit(j, 0)
    assert s.counter("a") == 0  # nothing charged while queued
    assert s.pop(1) is j
    assert s.counter("a") == 10 and j.charged == 10 and j.dispatched_at == 1
    s.on_output(j, 1, 2)  # the first token
    assert s.counter("a") == 12
    s.on_output(j, 3, 3)
    assert s.counter("a") == 18 and j.output_tokens == 4 and j.charged == 18
    s.on_output(j, 0, 4)  # no-op
    assert s.counter("a") == 18
    s.finish(j, 5)
    assert s.counter("a") == j.charged == 18  # nothing to reconcile: the charges were exact
    assert s.service("a") == 18  # output as generated (8) + prompt at finish (10)


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0, 3.0, 4.0])
def test_weights_divide_every_charge(weight: float) -> None:
    prices = Prices(input=3, output=5)
    s = VTCScheduler(prices)
    s.set_tenant("a", weight)
    j = job("a", prompt=7)
    s.submit(j, 0)
    s.pop(0)
    assert s.counter("a") == pytest.approx(3 * 7 / weight)
    s.on_output(j, 4, 1)
    assert s.counter("a") == pytest.approx((21 + 5 * 4) / weight)
    s.finish(j, 2)
    assert j.charged == pytest.approx(prices.cost(7, 4) / weight)
    assert s.counter("a") == pytest.approx(prices.cost(7, 4) / weight)
    assert s.service("a") == prices.cost(7, 4)  # service is tokens at their prices, unweighted


def test_prices_are_respected() -> None:
    s = VTCScheduler(Prices(input=0.5, output=4))
    j = job("a", prompt=10)
    s.submit(j, 0)
    s.pop(0)
    s.on_output(j, 3, 1)
    assert s.counter("a") == 0.5 * 10 + 4 * 3


def test_finish_reconciles_with_actual_usage() -> None:
    s = VTCScheduler(Prices(input=1, output=2))
    j = job("a", prompt=100)
    s.submit(j, 0)
    s.pop(0)
    s.on_output(j, 5, 1)
    j.prompt_tokens = 90  # the backend's usage says the estimate was 10 too high
    s.finish(j, 2)
    assert s.counter("a") == j.charged == 90 + 10
    k = job("a", prompt=10)
    s.submit(k, 3)
    s.pop(3)
    k.prompt_tokens = 12  # ...or too low
    s.finish(k, 4)
    assert k.charged == 12 and s.counter("a") == 112


def test_finish_not_ran_refunds_everything() -> None:
    s = VTCScheduler(Prices(input=1, output=2))
    s.set_tenant("a", 2.0)
    first = job("a", prompt=40)
    s.submit(first, 0)
    s.pop(0)
    s.finish(first, 0)
    base = s.counter("a")  # 20
    j = job("a", prompt=30)
    s.submit(j, 1)
    s.submit(job("a", prompt=1), 1)  # a stays backlogged: the refund must re-key the heap
    s.submit(job("b", prompt=1), 1)
    while j.dispatched_at is None:
        s.pop(1)
    assert s.counter("a") > base
    s.finish(j, 2, ran=False)
    assert j.charged == 0
    assert s.counter("a") == base
    assert s.service("a") == 40  # the refused job's prompt is not service


def test_refund_makes_a_backlogged_tenant_the_pick_again() -> None:
    s = VTCScheduler(Prices(input=1, output=1))
    big = job("a", prompt=1000)
    s.submit(big, 0)
    s.submit(job("a", prompt=1), 0)
    s.submit(job("b", prompt=500), 0)
    s.submit(job("b", prompt=1), 0)
    assert s.pop(0) is big  # a: 1000
    assert s.pop(0) is not None  # b: 500
    top = s.peek(0)
    assert top is not None and top.tenant == "b"
    s.finish(big, 1, ran=False)  # a: back to 0, below b
    top = s.peek(1)
    assert top is not None and top.tenant == "a"


def test_finish_of_a_job_never_dispatched_is_a_noop() -> None:
    s = VTCScheduler()
    j = job("a")
    s.submit(j, 0)
    s.finish(j, 1)
    assert s.counter("a") == 0 and j.charged == 0 and s.queued("a") == 1


# -- cancel, ties, peek --------------------------------------------------------------------------


def test_cancel_queued_job_charges_nothing_and_updates_counts() -> None:
    s = VTCScheduler()
    a1, a2, b1 = job("a"), job("a"), job("b")
    for j in (a1, a2, b1):
        s.submit(j, 0)
    assert (s.queued("a"), s.queued("b"), s.total_queued()) == (2, 1, 3)
    assert s.cancel(a2, 1)
    assert (s.queued("a"), s.total_queued()) == (1, 2)
    assert s.cancel(b1, 1)
    assert set(s.backlogged()) == {"a"}
    assert s.queued("b") == 0
    assert not s.cancel(b1, 1)  # already gone
    assert s.counter("a") == s.counter("b") == 0
    assert s.pop(2) is a1
    assert not s.cancel(a1, 3)  # running: not cancellable, finish() handles it
    assert s.total_queued() == 0 and s.peek(3) is None and s.pop(3) is None
    assert not s.cancel(job("never-submitted"), 3)


def test_cancelling_the_head_changes_the_pick() -> None:
    s = VTCScheduler()
    a1, b1, a2 = job("a"), job("b"), job("a")
    for j in (a1, b1, a2):  # seqs 1, 2, 3; all counters 0
        s.submit(j, 0)
    assert s.peek(0) is a1
    assert s.cancel(a1, 1)
    assert s.peek(1) is b1  # a's head is now seq 3, b's is seq 2
    assert s.pop(1) is b1
    assert s.pop(1) is a2


def test_ties_go_to_the_oldest_head_request() -> None:
    s = VTCScheduler()
    order = ["c", "a", "d", "b"]
    for t in order:
        s.submit(job(t), 0)
    for t in order:
        s.submit(job(t), 0)
    peeked = s.peek(0)
    assert peeked is not None and peeked.tenant == "c"
    # all counters stay equal when prompts are equal, so dispatch follows head age every round
    assert drain_tenants(s, 8) == order + order


def test_peek_changes_nothing_and_matches_pop() -> None:
    s = VTCScheduler()
    assert s.peek(0) is None and s.pop(0) is None
    jobs = [job(t, prompt=p) for t, p in [("a", 5), ("b", 3), ("a", 1), ("c", 9)]]
    for j in jobs:
        s.submit(j, 0)
    while s.total_queued():
        p1, p2 = s.peek(0), s.peek(0)
        counters = {t: s.counter(t) for t in "abc"}
        assert p1 is p2
        assert {t: s.counter(t) for t in "abc"} == counters
        assert s.pop(0) is p1


def test_weight_change_keeps_counter_and_validates() -> None:
    s = VTCScheduler()
    s.submit(job("a", prompt=10), 0)
    s.pop(0)
    s.set_tenant("a", 5.0)
    assert s.counter("a") == 10 and s.weight("a") == 5.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="weight"):
            s.set_tenant("a", bad)
    assert s.weight("unknown") == 1.0 and s.counter("unknown") == 0


def test_submit_sets_global_seq_and_stats() -> None:
    s = VTCScheduler(Prices(input=1, output=1))
    js = [job("a"), job("b"), job("a")]
    for j in js:
        s.submit(j, 0)
    assert [j.seq for j in js] == [1, 2, 3]
    s.pop(0)
    stats = {st.name: st for st in s.stats()}
    assert stats["a"].queued == 1 and stats["a"].counter == 10 and stats["a"].weight == 1.0
    assert stats["b"].queued == 1 and stats["b"].counter == 0
    assert set(s.tenants()) == {"a", "b"}


# -- vtc-predict ---------------------------------------------------------------------------------


def _run_predict(s: VTCPredictScheduler, tenant: str, actual: int, max_tokens: int = 100) -> Job:
    j = job(tenant, prompt=10, max_tokens=max_tokens)
    s.submit(j, 0)
    assert s.pop(0) is j
    s.on_output(j, actual, 1)
    s.finish(j, 2)
    return j


def test_predict_without_history_charges_max_tokens_up_front() -> None:
    s = VTCPredictScheduler(Prices(input=1, output=2))
    s.set_tenant("a", 2.0)
    j = job("a", prompt=10, max_tokens=50)
    s.submit(j, 0)
    s.pop(0)
    assert j.predicted_output == 50
    assert s.counter("a") == j.charged == (10 + 2 * 50) / 2


def test_predict_charges_output_only_beyond_the_prediction() -> None:
    s = VTCPredictScheduler(Prices(input=1, output=2))
    for _ in range(3):
        _run_predict(s, "a", 20)  # history: 20, 20, 20
    assert s.prediction("a", 100) == 20
    j = job("a", prompt=10, max_tokens=100)
    s.submit(j, 0)
    s.pop(0)
    base = s.counter("a")
    assert j.charged == 10 + 2 * 20
    s.on_output(j, 15, 1)
    assert s.counter("a") == base  # within the prediction: already paid
    s.on_output(j, 5, 1)
    assert s.counter("a") == base  # exactly the prediction
    s.on_output(j, 1, 1)
    assert s.counter("a") == base + 2  # first token beyond it
    s.on_output(j, 4, 1)
    assert s.counter("a") == base + 10
    s.finish(j, 2)
    assert j.charged == Prices(1, 2).cost(10, 25)


def test_predict_refunds_on_finish_so_total_is_actual_cost() -> None:
    s = VTCPredictScheduler(Prices(input=1, output=2))
    before = s.counter("a")
    j = _run_predict(s, "a", 7, max_tokens=100)  # predicted 100, produced 7
    assert j.predicted_output == 100
    assert j.charged == 10 + 2 * 7
    assert s.counter("a") - before == 10 + 2 * 7


@pytest.mark.parametrize("actuals", [[10, 20, 30], [1] * 12 + [100] * 3, [0, 0, 7]])
def test_predict_is_moving_average_bounded_by_max_tokens(actuals: list[int]) -> None:
    s = VTCPredictScheduler(window=10)
    for n in actuals:
        _run_predict(s, "a", n, max_tokens=200)
    recent = actuals[-10:]
    assert s.prediction("a", 1000) == round(sum(recent) / len(recent))
    assert s.prediction("a", 3) == min(3, round(sum(recent) / len(recent)))
    assert s.prediction("b", 42) == 42  # no history of its own: max_tokens
    j = job("a", prompt=1, max_tokens=2)
    s.submit(j, 0)
    s.pop(0)
    assert j.predicted_output == min(2, round(sum(recent) / len(recent)))


def test_predict_job_that_never_ran_refunds_and_teaches_nothing() -> None:
    s = VTCPredictScheduler(Prices(input=1, output=2))
    for _ in range(3):
        _run_predict(s, "a", 40)
    before = s.counter("a")
    j = job("a", prompt=10, max_tokens=100)
    s.submit(j, 0)
    s.pop(0)
    assert s.counter("a") == before + 10 + 2 * 40
    s.finish(j, 1, ran=False)
    assert j.charged == 0 and s.counter("a") == before
    assert s.prediction("a", 100) == 40  # a refused request is no evidence of output length


def test_predict_total_charge_equals_actual_cost_on_every_path() -> None:
    prices = Prices(input=2, output=3)
    s = VTCPredictScheduler(prices, window=3)
    s.set_tenant("a", 3.0)
    for actual in [5, 50, 0, 17, 17, 90, 1]:
        j = job("a", prompt=11, max_tokens=60)
        s.submit(j, 0)
        s.pop(0)
        for _ in range(min(actual, 60)):
            s.on_output(j, 1, 1)
        s.finish(j, 2)
        assert j.charged == pytest.approx(prices.cost(11, min(actual, 60)) / 3)


def test_submit_cancel_churn_keeps_the_heap_bounded() -> None:
    from gateway.scheduler import Job, VTCScheduler

    s = VTCScheduler()
    keep = Job("a", 10, 10, 0.0)
    s.submit(keep, 0.0)
    for i in range(10_000):
        j = Job("b", 10, 10, float(i))
        s.submit(j, float(i))
        assert s.cancel(j, float(i))
    assert len(s._roots[0].heap) <= 2 * 34
    assert s.pop(1e4) is keep


def test_a_weight_change_does_not_reprice_work_already_charged() -> None:
    from gateway.scheduler import Job, VTCScheduler

    s = VTCScheduler()
    s.set_tenant("a", 1.0)
    job = Job("a", 100, 200, 0.0)
    s.submit(job, 0.0)
    assert s.pop(0.0) is job
    s.on_output(job, 200, 1.0)  # 100 + 2 * 200 = 500 units at weight 1
    assert s.counter("a") == 500
    s.set_tenant("a", 4.0)  # a reload raises the weight while the job runs
    s.finish(job, 2.0)
    assert s.counter("a") == 500  # no refund for what was served at weight 1
    later = Job("a", 100, 0, 3.0)
    s.submit(later, 3.0)
    s.pop(3.0)
    s.finish(later, 4.0)
    assert s.counter("a") == 525  # new work at weight 4


def test_finish_reconciles_to_the_backends_output_count_even_downwards() -> None:
    from gateway.scheduler import Job, VTCScheduler

    s = VTCScheduler()
    job = Job("a", 10, 50, 0.0)
    s.submit(job, 0.0)
    s.pop(0.0)
    s.on_output(job, 30, 1.0)  # an estimate from counting delta text
    s.finish(job, 2.0, output_tokens=20)  # the backend's usage says 20
    assert s.counter("a") == 10 + 2 * 20
    assert s.service("a") == 10 + 2 * 20
