"""fcfs and rpm baselines and the policy factory (purity: tests/test_architecture.py)."""

from __future__ import annotations

import pytest

from gateway.scheduler import (
    POLICIES,
    FCFSScheduler,
    Job,
    LCFScheduler,
    Prices,
    QueueRejected,
    RPMScheduler,
    VTCPredictScheduler,
    VTCScheduler,
    make_scheduler,
)


def job(tenant: str, prompt: int = 10, now: float = 0.0) -> Job:
    return Job(tenant=tenant, prompt_tokens=prompt, max_tokens=20, arrival=now)


# -- fcfs ----------------------------------------------------------------------------------------


def test_fcfs_is_global_arrival_order_across_tenants() -> None:
    s = FCFSScheduler(Prices(input=1, output=1))
    s.set_tenant("heavy", 1.0)
    s.set_tenant("light", 4.0)
    jobs = [job(t, prompt=p) for t, p in [("heavy", 500), ("heavy", 500), ("light", 1)]]
    jobs += [job("heavy", 500), job("new", 1), job("light", 1)]
    for j in jobs:
        s.submit(j, 0)
    got = []
    while (head := s.peek(0)) is not None:
        assert s.pop(0) is head
        got.append(head)
    assert got == jobs  # counters and weights do not reorder anything
    assert s.counter("heavy") == 1500 and s.counter("light") == 0.5  # the ledger is still kept
    assert s.pop(0) is None


def test_fcfs_queue_counts_and_cancel() -> None:
    s = FCFSScheduler()
    a1, b1, a2 = job("a"), job("b"), job("a")
    for j in (a1, b1, a2):
        s.submit(j, 0)
    assert (s.queued("a"), s.queued("b"), s.total_queued()) == (2, 1, 3)
    assert sorted(s.backlogged()) == ["a", "b"]
    assert s.cancel(a1, 1)
    assert not s.cancel(a1, 1)
    assert s.peek(1) is b1
    assert s.pop(1) is b1
    assert not s.cancel(b1, 1)  # running
    assert list(s.backlogged()) == ["a"] and s.total_queued() == 1
    assert s.counter("a") == 0  # the cancelled job cost nothing


def test_fcfs_finish_reconciles_like_every_policy() -> None:
    s = FCFSScheduler(Prices(input=1, output=2))
    j = job("a", prompt=10)
    s.submit(j, 0)
    s.pop(0)
    s.on_output(j, 3, 1)
    assert s.counter("a") == 16
    s.finish(j, 2, ran=False)
    assert s.counter("a") == 0 and j.charged == 0


# -- rpm -----------------------------------------------------------------------------------------


def test_rpm_rejects_over_limit_with_retry_after() -> None:
    s = RPMScheduler(rpm_limit=3)
    for t in (0.0, 10.0, 20.0):
        s.submit(job("a"), t)
    with pytest.raises(QueueRejected) as exc:
        s.submit(job("a"), 30.0)
    assert exc.value.retry_after == pytest.approx(30.0)  # the request at t=0 ages out at 60
    assert "3 requests per minute" in str(exc.value)
    assert s.queued("a") == 3 and s.total_queued() == 3  # the rejected one was not queued
    s.submit(job("b"), 30.0)  # the cap is per tenant
    with pytest.raises(QueueRejected) as exc:
        s.submit(job("a"), 59.5)
    assert exc.value.retry_after == pytest.approx(0.5)


def test_rpm_admits_again_after_the_sliding_minute() -> None:
    s = RPMScheduler(rpm_limit=2)
    s.submit(job("a"), 0.0)
    s.submit(job("a"), 30.0)
    with pytest.raises(QueueRejected):
        s.submit(job("a"), 45.0)
    s.submit(job("a"), 60.0)  # t=0 has left the window [0, 60)... exactly at 60
    with pytest.raises(QueueRejected) as exc:
        s.submit(job("a"), 61.0)  # t=30 and t=60 still inside
    assert exc.value.retry_after == pytest.approx(29.0)
    s.submit(job("a"), 90.0)
    assert s.queued("a") == 4


def test_rpm_counts_admitted_not_rejected_or_dispatched() -> None:
    s = RPMScheduler(rpm_limit=1)
    s.submit(job("a"), 0.0)
    s.pop(0.0)  # dispatching does not free rate budget
    for t in (1.0, 2.0, 3.0):  # repeated rejections do not extend the wait
        with pytest.raises(QueueRejected) as exc:
            s.submit(job("a"), t)
        assert exc.value.retry_after == pytest.approx(60.0 - t)
    s.submit(job("a"), 60.0)


def test_rpm_order_is_fcfs() -> None:
    s = RPMScheduler(rpm_limit=100)
    jobs = [job(t) for t in "abcab"]
    for j in jobs:
        s.submit(j, 0)
    assert [s.pop(0) for _ in jobs] == jobs


def test_rpm_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rpm_limit"):
        RPMScheduler(rpm_limit=0)


# -- factory -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "cls"),
    [
        ("vtc", VTCScheduler),
        ("vtc-predict", VTCPredictScheduler),
        ("lcf", LCFScheduler),
        ("fcfs", FCFSScheduler),
        ("rpm", RPMScheduler),
    ],
)
def test_make_scheduler_builds_each_policy(policy: str, cls: type) -> None:
    prices = Prices(input=3, output=7)
    s = make_scheduler(policy, prices, rpm_limit=5)
    assert type(s) is cls and s.name == policy and s.prices is prices
    assert policy in POLICIES


def test_make_scheduler_passes_rpm_limit_and_rejects_unknown() -> None:
    s = make_scheduler("rpm", rpm_limit=7)
    assert isinstance(s, RPMScheduler) and s.rpm_limit == 7
    assert make_scheduler("vtc").prices == Prices(input=1.0, output=2.0)
    with pytest.raises(ValueError, match="unknown policy 'wfq'"):
        make_scheduler("wfq")
