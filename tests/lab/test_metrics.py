"""The paper's metrics on small hand-computed examples."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.lab import metrics as m
from gateway.scheduler import Prices

P = Prices(1, 2)


def rec(
    tenant: str,
    arrival: float,
    first: float | None,
    finish: float | None,
    prompt: int,
    output: int,
    status: str = "ok",
) -> m.RequestRecord:
    return m.RequestRecord(tenant, arrival, first, finish, prompt, output, status)


# r1 costs 10 + 2*5 = 20, streamed over [2, 6]: 5 per second.
R1 = rec("a", 0.0, 2.0, 6.0, 10, 5)
# r2 costs 4 + 2*1 = 6, a point mass at t = 5.
R2 = rec("a", 1.0, 5.0, 5.0, 4, 1)


def test_service_is_spread_uniformly_over_streaming() -> None:
    assert m.request_cost(R1, P) == 20
    assert m.service_in(R1, 0, 4, P) == pytest.approx(10)
    assert m.service_in(R1, 3, 10, P) == pytest.approx(15)
    assert m.service_in(R1, 6, 9, P) == 0
    assert m.service_in(R2, 0, 5, P) == 6
    assert m.service_in(R2, 5, 10, P) == 0
    assert m.accumulated_service([R1, R2], "a", 0, 100, P) == pytest.approx(26)
    assert m.accumulated_service([R1, R2], "b", 0, 100, P) == 0


def test_rejected_and_failed_requests_are_no_service() -> None:
    rejected = rec("a", 0.0, None, None, 10, 5, "rejected")
    error = rec("a", 0.0, 1.0, 2.0, 10, 5, "error")
    assert m.service_in(rejected, 0, 10, P) == 0
    assert m.service_in(error, 0, 10, P) == 0


def test_service_and_demand_rates_in_windows() -> None:
    groups = {"a": [R1, R2]}
    # window [2, 6] holds all of r1 (20) and r2 (6): 26 / 4
    assert m.service_rates(groups, [4.0], 4.0, P) == {"a": [pytest.approx(6.5)]}
    # window [-1, 3] holds both arrivals (0 and 1): 26 / 4; window [1.5, 5.5] none
    assert m.demand_rates(groups, [1.0, 3.5], 4.0, P) == {"a": [6.5, 0.0]}


def test_demand_counts_rejected_requests() -> None:
    groups = {"a": [rec("a", 1.0, None, None, 10, 5, "rejected")]}
    assert m.demand_rates(groups, [1.0], 2.0, P) == {"a": [10.0]}
    assert m.demand_rates(groups, [1.0], 2.0, P, include_rejected=False) == {"a": [0.0]}


def test_service_difference_formula() -> None:
    s = {"a": [10.0], "b": [4.0], "c": [7.0]}
    r = {"a": [12.0], "b": [20.0], "c": [7.0]}
    # a: min(0, 2) = 0; b: min(6, 16) = 6; c: min(3, 0) = 0
    assert m.service_difference(s, r) == [6.0]
    # b at weight 2: s_b = 2, r_b = 10, top = 10 -> a: 0, b: min(8, 8), c: min(3, 0)
    assert m.service_difference(s, r, {"b": 2.0}) == [8.0]


def test_stats_are_max_mean_population_variance() -> None:
    assert m.stats([1.0, 2.0, 3.0]) == (3.0, 2.0, pytest.approx(2 / 3))
    assert m.stats([]) == (0.0, 0.0, 0.0)


def test_backlog_periods_merge_waiting_intervals() -> None:
    recs = [
        rec("a", 0, 3, 9, 1, 1),
        rec("a", 2, 5, 9, 1, 1),
        rec("a", 7, 8, 9, 1, 1),
        rec("a", 1, None, None, 1, 1, "rejected"),
    ]
    assert m.backlog_periods(recs) == [(0, 5), (7, 8)]


# Accumulated-gap example: a is backlogged on [0, 20), b on [0, 25).
# a: two requests of cost 30 streamed over [10, 20] and [20, 30] (3 per second);
# b: cost 40 over [10, 30] (2 per second) and a point of cost 6 at 26.
GAP = {
    "a": [rec("a", 0, 10, 20, 10, 10), rec("a", 0, 20, 30, 10, 10)],
    "b": [rec("b", 0, 10, 30, 20, 10), rec("b", 5, 25, 26, 4, 1)],
}


def test_accumulated_gap_between_backlogged_tenants() -> None:
    # t=15: W_a = 15, W_b = 10; t=22: a no longer backlogged -> no pair
    assert m.accumulated_gap(GAP, [15.0, 22.0], P) == [pytest.approx(5), 0.0]
    # weights divide service: 15/2 vs 10
    assert m.accumulated_gap(GAP, [15.0], P, {"a": 2.0}) == [pytest.approx(2.5)]
    # since the warm-up at 12: W_a(12, 15) = 9, W_b(12, 15) = 6
    assert m.accumulated_gap(GAP, [15.0], P, since=12.0) == [pytest.approx(3)]


def test_accumulated_gap_counts_from_the_later_backlog_start() -> None:
    groups = dict(GAP, c=[rec("c", 14, 30, 31, 1, 1)])
    # c backlogged since 14 with no service: the a-c gap counts W_a(14, 15) = 3, b-c W_b = 2,
    # a-b since 0 is still 5
    assert m.accumulated_gap(groups, [15.0], P) == [pytest.approx(5)]
    assert m.accumulated_gap({"a": GAP["a"], **{"c": groups["c"]}}, [15.0], P) == [pytest.approx(3)]


def test_throughput_over_the_whole_run() -> None:
    rejected = rec("a", 0, None, None, 100, 100, "rejected")
    assert m.throughput([R1, R2, rejected], 10.0) == pytest.approx(2.0)  # 20 tokens / 10 s
    late = rec("b", 0, 20, 30, 10, 10)
    assert m.throughput([R1, R2, late], 10.0) == pytest.approx(40 / 30)


def test_latency_percentiles() -> None:
    assert m.quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert m.quantile([1.0, 2.0, 3.0, 4.0], 0.99) == pytest.approx(3.97)
    assert math.isnan(m.quantile([], 0.5))
    lat = m.latency_percentiles({"a": [R1, R2], "b": []})
    assert lat["a"] == (pytest.approx(3.0), pytest.approx(3.98))
    assert all(math.isnan(x) for x in lat["b"])


def test_bound_2u() -> None:
    assert m.bound_2u(P, 1000, 10_000) == 40_000
    assert m.bound_2u(P, 30_000, 10_000) == 60_000


def test_ticks_generalise_the_paper() -> None:
    t = m.Ticks.for_duration(600)
    assert (t.warmup, t.window, len(t.points)) == (30, 60, 19)
    assert t.points[0] == pytest.approx(58.5) and t.points[-1] == pytest.approx(571.5)
    short = m.Ticks.for_duration(60)
    assert (short.warmup, short.window) == (3, 30)


def test_summarize_small_run() -> None:
    recs = [R1, R2, rec("b", 0, 1, 3, 10, 5), rec("b", 1, None, None, 10, 5, "rejected")]
    s = m.summarize(recs, {"a": 1.0, "b": 1.0}, 10.0, P, batch_tokens=100)
    assert s.rejected == 1
    assert s.throughput_tok_s == pytest.approx(35 / 10)
    assert s.bound_2u == 400
    assert s.max_diff >= s.avg_diff >= 0


@given(
    first=st.floats(0, 100),
    length=st.floats(0, 100),
    cut=st.floats(0, 1),
    prompt=st.integers(1, 1000),
    output=st.integers(1, 1000),
)
def test_service_is_additive_and_complete(
    first: float, length: float, cut: float, prompt: int, output: int
) -> None:
    r = rec("a", 0, first, first + length, prompt, output)
    mid = first + length * cut
    whole = m.service_in(r, -1, 300, P)
    assert whole == pytest.approx(P.cost(prompt, output))
    split = m.service_in(r, -1, mid, P) + m.service_in(r, mid, 300, P)
    assert split == pytest.approx(whole)


def test_a_request_refused_up_front_does_not_make_its_tenant_backlogged() -> None:
    refused = rec("c", 10.0, None, None, 5000, 5000, status="error")
    assert m.backlog_periods([refused]) == []
