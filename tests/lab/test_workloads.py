"""Workload generators: shapes, rates, phases, determinism, user formats."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest

from gateway.lab.workloads import BUILTIN, PAPER_SUITE, load_csv, load_workload, load_yaml

SYNTHETIC = [n for n in PAPER_SUITE if n != "arena_trace"]


def per_tenant(name: str) -> Counter[str]:
    return Counter(r.tenant for r in load_workload(name).requests)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_builtin_is_sorted_deterministic_and_in_range(name: str) -> None:
    wl = load_workload(name)
    assert wl.name == name
    arrivals = [r.arrival_s for r in wl.requests]
    assert arrivals == sorted(arrivals)
    assert arrivals[0] >= 0 and arrivals[-1] < wl.duration_s
    assert {r.tenant for r in wl.requests} <= set(wl.tenants)
    assert load_workload(name).requests == wl.requests
    assert load_workload(name, seed=7).requests != wl.requests


def test_constant_rate_clients() -> None:
    wl = load_workload("overload")
    assert wl.duration_s == 360 and wl.tenants == {"client-1": 1.0, "client-2": 1.0}
    assert per_tenant("overload") == {"client-1": 540, "client-2": 1080}
    assert all(r.prompt_tokens == r.output_tokens == 256 for r in wl.requests)
    c1 = [r.arrival_s for r in wl.requests if r.tenant == "client-1"]
    steps = {round(b - a, 9) for a, b in itertools.pairwise(c1)}
    assert steps == {round(1 / 1.5, 9)}


def test_counts_of_the_other_synthetic_workloads() -> None:
    assert per_tenant("proportional") == {"client-1": 150, "client-2": 300, "client-3": 900}
    multi = per_tenant("overload_multi")
    assert [multi[f"client-{i}"] for i in range(1, 9)] == [144] * 3 + [216] * 5
    wl = load_workload("overload_weighted")
    assert wl.tenants == {"client-1": 1.0, "client-2": 2.0, "client-3": 3.0, "client-4": 4.0}


@pytest.mark.parametrize(("name", "rate"), [("on_off_less", 0.5), ("on_off_overload", 2.0)])
def test_on_off_client_is_silent_in_odd_minutes(name: str, rate: float) -> None:
    wl = load_workload(name)
    c1 = [r.arrival_s for r in wl.requests if r.tenant == "client-1"]
    assert all(int(t // 60) % 2 == 0 for t in c1)
    assert len(c1) == pytest.approx(rate * 300, abs=2)


def test_poisson_short_long_sizes_and_rates() -> None:
    for name, short, long_ in (
        ("poisson_short_long", (64, 64), (256, 256)),
        ("poisson_short_long_2", (512, 32), (32, 512)),
    ):
        wl = load_workload(name)
        sizes = {r.tenant: (r.prompt_tokens, r.output_tokens) for r in wl.requests}
        assert sizes == {"client-1": short, "client-2": long_}
        n = per_tenant(name)
        assert n["client-1"] == pytest.approx(8 * 600, rel=0.05)
        assert n["client-2"] == pytest.approx(1.5 * 600, rel=0.1)
        gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(wl.requests)]
        assert len(set(round(g, 6) for g in gaps)) > len(gaps) // 2  # not constant-rate


def test_increase_ramps_client_2() -> None:
    wl = load_workload("increase")
    c2 = [r.arrival_s for r in wl.requests if r.tenant == "client-2"]
    first = sum(1 for t in c2 if t < 100)
    last = sum(1 for t in c2 if t >= 500)
    assert first == pytest.approx(100 * 0.35, abs=3)  # mean rate over [0, 100): 0.35/s
    assert last == pytest.approx(100 * 1.85, abs=3)  # mean rate over [500, 600): 1.85/s
    assert len(c2) == pytest.approx(0.5 * (0.2 + 2.0) * 600, rel=0.02)


def test_dist_shift_phases() -> None:
    wl = load_workload("dist_shift")
    assert wl.duration_s == 900 and set(wl.tenants) == {"client-1", "client-2"}

    def count(tenant: str, lo: float, hi: float) -> int:
        return sum(1 for r in wl.requests if r.tenant == tenant and lo <= r.arrival_s < hi)

    assert count("client-1", 0, 300) == pytest.approx(0.5 * 180, abs=2)  # on 180 s of 300
    assert count("client-1", 60, 120) == 0
    assert count("client-2", 0, 300) == pytest.approx(600, abs=1)
    assert count("client-1", 300, 600) == count("client-2", 300, 600) == pytest.approx(300, abs=1)
    assert count("client-1", 600, 900) == pytest.approx(150, abs=1)
    assert count("client-2", 600, 900) == pytest.approx(450, abs=1)


def test_truncated_and_weight_override() -> None:
    wl = load_workload("overload", weights={"client-2": 3}).truncated(60)
    assert wl.duration_s == 60 and all(r.arrival_s < 60 for r in wl.requests)
    assert wl.tenants["client-2"] == 3.0


def test_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope")


def test_csv_format(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(
        "arrival_s,tenant,prompt_tokens,output_tokens,extra\n2.5,bob,10,20,x\n0,alice,5,6,y\n"
    )
    wl = load_csv(path, weights={"bob": 2})
    assert wl.name == "mine" and wl.duration_s == 3
    assert [(r.tenant, r.arrival_s) for r in wl.requests] == [("alice", 0.0), ("bob", 2.5)]
    assert wl.tenants == {"alice": 1.0, "bob": 2.0}
    assert load_workload(str(path)).requests == wl.requests
    path.write_text("arrival_s,tenant,prompt_tokens\n1,a,2\n")
    with pytest.raises(ValueError, match="missing column"):
        load_csv(path)
    path.write_text("arrival_s,tenant,prompt_tokens,output_tokens\n1,a,zero,2\n")
    with pytest.raises(ValueError, match=":2: bad row"):
        load_csv(path)


def test_yaml_format(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(
        "duration: 100\nseed: 3\nclients:\n"
        "  - {name: alice, rate: 1, weight: 2}\n"
        "  - {name: bob, rate: 2, arrival: poisson, prompt_tokens: [10, 20], output_tokens: 5,"
        " on_off: 10}\n"
        "  - {name: carol, rate: 0.5, rate_end: 1.5, start: 50}\n"
    )
    wl = load_yaml(path)
    assert wl.name == "mine" and wl.duration_s == 100
    assert wl.tenants == {"alice": 2.0, "bob": 1.0, "carol": 1.0}
    n = Counter(r.tenant for r in wl.requests)
    assert n["alice"] == 100
    assert 50 < n["bob"] < 150
    assert all(10 <= r.prompt_tokens <= 20 for r in wl.requests if r.tenant == "bob")
    assert all(int(r.arrival_s // 10) % 2 == 0 for r in wl.requests if r.tenant == "bob")
    assert all(r.arrival_s >= 50 for r in wl.requests if r.tenant == "carol")
    assert load_workload(str(path)).requests == wl.requests
    assert load_workload(str(path), seed=4).requests != wl.requests


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("clients: []\n", "duration"),
        ("duration: 10\nclients: [{rate: 1, colour: red}]\n", "colour"),
        ("duration: 10\nclients: [{rate: -1}]\n", "rate"),
        ("duration: 10\nclients: [{rate: 1, weight: 0}]\n", "weight"),
        ("duration: 10\nclients: [{rate: 1, prompt_tokens: [5, 2]}]\n", "prompt_tokens"),
        ("duration: 10\nextra: 1\nclients: []\n", "extra"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_yaml(path)


def test_arena_trace_ships_with_the_package() -> None:
    wl = load_workload("arena_trace")
    assert len(wl.requests) == 1500 and len(wl.tenants) == 27
    assert wl.duration_s == 600
    assert max(Counter(r.tenant for r in wl.requests).values()) == 296
    assert "arena_trace" in BUILTIN
