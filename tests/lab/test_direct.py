"""The ``direct`` baseline (the engine alone) and clients without ``max_tokens``, in the lab."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.lab import cli
from gateway.lab import metrics as m
from gateway.lab.simulate import DIRECT, SimConfig, SimResult, simulate
from gateway.lab.workloads import ClosedClient, Workload, WorkloadRequest, load_workload

#: vLLM-like engine (block admission, preemption) with a 32k context behind the gateway's
#: strict reserve admission.
LONG = SimConfig(
    profile="h100-llama3-8b",
    max_model_len=32_768,
    engine_kv_admission="blocks",
    kv_admission="reserve",
)


def output_rate(res: SimResult, duration: float) -> float:
    done = [r for r in res.records if m.served(r)]
    return sum(r.output_tokens for r in done) / m.run_time(res.records, duration)


def most_streaming(records: Sequence[m.RequestRecord]) -> int:
    """Most requests streaming at once (between first token and finish)."""
    events = []
    for r in records:
        if r.first_token_s is not None and r.finish_s is not None:
            events += [(r.first_token_s, 1), (r.finish_s, -1)]
    most = n = 0
    for _, d in sorted(events, key=lambda e: (e[0], e[1])):
        n += d
        most = max(most, n)
    return most


@pytest.fixture(scope="module")
def sdk_runs() -> dict[str, SimResult]:
    wl = load_workload("sdk_mix").truncated(30)
    return {p: simulate(wl, p, LONG) for p in (DIRECT, "fcfs", "vtc")}


def test_direct_serves_every_request_and_outruns_the_reserving_gateway(
    sdk_runs: dict[str, SimResult],
) -> None:
    direct = sdk_runs[DIRECT]
    assert direct.records and all(r.status == "ok" for r in direct.records)
    assert all(r.finish_s is not None for r in direct.records)
    rates = {p: output_rate(res, 30) for p, res in sdk_runs.items()}
    # 60 % of the clients book the rest of a 32k context under reserve: far fewer run
    assert rates[DIRECT] > 1.5 * rates["fcfs"]
    assert rates[DIRECT] > 1.5 * rates["vtc"]
    assert most_streaming(direct.records) == 96  # every client's request runs at once


def test_sdk_mix_requests_carry_what_their_clients_sent(sdk_runs: dict[str, SimResult]) -> None:
    records = sdk_runs[DIRECT].records
    sent = [r.max_tokens for r in records]
    assert 0.5 < sent.count(None) / len(sent) < 0.7
    assert 0.2 < sent.count(4096) / len(sent) < 0.4
    tight = [r for r in records if r.max_tokens not in (None, 4096)]
    assert tight and all(r.max_tokens == r.output_tokens for r in tight)
    assert all(r.output_tokens <= 4096 for r in records if r.max_tokens == 4096)


def test_a_request_without_max_tokens_books_the_rest_of_the_context() -> None:
    # every request leaves max_tokens unset: the gateway books prompt + the rest of the 32k
    # context, so 450k KV tokens hold 13 of them; the engine alone runs all 40
    reqs = [WorkloadRequest(0.01 * i, "a", 500, 200, None) for i in range(40)]
    wl = Workload("unset", 10, {"a": 1.0}, reqs)
    gated = simulate(wl, "vtc", LONG)
    alone = simulate(wl, DIRECT, LONG)
    assert most_streaming(gated.records) == 450_000 // 32_768
    assert most_streaming(alone.records) == 40
    for res in (gated, alone):
        assert [r.status for r in res.records] == ["ok"] * 40
        assert all(r.output_tokens == 200 and r.max_tokens is None for r in res.records)


def test_direct_leaves_the_backlog_in_the_engines_own_queue() -> None:
    # 4.5 requests/s of 256/256 on 4 sequences: a backlog builds
    wl = load_workload("overload").truncated(60)
    config = SimConfig(profile="h100-llama3-8b", max_num_seqs=4, kv_admission="reserve")
    alone = simulate(wl, DIRECT, config)
    gated = simulate(wl, "fcfs", config)
    assert alone.max_engine_waiting > 10  # everything was handed over at arrival
    assert gated.max_engine_waiting <= 1  # the gateway holds its queue
    assert all(r.status == "ok" for r in alone.records)
    # the same engine serves the same FCFS order: equal work either way
    assert sum(r.output_tokens for r in alone.records) == sum(
        r.output_tokens for r in gated.records
    )


def test_output_is_capped_by_the_context_and_an_oversized_prompt_is_an_error() -> None:
    reqs = [
        WorkloadRequest(0.0, "a", 4_000, 500, None),  # unset: the 96 tokens left
        WorkloadRequest(0.5, "a", 4_000, 500),  # exact 500: lowered to fit, as vLLM does
        WorkloadRequest(1.0, "a", 3_000, 50, 2_000),  # a generous cap: its own 50 tokens
        WorkloadRequest(1.5, "a", 5_000, 10, None),  # longer than the context: 400
    ]
    wl = Workload("ctx", 5, {"a": 1.0}, reqs)
    config = SimConfig(profile="a10g-llama2-7b", kv_cache_tokens=10_000)
    for policy in (DIRECT, "vtc"):
        res = simulate(wl, policy, config)
        assert [r.status for r in res.records] == ["ok", "ok", "ok", "error"]
        assert [r.output_tokens for r in res.records[:3]] == [96, 96, 50]
        assert [r.max_tokens for r in res.records] == [None, 500, 2_000, None]


def test_direct_has_no_replicas() -> None:
    wl = Workload("one", 5, {"a": 1.0}, [WorkloadRequest(0.0, "a", 10, 10)])
    with pytest.raises(ValueError, match="no replicas"):
        simulate(wl, DIRECT, SimConfig(replicas=2))


def test_engine_admission_follows_the_gateway_unless_told() -> None:
    assert SimConfig(kv_admission="reserve").engine_config()[1].kv_admission == "reserve"
    assert SimConfig(profile="h100-llama3-8b").engine_config()[1].kv_admission == "blocks"
    cfg = SimConfig(profile="h100-llama3-8b", kv_admission="peak", engine_kv_admission="blocks")
    assert cfg.engine_config()[1].kv_admission == "blocks" and cfg.gateway_admission() == "peak"
    assert (
        SimConfig(profile="h100-llama3-8b", max_model_len=131_072).engine_config()[1].max_model_len
        == 131_072
    )


def test_closed_client_with_unset_max_tokens_runs_in_the_cli(tmp_path: Path) -> None:
    spec = tmp_path / "sdk.yaml"
    spec.write_text(
        "name: sdk\nduration: 20\nclients:\n"
        "  - {name: a, concurrency: 8, prompt_tokens: [100, 1500],\n"
        "     output_tokens: {median: 64}, max_tokens: none}\n"
    )
    out = tmp_path / "out"
    argv = ["simulate", "--workload", str(spec), "--policy", "direct,vtc", "--out", str(out)]
    argv += ["--profile", "h100-llama3-8b", "--max-model-len", "131072", "--no-plots", "--quiet"]
    argv += ["--engine-kv-admission", "blocks", "--kv-admission", "reserve"]
    assert cli.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["policies"]) == [DIRECT, "vtc"]
    assert all(body["preemptions"] == 0 for body in doc["policies"].values())
    assert all(r["max_tokens"] is None for r in doc["policies"]["vtc"]["requests"])
    table = (out / "results.md").read_text()
    assert "| policy | output tok/s | vs direct |" in table
    rows = table.split("| policy | output tok/s | vs direct |")[1].splitlines()
    assert rows[2].startswith("| direct | ") and "| 1.00 |" in rows[2]
    assert rows[3].startswith("| vtc | ") and "| 1.00 |" not in rows[3]


def test_cli_max_tokens_replaces_the_workloads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["simulate", "--workload", "overload", "--duration", "10", "--policy", "direct"]
    argv += ["--max-tokens", "none:0.5,exact:0.5", "--out", str(out), "--no-plots", "--quiet"]
    assert cli.main(argv) == 0
    records = json.loads((out / "results.json").read_text())["policies"][DIRECT]["requests"]
    sent = {r["max_tokens"] for r in records}
    assert sent == {None, 256}
    with pytest.raises(SystemExit, match="sum to 1"):
        cli.main(["simulate", "--workload", "overload", "--max-tokens", "none:0.5"])


def test_closed_client_default_still_sends_its_exact_length() -> None:
    draw = next(ClosedClient("a", 1, output_tokens=(10, 20)).sizes(42))
    assert draw.max_tokens == "exact" and 10 <= draw.output_tokens <= 20
