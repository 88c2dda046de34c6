"""``vtc-gateway bench live-diff``: scenarios, expected shares, verdicts, the decision trace, and
one short live run of the issue's case against the lab."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from gateway.core import DispatchCore
from tools.bench import register
from tools.live_diff import (
    LiveOptions,
    Scenario,
    TenantSpec,
    backlogged,
    disagreement,
    expected_shares,
    fair_slots,
    generate,
    issue_scenario,
    off_weights,
    run_lab,
    run_live,
    summarize_events,
)

from ..cluster.conftest import redis_binary


def test_scenarios_are_seeded_and_within_the_ranges() -> None:
    seen = set()
    for seed in range(1, 201):
        sc = generate(seed)
        assert sc == generate(seed)
        seen.add(sc)
        assert 2 <= len(sc.tenants) <= 4 and 4 <= sc.slots <= 32
        total = sum(t.weight for t in sc.tenants)
        for t in sc.tenants:
            assert t.weight in (1, 2, 3, 4)
            share = sc.slots * t.weight / total
            assert max(1, round(0.5 * share)) <= t.concurrency <= max(1, round(3 * share))
            assert 0 <= t.think[0] <= t.think[1] <= 0.03
    assert len(seen) == 200
    assert any(isinstance(t.output_tokens, tuple) for s in seen for t in s.tenants)
    assert any(isinstance(t.output_tokens, int) for s in seen for t in s.tenants)


def _sc(slots: int, *tenants: tuple[str, float, int, int, int]) -> Scenario:
    return Scenario(0, slots, tuple(TenantSpec(n, w, c, p, o) for n, w, c, p, o in tenants))


def test_expected_shares_follow_the_weights_when_everyone_floods() -> None:
    sc = _sc(8, ("a", 1, 20, 100, 100), ("b", 3, 20, 100, 100))
    assert expected_shares(sc) == pytest.approx({"a": 0.25, "b": 0.75})
    assert backlogged(sc) == {"a": True, "b": True}


def test_a_tenant_asking_for_less_than_its_share_gets_what_it_asks() -> None:
    sc = _sc(10, ("a", 1, 2, 100, 100), ("b", 1, 20, 100, 100))
    assert fair_slots(sc) == pytest.approx({"a": 2.0, "b": 8.0})
    assert expected_shares(sc) == pytest.approx({"a": 0.2, "b": 0.8})
    assert backlogged(sc) == {"a": False, "b": True}


def test_equal_service_per_weight_is_not_equal_slots() -> None:
    """a's requests yield 3 priced tokens per output token, b's 7/3: equal service needs
    fewer slots for a."""
    sc = _sc(10, ("a", 1, 20, 100, 100), ("b", 1, 20, 100, 300))
    slots = fair_slots(sc)
    assert slots["a"] * 3 == pytest.approx(slots["b"] * 7 / 3)
    assert sum(slots.values()) == pytest.approx(10)
    assert expected_shares(sc) == pytest.approx({"a": 0.5, "b": 0.5})


def test_nobody_waits_when_the_slots_cover_every_client() -> None:
    sc = _sc(16, ("a", 1, 3, 100, 100), ("b", 4, 5, 100, 100))
    assert fair_slots(sc) == {"a": 3.0, "b": 5.0}
    assert backlogged(sc) == {"a": False, "b": False}


def test_verdicts() -> None:
    sc = _sc(10, ("a", 1, 2, 100, 100), ("b", 1, 20, 100, 100), ("c", 2, 20, 100, 100))
    exp = expected_shares(sc)
    assert off_weights(exp, sc) == pytest.approx(0)
    more_b = {"a": exp["a"], "b": exp["b"] * 1.1, "c": exp["c"] - exp["b"] * 0.1}
    assert off_weights(more_b, sc) > 0.1  # b got 10 % more than its due, c less
    short_a = {"a": exp["a"] * 0.8, "b": exp["b"] + exp["a"] * 0.1, "c": exp["c"]}
    short_a["c"] += exp["a"] * 0.1
    assert off_weights(short_a, sc) == pytest.approx(0.2, abs=0.01)  # a fell short by 20 %
    assert disagreement({"a": 0.2, "b": 0.8}, {"a": 0.25, "b": 0.75}) == pytest.approx(0.2)


def test_decision_counts_per_tenant_in_a_window() -> None:
    events = [
        ("arrive", 0.5, "a", 1, 1, 100.0, -1.0),  # before the window
        ("grant", 1.0, "a"),
        ("release", 2.0, "a", 1),
        ("hold", 2.01, "a", 1),
        ("arrive", 2.01, "a", 1, 0, 0.0, 0.01),
        ("arrive", 2.5, "b", 0, 1, 40.0, 0.03),
        ("hold", 3.0, "b", 0),
    ]
    got = summarize_events(events, 1.0, 3.0, scale=2.0)
    assert got["a"]["arrivals"] == 1 and got["a"]["to_empty"] == 1 and got["a"]["lifts"] == 0
    assert got["a"]["grants"] == got["a"]["releases"] == got["a"]["expected"] == 1
    assert got["a"]["holds"] == got["a"]["holds_used"] == 1
    assert got["a"]["gap_p50_ms"] == pytest.approx(20.0)  # 10 ms of core time at speed 2
    assert got["b"]["lifts"] == 1 and got["b"]["lifted"] == 40
    assert got["b"]["holds"] == 1 and got["b"]["holds_used"] == 0


def test_the_lab_run_records_decisions_and_leaves_the_core_as_it_was() -> None:
    before = DispatchCore.submit
    res = run_lab(issue_scenario(), "vtc", 30.0, trace=True)
    assert DispatchCore.submit is before
    a, b = res.trace["a"], res.trace["b"]
    assert a["arrivals"] > 0 and b["arrivals"] > a["arrivals"]
    assert b["holds"] > 0 and b["holds_used"] == b["holds"]  # every held slot was taken
    assert a["lifts"] == b["lifts"] == 0  # after the start-up, nobody is lifted
    assert off_weights(res.shares, issue_scenario()) < 0.1


def test_the_command_prints_the_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "rows.json"
    argv = ["bench", "live-diff", "--seeds", "1,2", "--lab-only", "--duration", "20"]
    args = parser.parse_args([*argv, "--out", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "| seed | scenario |" in text and "2 of 2 scenarios within 10 %" in text
    rows = json.loads(out.read_text())
    assert [r["seed"] for r in rows] == [1, 2] and all(r["ok"] for r in rows)
    assert rows[0]["live"] is None and rows[0]["lab_off"] < 0.1


#: The busy-tenant rules need ``hold_ms`` above the clients' turnaround as the gateway sees it;
#: at a load average of 6 on 2 cores that reached 95 ms (p90) and the default 50 ms let holds
#: lapse (one run in four 50 % off), so the test gives it room, as the README advises (and as
#: ``tests/gateway/test_e2e_closed_loop.py`` does); the lab's result does not depend on it.
HOLD_MS = 1000.0


@pytest.mark.timeout(240)
def test_live_shares_match_the_lab_and_the_weights() -> None:
    """Issue 21's case, live: the simulated backend, the gateway and 32 streaming clients in
    three processes for 24 s, against the lab on the same population. Before the busy-tenant
    charge at dispatch both gave the weight-4 tenant about 0.74 of the service instead of
    0.80 (39 % off); the margins here are the issue's 10 % (measured on the 2-core machine:
    within 1 % of the lab and of the weights when quiet, within 3 % at a load average of 6-8)."""
    sc = issue_scenario()
    live = run_live(sc, LiveOptions("vtc", duration=24.0, hold_ms=HOLD_MS))
    lab = run_lab(sc, "vtc", 24.0, hold_ms=HOLD_MS)
    assert live.extra["errors"] == 0
    assert off_weights(lab.shares, sc) < 0.1, lab.shares
    assert off_weights(live.shares, sc) < 0.1, live.shares
    assert disagreement(live.shares, lab.shares) < 0.1, (live.shares, lab.shares)
    assert live.trace["b"]["holds_used"] > 0  # the trace came back from the gateway process


#: Across replicas the busy tenant is over-served with a long hold (b 0.815-0.817 of 0.8 at
#: 1,000 ms; one run in two at 300 ms) and a's small share is noisy over short runs (slots of
#: one size free in bursts of 16 every ~1.75 s, split 3/13 or 4/12): at 200 ms over 30 s, b
#: got 0.797-0.806 in three runs.
CLUSTER_HOLD_MS = 200.0


@pytest.mark.timeout(300)
def test_two_replicas_keep_the_weights_live() -> None:
    """The same case with the two tenants at two gateways sharing a Redis (a at one, b at the
    other). Before a claim had to leave room for every request waiting ahead of it (not one
    per tenant ahead), and before a replica claimed the slots held for its tenants' expected
    requests in one round trip with the release, the weight-4 tenant got 0.63-0.70 of the
    service (measured: 0.80 within 1 % on the quiet machine)."""
    redis_binary()
    sc = dataclasses.replace(issue_scenario(), replicas=2)
    live = run_live(sc, LiveOptions("vtc", duration=30.0, hold_ms=CLUSTER_HOLD_MS))
    assert live.extra["errors"] == 0
    assert off_weights(live.shares, sc) < 0.1, live.shares
