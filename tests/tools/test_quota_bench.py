"""``vtc-gateway bench quota``: its measures on made-up records, and a tiny live run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from gateway.config import parse_config
from tools.bench import register
from tools.quota_bench import (
    DIRECT,
    HEADER,
    QuotaOptions,
    Record,
    gateway_config,
    max_window,
    measured,
    phase_stats,
    quota_benchmark,
    summarize,
    usage_of,
)

pytestmark = pytest.mark.timeout(120)


def test_max_window_counts_a_sliding_window_half_open_at_its_start() -> None:
    pts = [(0.0, 100), (5.0, 50), (9.999, 10), (10.0, 7), (30.0, 1)]
    # (0, 10] holds 50 + 10 + 7; [0, 9.999] holds 160 (the request at 0 leaves at 10)
    assert max_window(pts, 10.0) == 160
    assert max_window(list(reversed(pts)), 10.0) == 160
    assert max_window(pts, 100.0) == 168
    assert max_window([], 10.0) == 0


def test_a_phase_is_measured_over_whole_windows_after_its_first() -> None:
    assert measured(0.0, 30.0, 10.0) == (10.0, 30.0)
    assert measured(30.0, 90.0, 10.0) == (40.0, 90.0)
    assert measured(30.0, 85.0, 10.0) == (40.0, 80.0)  # four whole windows after the first
    assert measured(0.0, 15.0, 10.0) == (0.0, 15.0)  # too short: all of it


def _rec(tenant: str, started: float, tokens: int, status: int = 200) -> Record:
    r = Record(tenant, started - 0.01, status=status, started=started, ended=started + 1)
    r.prompt_tokens, r.completion_tokens = tokens // 2, tokens - tokens // 2
    return r


def test_phase_stats_counts_tokens_by_start_and_ignores_refusals() -> None:
    recs = [
        _rec("a", 10.0, 100),
        _rec("b", 12.0, 300),
        _rec("b", 19.9, 300),
        _rec("a", 20.0, 1000),  # after the phase
        _rec("b", 11.0, 500, status=429),
    ]
    recs[-1].prompt_tokens = recs[-1].completion_tokens = 0
    ps = phase_stats(recs, "a+b", 10.0, 20.0, ["a", "b"], {"a": 1, "b": 3}, 1000, 10.0)
    assert ps.tokens == {"a": 100, "b": 600}
    assert ps.util == pytest.approx(0.7)
    assert ps.shares == pytest.approx({"a": 1 / 7, "b": 6 / 7})
    assert ps.fair == {"a": 0.25, "b": 0.75}


def test_usage_is_read_from_the_last_event_that_carries_one() -> None:
    raw = (
        b'data: {"choices":[{"delta":{"content":"x"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3}}\n\n'
        b"data: [DONE]\n\n"
    )
    assert usage_of(raw) == {"prompt_tokens": 7, "completion_tokens": 3}
    assert usage_of(b"data: [DONE]\n\n") is None


def test_summary_reports_shares_overshoot_and_429s() -> None:
    opts = QuotaOptions(tpm=1000, window_s=10.0, phases=(20.0, 20.0, 20.0))
    recs = [_rec("a", 0.5 + i, 100) for i in range(20)]  # a alone: 100 per second
    recs += [_rec("a", 20.5 + 3 * i, 100) for i in range(7)]
    recs += [_rec("b", 20.5 + i + 0.5, 75) for i in range(19)]
    recs += [_rec("c", 40.5 + i, 50) for i in range(19)]
    refused = Record("c", 41.0, status=429, ended=41.0)
    run = {"records": [*recs, refused], "provider_samples": [(1.0, 900)], "provider": None}
    row = summarize(run, opts, DIRECT)
    a, ab, _ = row["phases"]
    assert (a["start"], a["end"]) == (10.0, 20.0) and a["util"] == pytest.approx(1.0)
    assert ab["tokens"] == {"a": 300, "b": 750}
    assert row["ratio_b_to_a"] == pytest.approx(2.5)
    assert row["client_429"] == 1 and row["client_statuses"] == {"200": 65, "429": 1}
    assert row["provider_max_window_fraction"] == pytest.approx(0.9)
    assert row["max_window_fraction"] >= 1.0
    assert row["requeued"] == 0 and row["provider_429"] is None
    assert [w["start"] for w in row["windows"]] == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    json.dumps(row)


def test_the_gateway_config_is_valid_and_paces_one_quota_backend() -> None:
    opts = QuotaOptions(tpm=5000, window_s=6.0, hold_ms=0)
    cfg = parse_config(gateway_config("http://127.0.0.1:9", opts))
    (backend,) = cfg.backends
    assert (backend.kind, backend.tpm, backend.quota_window_s) == ("openai", 5000, 6.0)
    assert {t.name: t.weight for t in cfg.tenants} == {"a": 1, "b": 3, "c": 1}
    assert cfg.scheduler.policy == "vtc" and cfg.scheduler.hold_ms == 0


def test_registered_as_bench_quota() -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quota", "--tpm", "300", "--phases", "1,2,3"])
    assert args.tpm == 300 and args.phases == (1.0, 2.0, 3.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "quota", "--phases", "1,2"])


async def test_tiny_live_run_direct_and_through_the_gateway() -> None:
    """A few seconds of each path on a small quota: every field is there, the gateway's
    clients see no 429 while the direct ones do."""
    opts = QuotaOptions(
        tpm=1500, window_s=2.0, phases=(2.0, 2.0, 2.0), clients=3, median_output_tokens=16
    )
    lines: list[str] = []
    results = await quota_benchmark(opts, lines.append)
    json.dumps(results)
    direct, gw = results["runs"]
    assert (direct["path"], gw["path"]) == ("direct", "gateway")
    assert direct["client_429"] > 0 and direct["client_429"] == direct["provider_429"]
    assert gw["client_429"] == 0 and gw["requests_ok"] > 0
    assert gw["requeued"] == gw["provider_429"]
    assert gw["provider_max_window_fraction"] <= 1.0
    assert len(lines) == 8 and lines[0].split()[:2] == ["direct", "a"]
    assert HEADER.split()[:2] == ["path", "phase"]


def test_litellm_side_by_side_skips_without_litellm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.litellm_quota import main

    assert main(["--venv", str(tmp_path / "none"), "--paths", "litellm-teams"]) == 0
    assert "skipped: LiteLLM is not installed" in capsys.readouterr().out
    assert main(["--venv", str(tmp_path / "none"), "--paths", "nginx"]) == 2


def test_litellm_configs_split_the_quota_by_weight_or_by_priority() -> None:
    from tools.litellm_quota import DYNAMIC, TEAMS, litellm_config, team_limits

    opts = QuotaOptions(tpm=5000)
    teams = team_limits(opts, TEAMS)
    assert {k: v["tpm"] for k, v in teams.items()} == {
        "quota-key-a": 1000,
        "quota-key-b": 3000,
        "quota-key-c": 1000,
    }
    assert all("tpm" not in v for v in team_limits(opts, DYNAMIC).values())
    cfg = litellm_config("http://127.0.0.1:9", opts, DYNAMIC)
    (deployment,) = cfg["model_list"]
    assert deployment["litellm_params"]["tpm"] == 5000
    assert cfg["litellm_settings"]["callbacks"] == ["dynamic_rate_limiter_v3"]
    assert cfg["litellm_settings"]["priority_reservation"] == {"a": 0.2, "b": 0.6, "c": 0.2}
    assert "callbacks" not in litellm_config("http://x", opts, TEAMS)["litellm_settings"]
