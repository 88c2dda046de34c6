"""The output-length predictor shared by admission (a high quantile) and vtc-predict (a mean)."""

from __future__ import annotations

import random

import pytest

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import CoreOptions, DispatchCore, Grant
from gateway.scheduler import Job, make_scheduler
from gateway.scheduler.predictor import DEFAULT_PRIOR, OutputPredictor

A = ("a", "m", "chat")
B = ("b", "m", "chat")


def test_no_history_plans_for_the_prior_and_charges_the_cap() -> None:
    p = OutputPredictor()
    assert p.bound(A, 100_000) == DEFAULT_PRIOR
    assert p.bound(A, 300) == 300  # max_tokens bounds the prediction
    assert p.mean(A, 300) == 300  # vtc-predict charges max_tokens up front (paper)


def test_bound_is_the_quantile_of_the_window_and_mean_the_recent_average() -> None:
    p = OutputPredictor(quantile=0.9, window=100, mean_window=10)
    for n in range(1, 101):  # 1..100
        p.observe(A, n)
    assert p.bound(A, 10_000) == 91  # sorted[int(0.9 * 100)]
    assert p.bound(A, 50) == 50
    assert p.mean(A, 10_000) == round(sum(range(91, 101)) / 10)
    for _ in range(100):  # the window forgets
        p.observe(A, 7)
    assert p.bound(A, 10_000) == 7 and p.mean(A, 10_000) == 7


def test_a_new_tenant_borrows_its_models_history_and_few_samples_plan_generously() -> None:
    p = OutputPredictor(min_samples=8)
    for _ in range(20):
        p.observe(A, 200)
    assert p.bound(B, 10_000) == 200  # b has nothing yet: the model's lengths across tenants
    assert p.bound(("b", "other-model", "chat"), 10_000) == DEFAULT_PRIOR
    q = OutputPredictor(min_samples=8)
    q.observe(A, 50)
    assert q.bound(A, 10_000) == max(50, min(DEFAULT_PRIOR, 100))  # one sample: twice it


def test_quantile_bounds_most_lengths_of_a_heavy_tailed_distribution() -> None:
    rng = random.Random(7)
    p = OutputPredictor(quantile=0.9, window=128)
    for _ in range(500):
        p.observe(A, int(rng.lognormvariate(5, 0.8)))
    b = p.bound(A, 100_000)
    fresh = [int(rng.lognormvariate(5, 0.8)) for _ in range(2000)]
    over = sum(n > b for n in fresh) / len(fresh)
    assert 0.03 < over < 0.2  # about a tenth outrun the plan, not half, not none


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        OutputPredictor(quantile=0)
    with pytest.raises(ValueError):
        OutputPredictor(window=0)


def test_the_core_shares_one_predictor_between_its_pools_and_admission() -> None:
    ac = AdmissionController([BackendSlots("b", frozenset({"m", "n"}), 8, 100_000)])
    granted: list[tuple[Job, Grant]] = []
    options = CoreOptions(policy="vtc-predict")
    core = DispatchCore(ac, lambda job, grant: granted.append((job, grant)), options)
    core.set_tenant("a", 1.0)
    assert core.pool("m").predictor is core.pool("n").predictor is core.predictor
    for i in range(10):
        core.submit(Job("a", 10, 500, arrival=float(i), model="m", endpoint="chat"))
        core.pump("m")
        job, grant = granted[-1]
        core.on_output(job, grant, 40)
        core.release(job, grant, output_tokens=40)
    assert ac.in_flight() == 0
    assert core.expect(Job("a", 10, 500, 0.0, model="m", endpoint="chat")) == 40
    assert core.pool("m").prediction("a", 500, "m", "chat") == 40
    assert make_scheduler("vtc").predictor is not make_scheduler("vtc").predictor
