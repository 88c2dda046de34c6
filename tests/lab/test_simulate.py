"""The discrete-event simulator end to end on short workloads (a10g-llama2-7b, 10k KV)."""

from __future__ import annotations

import pytest

from gateway.lab import metrics as m
from gateway.lab.report import build_results, tenant_service
from gateway.lab.simulate import SimConfig, simulate, simulate_many
from gateway.lab.workloads import ClientSpec, Workload, WorkloadRequest, load_workload, synthesize
from gateway.scheduler import Prices

P = Prices()
CONFIG = SimConfig(profile="a10g-llama2-7b", kv_cache_tokens=10_000)


@pytest.fixture(scope="module")
def overload_120() -> dict[str, m.Summary]:
    wl = load_workload("overload").truncated(120)
    runs = simulate_many(wl, ["vtc", "fcfs"], CONFIG)
    for run in runs.values():
        assert all(r.status == "ok" for r in run.records)
        assert all(r.first_token_s is not None and r.finish_s is not None for r in run.records)
        assert all(r.output_tokens == 256 for r in run.records)
        assert run.preemptions == 0
    results = build_results(wl, {p: r.records for p, r in runs.items()}, P, 10_000)
    return {p: r.summary for p, r in results.policies.items()}


def test_vtc_gap_stays_under_2u_while_fcfs_exceeds_it(overload_120: dict[str, m.Summary]) -> None:
    vtc, fcfs = overload_120["vtc"], overload_120["fcfs"]
    assert vtc.bound_2u == fcfs.bound_2u == 40_000
    # peak admission (the paper's engine) admits in bursts when a cohort finishes, so VTC's gap
    # is a few thousand tokens (about 9k here; the paper reports ~7.7k), well under 2U
    assert vtc.max_acc_gap < vtc.bound_2u / 3
    assert fcfs.max_acc_gap > fcfs.bound_2u
    assert vtc.max_diff < fcfs.max_diff / 2
    assert vtc.avg_diff < fcfs.avg_diff / 4


def test_vtc_is_work_conserving(overload_120: dict[str, m.Summary]) -> None:
    vtc, fcfs = overload_120["vtc"], overload_120["fcfs"]
    assert vtc.throughput_tok_s == pytest.approx(fcfs.throughput_tok_s, rel=0.02)
    assert 850 < vtc.throughput_tok_s < 950  # the paper's A10G: ~876-904 tokens/s


def test_weighted_service_follows_weights() -> None:
    wl = load_workload("overload_weighted").truncated(120)
    run = simulate(wl, "vtc", CONFIG)
    results = build_results(wl, {"vtc": run.records}, P, 10_000)
    per_weight = tenant_service(results, "vtc")  # service / weight: equal when fair
    base = per_weight["client-1"]
    for tenant in ("client-2", "client-3", "client-4"):
        assert per_weight[tenant] == pytest.approx(base, rel=0.05)


def test_lcf_favours_the_returning_client_and_vtc_does_not() -> None:
    # client-1 sends little for 100 s while client-2 floods; then both flood equally.
    clients = [
        ClientSpec("client-1", 0.3, end=100),
        ClientSpec("client-2", 3.0, end=100),
        ClientSpec("client-1", 2.0, start=100, end=160),
        ClientSpec("client-2", 2.0, start=100, end=160),
    ]
    wl = synthesize("shift", 160, clients)
    share = {}
    for policy in ("vtc", "lcf"):
        groups = m.by_tenant(simulate(wl, policy, CONFIG).records)
        w = {t: m.accumulated_service(recs, t, 100, 140, P) for t, recs in groups.items()}
        share[policy] = w["client-1"] / (w["client-1"] + w["client-2"])
    assert share["lcf"] > 0.75
    assert 0.4 < share["vtc"] < 0.6


def test_rpm_rejects_over_the_limit() -> None:
    wl = load_workload("overload").truncated(60)
    run = simulate(wl, "rpm", SimConfig(kv_cache_tokens=10_000, rpm_limit=5))
    statuses = [r.status for r in run.records]
    assert statuses.count("ok") == 10  # 5 per tenant in the first minute
    assert statuses.count("rejected") == len(wl.requests) - 10
    rejected = [r for r in run.records if r.status == "rejected"]
    assert all(r.first_token_s is None and r.finish_s is None for r in rejected)


def test_request_that_can_never_fit_is_an_error_not_a_hang() -> None:
    wl = Workload(
        "big",
        10,
        {"a": 1.0},
        [WorkloadRequest(0.0, "a", 9_000, 2_000), WorkloadRequest(1.0, "a", 10, 10)],
    )
    run = simulate(wl, "vtc", CONFIG)
    assert [r.status for r in run.records] == ["error", "ok"]


def test_every_policy_runs_and_charges_consistently() -> None:
    wl = load_workload("poisson_short_long").truncated(20)
    runs = simulate_many(wl, ["vtc", "vtc-predict", "fcfs", "lcf", "rpm"], CONFIG)
    tokens = {
        p: sum(r.output_tokens for r in run.records if r.status == "ok") for p, run in runs.items()
    }
    assert tokens["vtc"] == tokens["fcfs"] == tokens["lcf"] == tokens["vtc-predict"]
    assert tokens["rpm"] < tokens["vtc"]


def test_kv_admission_defaults_to_the_profile_and_peak_packs_more() -> None:
    """The paper profile admits with the peak check in the gateway and the engine; forcing
    ``reserve`` on the same mixed-length traffic runs smaller batches, so it is slower."""
    assert CONFIG.gateway_admission() == "peak"
    assert CONFIG.engine_config()[1].kv_admission == "peak"
    vllm_like = SimConfig(profile="h100-llama3-8b")
    assert vllm_like.gateway_admission() == "predict"  # the gateway's default
    assert vllm_like.engine_config()[1].kv_admission == "blocks"
    forced = SimConfig(profile="a10g-llama2-7b", kv_cache_tokens=10_000, kv_admission="reserve")
    assert forced.gateway_admission() == "reserve"
    assert forced.engine_config()[1].kv_admission == "reserve"

    clients = [
        ClientSpec("short", 4.0, (16, 256), (8, 64), arrival="poisson"),
        ClientSpec("long", 1.0, (16, 256), (256, 1024), arrival="poisson"),
    ]
    wl = synthesize("mixed", 90.0, clients, seed=3)

    def finish(config: SimConfig) -> float:
        run = simulate(wl, "vtc", config)
        assert all(r.status == "ok" for r in run.records) and run.preemptions == 0
        return max(r.finish_s or 0.0 for r in run.records)

    assert finish(CONFIG) < 0.9 * finish(forced)


def test_arena_trace_headline_holds_on_the_shipped_trace() -> None:
    """The README's real-trace row, from the trace in the repository: VTC's max and average
    service difference are under half of FCFS's at the same throughput (about 778 tok/s, the
    paper's 777-779)."""
    wl = load_workload("arena_trace")
    runs = simulate_many(wl, ["vtc", "fcfs"], CONFIG)
    results = build_results(wl, {p: r.records for p, r in runs.items()}, P, 10_000)
    vtc, fcfs = results.policies["vtc"].summary, results.policies["fcfs"].summary
    assert vtc.max_diff < fcfs.max_diff / 2 and vtc.avg_diff < fcfs.avg_diff / 1.5
    assert vtc.throughput_tok_s == pytest.approx(fcfs.throughput_tok_s, rel=0.01)
    assert 740 < vtc.throughput_tok_s < 820


def test_predict_admission_in_front_of_a_vllm_like_engine_keeps_the_bound_and_the_throughput() -> (
    None
):
    """The paper's overload, served by an engine that admits by blocks and preempts (vLLM), the
    gateway in front admitting with ``predict``: VTC's gap stays under 2U (M = the cache), FCFS
    exceeds it, throughput matches the engine alone and preemptions stay rare."""
    wl = load_workload("overload").truncated(120)
    config = SimConfig(
        profile="a10g-llama2-7b",
        kv_cache_tokens=10_000,
        kv_admission="predict",
        engine_kv_admission="blocks",
    )
    runs = simulate_many(wl, ["direct", "vtc", "fcfs"], config)
    for run in runs.values():
        assert all(r.status == "ok" for r in run.records)
    results = build_results(wl, {p: r.records for p, r in runs.items()}, P, 10_000)
    s = {p: r.summary for p, r in results.policies.items()}
    assert s["vtc"].max_acc_gap < s["vtc"].bound_2u < s["fcfs"].max_acc_gap
    assert s["vtc"].throughput_tok_s >= 0.95 * s["direct"].throughput_tok_s
    assert runs["vtc"].preemptions <= 0.01 * len(runs["vtc"].records)
