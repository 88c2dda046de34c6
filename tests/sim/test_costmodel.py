"""The cost model is a pure function; profiles carry DESIGN.md's coefficients."""

from __future__ import annotations

import math

import pytest

from backends.sim.costmodel import PROFILES, CostModel, get_profile


def test_floor_regime_for_small_batches() -> None:
    cm = CostModel(l_floor=0.010, a=0.002, b=1e-5)
    assert cm.step_time(1) == pytest.approx(0.010)
    assert cm.step_time(100) == pytest.approx(0.010)  # 0.002 + 0.001 < floor


def test_compute_regime_for_large_batches() -> None:
    cm = CostModel(l_floor=0.010, a=0.002, b=1e-5)
    assert cm.step_time(2000) == pytest.approx(0.002 + 2000 * 1e-5)


def test_context_and_overhead_terms_add() -> None:
    cm = CostModel(l_floor=0.010, a=0.002, b=1e-5, k=1e-7, overhead=0.001)
    assert cm.step_time(10, decode_context_tokens=5000) == pytest.approx(0.010 + 5e-4 + 0.001)


def test_no_tokens_takes_no_time() -> None:
    assert CostModel(l_floor=0.01, a=0.0, b=0.0, overhead=0.5).step_time(0, 100) == 0.0


def test_monotone_in_tokens_and_context() -> None:
    cm = get_profile("a100-llama3-8b").cost
    times = [cm.step_time(n, 10 * n) for n in range(1, 5000, 97)]
    assert times == sorted(times)


@pytest.mark.parametrize("field", ["l_floor", "a", "b", "k", "overhead"])
def test_rejects_negative_or_nan(field: str) -> None:
    kw = {"l_floor": 0.01, "a": 0.0, "b": 0.0, field: -1.0}
    with pytest.raises(ValueError, match=field):
        CostModel(**kw)
    kw[field] = math.nan
    with pytest.raises(ValueError, match=field):
        CostModel(**kw)


def test_design_coefficients() -> None:
    h = get_profile("h100-llama2-7b").cost
    assert (h.l_floor, h.a, h.b) == pytest.approx((5.8e-3, 2.9e-3, 20.2e-6))
    a = get_profile("a100-llama3-8b").cost
    assert (a.l_floor, a.a, a.b, a.k) == pytest.approx((10.5e-3, 7.0e-3, 66.4e-6, 80e-9))
    assert get_profile("h100-llama3-8b").cost.k == pytest.approx(49e-9)


def test_paper_profile_models_the_paper_engine() -> None:
    p = get_profile("a10g-llama2-7b")
    assert p.kv_cache_tokens == 10_000
    assert p.admit_every_n_steps == 10
    assert p.kv_admission == "peak" and p.block_size == 1  # S-LoRA: token-level pool


def test_profiles_and_unknown_name() -> None:
    assert {"h100-llama3-8b", "a100-llama3-8b", "h100-llama2-7b", "a10g-llama2-7b"} <= set(PROFILES)
    with pytest.raises(KeyError, match="known profiles"):
        get_profile("tpu-v9")


def test_scaled() -> None:
    cm = CostModel(l_floor=0.01, a=0.002, b=1e-5, k=1e-7, overhead=1e-3)
    assert cm.scaled(2.0).step_time(7, 100) == pytest.approx(2 * cm.step_time(7, 100))
