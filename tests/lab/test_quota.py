"""The lab's quota workload: three teams on a hosted API's tokens per minute, in virtual time,
through the gateway's own dispatch core and rate budget (``gateway.lab.quota``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import gateway.lab.quota as quota_mod
from gateway.lab.cli import main
from gateway.lab.metrics import RequestRecord
from gateway.lab.quota import QuotaRun, max_window, measured, phase_bounds, quota_summary
from gateway.lab.report import LabResults, build_results, load_json, markdown, write_json
from gateway.lab.simulate import SimConfig, SimResult, simulate
from gateway.lab.workloads import Workload, load_workload
from gateway.scheduler import Prices

#: The live bench's provider profile (the simulator's default), so lab and live agree.
PROFILE = "h100-llama3-8b"


def _run(policy: str, wl: Workload | None = None) -> tuple[SimResult, dict[str, Any]]:
    wl = wl or load_workload("quota")
    res = simulate(wl, policy, SimConfig(profile=PROFILE))
    assert wl.quota_tpm is not None
    return res, quota_summary(
        res.records, wl.tenants, wl.quota_tpm, wl.quota_window_s, wl.duration_s
    )


@pytest.fixture(scope="module")
def vtc() -> tuple[SimResult, dict[str, Any]]:
    return _run("vtc")


def test_vtc_uses_the_whole_quota_and_splits_it_by_weight(
    vtc: tuple[SimResult, dict[str, Any]],
) -> None:
    res, s = vtc
    alone, ab, abc = s["phases"]
    assert list(alone["tokens"]) == ["a"] and alone["util"] >= 0.95
    ratio = ab["tokens"]["b"] / ab["tokens"]["a"]
    assert abs(ratio / 3 - 1) <= 0.05, ab
    assert ab["util"] >= 0.95
    for t, fair in abc["fair"].items():
        assert abs(abc["shares"][t] / fair - 1) <= 0.1, abc
    assert abc["util"] >= 0.95
    # c arrives late: lifted to the others' level at once (not starved, no catch-up burst)
    first = s["last_first_window"]
    assert 0.15 <= first["shares"]["c"] <= 0.25, first
    # the provider never held more than the quota in any window; what it refused the gateway
    # requeued, and every client got its answer
    assert s["max_window_fraction"] <= 1.02
    assert s["refusals"] > 0
    assert {r.status for r in res.records} == {"ok"}
    assert all(r.dispatch_s is not None for r in res.records)


def test_fcfs_on_the_same_quota_ignores_the_weights() -> None:
    _, s = _run("fcfs")
    ab = s["phases"][1]
    assert 0.8 <= ab["tokens"]["b"] / ab["tokens"]["a"] <= 1.25  # by clients, not by weights
    assert ab["util"] >= 0.95


def test_the_budget_books_only_requests_that_were_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot held for a resubmitting tenant books the rate budget while it waits; when the
    hold ends the booking must go, or the window fills with requests nobody sent."""
    runs: list[QuotaRun] = []

    class Captured(QuotaRun):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            runs.append(self)

    monkeypatch.setattr(quota_mod, "QuotaRun", Captured)
    wl = replace(load_workload("quota"), duration_s=240)
    res, _ = _run("vtc", wl)
    (run,) = runs
    assert run.core.holds_total > 0  # the case happened
    quota = run.quota
    quota.fits(0)  # forget what left the window
    recent = [r for r in res.records if r.dispatch_s is not None and r.dispatch_s > run.now - 60.0]
    assert quota.requests == len(recent)
    assert quota.used == sum(r.prompt_tokens + r.output_tokens for r in recent)


def test_measures_on_made_up_records() -> None:
    def rec(tenant: str, arrival: float, dispatch: float, tokens: int) -> RequestRecord:
        return RequestRecord(tenant, arrival, None, None, tokens, 0, dispatch_s=dispatch)

    recs = [rec("a", 0.0, 0.5, 50), rec("a", 1.0, 5.0, 40), rec("b", 10.0, 10.5, 30)]
    assert phase_bounds(recs, 30.0) == [(0.0, 10.0), (10.0, 30.0)]
    assert measured(10.0, 30.0, 10.0) == (20.0, 30.0)
    assert max_window([(r.dispatch_s or 0.0, r.prompt_tokens) for r in recs], 10.0) == 90
    s = quota_summary(recs, {"a": 1.0, "b": 3.0}, 100, 10.0, 30.0)
    assert s["max_window_fraction"] == 0.9 and s["requests"] == 3
    assert [p["fair"] for p in s["phases"]] == [{"a": 1.0}, {"a": 0.25, "b": 0.75}]


def test_results_carry_the_quota_through_json_markdown_and_plots(tmp_path: Path) -> None:
    wl = replace(load_workload("quota"), duration_s=180)
    res = simulate(wl, "vtc", SimConfig(profile=PROFILE))
    results = build_results(wl, {"vtc": res.records}, Prices(1, 1), 1 << 20)
    assert results.quota == {"tpm": 60000.0, "window_s": 60.0}
    write_json(results, tmp_path / "r.json")
    back = load_json(tmp_path / "r.json")
    assert isinstance(back, LabResults) and back.quota == results.quota
    assert back.policies["vtc"].records[5].dispatch_s == res.records[5].dispatch_s
    table = markdown(back)
    assert "| vtc | a |" in table and "max window" in table


def test_lab_simulate_runs_the_quota_workload_with_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "q"
    rc = main(
        [
            "simulate",
            *("--workload", "quota", "--duration", "200", "--policy", "vtc"),
            *("--profile", PROFILE, "--quota-tpm", "30000", "--quota-window-s", "30"),
            *("--out", str(out), "--quiet"),
        ]
    )
    assert rc == 0
    results = load_json(out / "results.json")
    assert results.quota == {"tpm": 30000.0, "window_s": 30.0}
    assert (out / "quota.png").stat().st_size > 0
    assert "Quota: 30000 tokens per 30 s" in (out / "results.md").read_text()
