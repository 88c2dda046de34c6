"""``vtc-gateway bench scheduler`` on a tiny setting: the table and the JSON shape, no timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main


def test_bench_scheduler_prints_a_row_per_point_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sched.json"
    argv = ["bench", "scheduler", "--tenants", "3,20", "--policies", "vtc,fcfs"]
    assert main([*argv, "--ops", "50", "--repeat", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    points = [(r["policy"], r["tenants"]) for r in doc["results"]]
    assert points == [("vtc", 3), ("vtc", 20), ("fcfs", 3), ("fcfs", 20)]
    for r in doc["results"]:
        assert all(r[k] > 0 for k in ("enqueue_us", "pick_us", "charge_us", "cycle_us"))
        assert f"{r['policy']:<12}{r['tenants']:>9,}" in table
    assert main([*argv, "--ops", "1"]) == 2  # refused, nothing run
