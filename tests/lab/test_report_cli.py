"""results.json shape, markdown, plots and the ``lab`` command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.lab import cli
from gateway.lab import metrics as m
from gateway.lab.report import ProgressBar, build_results, load_json, markdown, write_json
from gateway.lab.workloads import Workload, WorkloadRequest
from gateway.scheduler import Prices

WL = Workload(
    "hand",
    10,
    {"a": 1.0, "b": 2.0},
    [WorkloadRequest(0, "a", 10, 5), WorkloadRequest(1, "b", 10, 5)],
)
RECORDS = [
    m.RequestRecord("a", 0, 2, 6, 10, 5, "ok"),
    m.RequestRecord("b", 1, None, None, 10, 5, "rejected"),
]


def test_results_json_has_exactly_the_documented_shape(tmp_path: Path) -> None:
    results = build_results(WL, {"vtc": RECORDS}, Prices(), 100)
    path = tmp_path / "results.json"
    write_json(results, path)
    doc = json.loads(path.read_text())
    assert set(doc) == {"workload", "duration_s", "prices", "tenants", "policies"}
    assert doc["workload"] == "hand" and doc["duration_s"] == 10
    assert doc["prices"] == {"input": 1, "output": 2}
    assert doc["tenants"] == {"a": {"weight": 1}, "b": {"weight": 2}}
    run = doc["policies"]["vtc"]
    assert set(run) == {"summary", "requests"}
    assert set(run["summary"]) == {
        "max_diff",
        "avg_diff",
        "diff_var",
        "max_acc_gap",
        "bound_2u",
        "throughput_tok_s",
        "rejected",
    }
    assert run["summary"]["rejected"] == 1
    assert run["requests"][1] == {
        "tenant": "b",
        "arrival_s": 1,
        "first_token_s": None,
        "finish_s": None,
        "prompt_tokens": 10,
        "output_tokens": 5,
        "status": "rejected",
        "max_tokens": None,
    }
    again = load_json(path)
    assert again.policies["vtc"].records == RECORDS
    assert again.policies["vtc"].summary == results.policies["vtc"].summary


def test_markdown_table() -> None:
    text = markdown(build_results(WL, {"vtc": RECORDS, "fcfs": RECORDS}, Prices(), 100))
    assert "| policy | Max Diff | Avg Diff | Diff Var |" in text
    assert text.count("\n| vtc |") == 1 and text.count("\n| fcfs |") == 1
    assert "| a | 1 | 2.00 / 2.00 | 20 |" in text  # latency 2 s; 20 tokens served
    assert "| b | 2 | - / - | 0 |" in text


def test_progress_bar_draws_to_stream(tmp_path: Path) -> None:
    out = tmp_path / "bar.txt"
    with out.open("w") as f:
        bar = ProgressBar("x", stream=f, width=10)
        bar(5, 10)
        bar(10, 10)
    text = out.read_text()
    assert "[##########] 10/10\n" in text


def test_register_adds_lab_simulate_and_replay() -> None:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["lab", "simulate", "--workload", "overload", "--policy", "vtc,fcfs", "--duration", "5"]
    )
    assert args.func is cli.run_simulate and args.kv_cache_tokens is None
    assert args.kv_admission is None  # the profile's
    args = parser.parse_args(
        ["lab", "simulate", "--workload", "overload", "--kv-admission", "reserve"]
    )
    assert args.kv_admission == "reserve"
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "simulate", "--workload", "overload", "--kv-admission", "x"])
    args = parser.parse_args(
        ["lab", "replay", "--workload", "overload", "--gateway", "http://x", "--speed", "4"]
    )
    assert args.func is cli.run_replay and args.speed == 4


def test_simulate_command_writes_results_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "two.yaml"
    spec.write_text(
        "name: two\nduration: 20\nclients:\n"
        "  - {name: small, rate: 0.5, prompt_tokens: 64, output_tokens: 64}\n"
        "  - {name: big, rate: 2, weight: 2, prompt_tokens: 256, output_tokens: 256}\n"
    )
    out = tmp_path / "out"
    code = cli.main(
        [
            "simulate",
            "--workload",
            str(spec),
            "--policy",
            "vtc,fcfs",
            "--out",
            str(out),
            "--kv-cache-tokens",
            "4000",
        ]
    )
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["policies"]) == ["vtc", "fcfs"]
    assert doc["tenants"]["big"] == {"weight": 2.0}
    assert doc["policies"]["vtc"]["summary"]["bound_2u"] == 16_000
    for name in ("service_rate.png", "acc_gap.png", "first_token_latency.png"):
        assert (out / name).stat().st_size > 1000
    assert "| vtc |" in (out / "results.md").read_text()
    assert "| fcfs |" in capsys.readouterr().out


def test_simulate_several_workloads_into_subfolders(tmp_path: Path) -> None:
    code = cli.main(
        [
            "simulate",
            "--workload",
            "overload,on_off_less",
            "--policy",
            "vtc",
            "--duration",
            "5",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--quiet",
        ]
    )
    assert code == 0
    assert (tmp_path / "overload" / "results.json").is_file()
    assert (tmp_path / "on_off_less" / "results.json").is_file()


def test_simulate_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["simulate", "--workload", "overload", "--policy", "fair"]) == 2
    assert "unknown policy fair" in capsys.readouterr().err
    assert cli.main(["simulate", "--workload", "overload", "--profile", "tpu"]) == 2
    with pytest.raises(SystemExit, match="unknown workload"):
        cli.main(["simulate", "--workload", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="TENANT=W"):
        cli.main(["simulate", "--workload", "overload", "--weight", "a=-1"])
