"""``python -m tools.predictor_eval``: the online replay, the estimators' coverage where lengths
vary by tenant, the lab harness and the verdict (no torch needed)."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest

from tools import predictor_eval as pe

pytestmark = pytest.mark.timeout(60)


def two_tenants() -> list[pe.Request]:
    """A short tenant (median 50 tokens) sending four times as often as a long one (800)."""
    return pe.synthetic_trace(
        (
            pe.SyntheticTenant("short", 2.0, (16, 512), 0.5, median=50),
            pe.SyntheticTenant("long", 0.5, (16, 512), 0.5, median=800),
        ),
        duration_s=1200.0,
    )


def test_per_tenant_p90_covers_every_tenant_where_a_global_one_misses_the_long_one() -> None:
    res = pe.evaluate(two_tenants(), [pe.GlobalP90(), pe.TenantP90()])
    tenant, glob = res["tenant"], res["global"]
    assert 0.85 <= tenant["coverage"] <= 0.95
    assert tenant["per_tenant"]["long"]["coverage"] >= 0.8
    assert tenant["per_tenant"]["short"]["coverage"] >= 0.8
    # everyone's p90 sits inside the long tenant's lengths and far above the short one's
    assert glob["per_tenant"]["long"]["coverage"] < 0.7
    assert glob["worst_tenant"] == "long"
    assert glob["per_tenant"]["short"]["planned"] > 5 * tenant["per_tenant"]["short"]["planned"]
    assert pe.beats(tenant, glob) and not pe.beats(glob, tenant)


def test_a_prediction_sees_only_requests_finished_before_its_arrival() -> None:
    first = pe.Request(0.0, "a", 10, 100)  # finishes at 100 * 0.02 = 2 s
    early, late = pe.Request(1.0, "a", 10, 5), pe.Request(3.0, "a", 10, 5)
    res = pe.evaluate([first, early, late], [pe.TenantP90()], skip=0.0)
    # nothing finished at 1 s: the prior; at 3 s one length of 100: twice it, below the prior
    assert res["tenant"]["planned"] == pytest.approx((1024 + 1024 + 200) / 3)


def test_prompt_buckets_separate_short_and_long_prompts_of_one_tenant() -> None:
    est = pe.TenantPromptP90()
    for i in range(pe.MIN_SAMPLES):
        est.observe(i, "t", 20, 30)
        est.observe(100 + i, "t", 2000, 900)
    assert est.predict(0, "t", 30, 4000) == 30
    assert est.predict(1, "t", 1500, 4000) == 900
    assert est.predict(2, "other", 30, 4000) == 900  # everyone's p90


def test_estimator_plugged_into_the_core_reproduces_the_shipped_lab_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace = pe.synthetic_trace(duration_s=60.0)
    patched = pe.lab_compare("s", trace, lambda: [pe.TenantP90(), pe.GlobalP90()])
    monkeypatch.setattr(pe, "_estimator_in_core", lambda est: nullcontext([]))
    shipped = pe.lab_compare("s", trace, lambda: [pe.TenantP90()])
    assert [r["path"] for r in patched] == ["direct", "tenant", "global"]
    keys = ("output_tok_s", "preemptions", "latency_p50", "end_s")
    assert {k: patched[1][k] for k in keys} == {k: shipped[1][k] for k in keys}
    assert patched[2]["end_s"] != patched[1]["end_s"]  # the estimator is in use


def test_verdict_needs_a_learned_variant_to_beat_the_shipped_one_on_every_trace() -> None:
    base = {"coverage": 0.9, "over_plan": 200.0}
    good = {"coverage": 0.93, "over_plan": 190.0}
    cheap = {"coverage": 0.895, "over_plan": 150.0}
    bad = {"coverage": 0.8, "over_plan": 150.0}
    assert pe.beats(good, base) and pe.beats(cheap, base) and not pe.beats(bad, base)
    one = pe.verdict(
        {"x": {"tenant": base, "learned": good}, "y": {"tenant": base, "learned": bad}}
    )
    assert one["winner"] == "tenant" and one["beats_tenant"] == {"x": ["learned"], "y": []}
    both = pe.verdict(
        {"x": {"tenant": base, "learned": good}, "y": {"tenant": base, "learned": cheap}}
    )
    assert both["winner"] == "learned"
    assert pe.verdict({"x": {"tenant": base, "global": good}})["winner"] == "tenant"


def test_main_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pred.json"
    assert pe.main(["--trace", "synthetic", "--no-learned", "--no-lab", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["offline"]["synthetic"]
    assert set(rows) == {"global", "tenant", "tenant+prompt"}
    assert all(0.0 < r["coverage"] <= 1.0 and not math.isnan(r["planned"]) for r in rows.values())
    assert doc["verdict"]["winner"] == "tenant" and doc["lab"] == []
    assert "| synthetic | tenant |" in capsys.readouterr().out
