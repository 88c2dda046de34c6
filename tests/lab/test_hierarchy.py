"""The lab with a tenant tree, in virtual time: ``closed_orgs`` (org A weight 3 with teams a1,
a2; org B weight 1 with team b; 8 closed-loop clients each on 8 slots; a2 stops halfway)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.lab.metrics import level_shares
from gateway.lab.plots import plot_all
from gateway.lab.report import build_results, load_json, markdown, write_json
from gateway.lab.simulate import SimConfig, simulate
from gateway.lab.workloads import load_workload
from gateway.scheduler import Prices

PRICES = Prices()


def test_orgs_share_3_8_3_8_2_8_and_a1_takes_over_a2s_part() -> None:
    wl = load_workload("closed_orgs")
    run = simulate(wl, "vtc", SimConfig(hold_s=0.02))
    paths = wl.paths()
    assert paths == {"a1": "org-a/a1", "a2": "org-a/a2", "b": "org-b/b"}
    all3 = level_shares(run.records, paths, 15, 150, PRICES)
    assert all3[1] == pytest.approx({"org-a": 3 / 4, "org-b": 1 / 4}, rel=0.1)
    assert all3[2] == pytest.approx(
        {"org-a/a1": 3 / 8, "org-a/a2": 3 / 8, "org-b/b": 2 / 8}, rel=0.1
    )
    two = level_shares(run.records, paths, 180, 300, PRICES)
    assert two[2]["org-a/a2"] == 0
    assert two[2]["org-a/a1"] == pytest.approx(3 / 4, rel=0.1)
    assert two[1] == pytest.approx({"org-a": 3 / 4, "org-b": 1 / 4}, rel=0.1)


def test_flat_fcfs_does_not_give_the_tree_shares() -> None:
    """Control: the same clients under fcfs split the slots by client count (1/3 each)."""
    wl = load_workload("closed_orgs")
    run = simulate(wl, "fcfs", SimConfig(hold_s=0.02))
    all3 = level_shares(run.records, wl.paths(), 15, 150, PRICES)
    assert all3[2]["org-b/b"] > 0.3


def test_a_workload_file_with_a_tenant_tree(tmp_path: Path) -> None:
    spec = tmp_path / "orgs.yaml"
    spec.write_text(
        """
duration: 120
max_num_seqs: 4
tenants:
  - name: org-a
    weight: 3
    tenants: [{name: a1}, {name: a2, max_in_flight: 1}]
  - {name: org-b, tier: batch, tenants: [{name: b}]}
clients:
  - {name: a1, concurrency: 4, prompt_tokens: 64, output_tokens: 64}
  - {name: a2, concurrency: 4, prompt_tokens: 64, output_tokens: 64}
  - {name: b, concurrency: 4, prompt_tokens: 64, output_tokens: 64}
"""
    )
    wl = load_workload(str(spec))
    assert [n.path for n in wl.tree] == ["org-a", "org-a/a1", "org-a/a2", "org-b", "org-b/b"]
    run = simulate(wl, "vtc", SimConfig(hold_s=0.02))
    shares = level_shares(run.records, wl.paths(), 12, 120, PRICES)
    # b is batch: served only while no interactive request waits (a1 and a2 keep 8 waiting
    # or running on 4 slots); a2 runs one at a time (its cap), a1 takes the rest
    assert shares[1]["org-b"] < 0.05
    assert shares[2]["org-a/a2"] == pytest.approx(1 / 4, abs=0.05)
    results = build_results(wl, {"vtc": run.records}, PRICES, 10_000)
    text = markdown(results)
    assert "per level of the tenant tree" in text and "| 2 | org-a/a2 |" in text
    write_json(results, tmp_path / "r.json")
    assert load_json(tmp_path / "r.json").paths == wl.paths()
    figures = plot_all(results, tmp_path)
    assert figures[-1].name == "service_per_level.png" and figures[-1].stat().st_size > 0


def test_a_bad_tree_in_a_workload_file_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "duration: 10\ntenants: [{name: o, tenants: [{name: t, tier: batch}]}]\n"
        "clients: [{name: t, concurrency: 1}]\n"
    )
    with pytest.raises(ValueError, match=r"tenants\[0\]\.tenants\[0\]\.tier"):
        load_workload(str(spec))
