"""Workloads whose clients leave ``max_tokens`` unset or generous: the spec, its parsing, the
draws (log-normal outputs, the mix's shares), CSV traces and the built-in ``sdk_mix``."""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path

import pytest

from gateway.lab.workloads import (
    EXACT,
    SDK_MAX_TOKENS,
    LogNormal,
    load_csv,
    load_workload,
    load_yaml,
    parse_max_tokens,
)


@pytest.mark.parametrize(
    ("value", "mix"),
    [
        ("none", ((None, 1.0),)),
        (None, ((None, 1.0),)),
        ("exact", ((EXACT, 1.0),)),
        (4096, ((4096, 1.0),)),
        ("512", ((512, 1.0),)),
        ("none:0.6,4096:0.3,exact:0.1", ((None, 0.6), (4096, 0.3), (EXACT, 0.1))),
        ({"none": 0.5, 64: 0.5}, ((None, 0.5), (64, 0.5))),
    ],
)
def test_parse_max_tokens(value: object, mix: tuple[tuple[object, float], ...]) -> None:
    assert parse_max_tokens(value) == mix


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("none:0.6,4096:0.3", "sum to 1"),
        ({"none": 0.5, "exact": 0.6}, "sum to 1"),
        ("none:0,exact:1", "must be > 0"),
        ("none:x,exact:1", "must be > 0"),
        ("all", "expected none, exact or a token count"),
        (0, "expected none, exact or a token count"),
        (True, "expected none, exact or a token count"),
        ({"-5": 1.0}, "expected none, exact or a token count"),
    ],
)
def test_parse_max_tokens_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_max_tokens(value, "clients[0].max_tokens")


def test_lognormal_draws_like_the_simulated_backend() -> None:
    rng = random.Random(1)
    draws = [LogNormal(128.0, 0.8).draw(rng) for _ in range(4000)]
    assert min(draws) >= 1
    assert statistics.median(draws) == pytest.approx(129, rel=0.06)  # int(x) + 1
    logs = [math.log(d) for d in draws if d > 20]
    assert statistics.pstdev(logs) == pytest.approx(0.8, rel=0.15)


def _yaml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "w.yaml"
    p.write_text("name: w\nduration: 600\nclients:\n" + body)
    return p


def test_open_loop_client_draws_its_mix_seeded_and_caps_outputs(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "  - {name: a, rate: 5, prompt_tokens: [100, 1500], output_tokens: {median: 128},\n"
        "     max_tokens: {none: 0.6, 100: 0.3, exact: 0.1}}\n",
    )
    wl = load_yaml(path)
    assert wl.requests == load_yaml(path).requests
    assert wl.requests != load_yaml(path, seed=7).requests
    kinds = [r.max_tokens for r in wl.requests]
    n = len(kinds)
    assert n == 3000
    assert kinds.count(None) / n == pytest.approx(0.6, abs=0.03)
    assert kinds.count(100) / n == pytest.approx(0.3, abs=0.03)
    assert kinds.count(EXACT) / n == pytest.approx(0.1, abs=0.02)
    capped = [r for r in wl.requests if r.max_tokens == 100]
    assert all(r.output_tokens <= 100 for r in capped)
    assert any(r.output_tokens == 100 for r in capped)  # a long draw cut at the cap
    assert max(r.output_tokens for r in wl.requests if r.max_tokens is None) > 100
    sent = {r.sent_max_tokens for r in wl.requests if r.max_tokens == EXACT}
    assert sent == {r.output_tokens for r in wl.requests if r.max_tokens == EXACT}


def test_a_client_without_max_tokens_key_keeps_its_random_stream(tmp_path: Path) -> None:
    plain = "  - {name: a, rate: 2, prompt_tokens: [1, 99], output_tokens: [1, 99]}\n"
    exact = plain.replace("}", ", max_tokens: exact}")
    a = load_yaml(_yaml(tmp_path, plain)).requests
    b = load_yaml(_yaml(tmp_path, exact)).requests
    assert a == b and all(r.max_tokens == EXACT for r in a)
    assert all(r.sent_max_tokens == r.output_tokens for r in a)


def test_closed_client_draws_max_tokens_too(tmp_path: Path) -> None:
    path = _yaml(
        tmp_path,
        "  - {name: a, concurrency: 4, output_tokens: {median: 50, sigma: 0.5},\n"
        "     max_tokens: 'none:0.5,exact:0.5'}\n",
    )
    client = load_yaml(path).closed[0]
    draws = [d for d, _ in zip(client.sizes(42), range(400), strict=False)]
    assert {d.max_tokens for d in draws} == {None, EXACT}
    assert draws[:10] == [d for d, _ in zip(client.sizes(42), range(10), strict=False)]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("  - {name: a, rate: 1, output_tokens: {median: 0}}\n", "median: M >= 1"),
        ("  - {name: a, rate: 1, output_tokens: {mean: 5}}\n", "median: M >= 1"),
        ("  - {name: a, rate: 1, max_tokens: lots}\n", r"clients\[0\]\.max_tokens"),
        ("  - {name: a, concurrency: 2, max_tokens: {none: 2}}\n", "sum to 1"),
    ],
)
def test_yaml_errors_name_the_key(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_yaml(_yaml(tmp_path, body))


def test_csv_trace_with_a_max_tokens_column(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "arrival_s,tenant,prompt_tokens,output_tokens,max_tokens\n"
        "0.0,a,10,300,\n0.1,a,10,300,none\n0.2,a,10,300,100\n0.3,a,10,300,exact\n"
    )
    reqs = load_csv(p).requests
    assert [r.max_tokens for r in reqs] == [EXACT, None, 100, EXACT]
    assert [r.output_tokens for r in reqs] == [300, 300, 100, 300]
    p.write_text("arrival_s,tenant,prompt_tokens,output_tokens,max_tokens\n0,a,10,5,many\n")
    with pytest.raises(ValueError, match="bad row"):
        load_csv(p)


def test_with_max_tokens_keeps_the_traffic() -> None:
    wl = load_workload("overload")
    mixed = wl.with_max_tokens(parse_max_tokens("none:0.5,128:0.5"))
    assert [r.arrival_s for r in mixed.requests] == [r.arrival_s for r in wl.requests]
    assert {r.max_tokens for r in mixed.requests} == {None, 128}
    assert {r.output_tokens for r in mixed.requests if r.max_tokens == 128} == {128}
    assert {r.output_tokens for r in mixed.requests if r.max_tokens is None} == {256}
    assert all(r.max_tokens == EXACT for r in wl.requests)  # the original is untouched


def test_sdk_mix_is_96_closed_loop_clients_without_ignore_eos() -> None:
    wl = load_workload("sdk_mix")
    assert wl.name == "sdk_mix" and not wl.requests
    assert wl.tenants == {f"client-{i}": 1.0 for i in range(1, 5)}
    assert sum(c.concurrency for c in wl.closed) == 96
    for c in wl.closed:
        assert c.prompt_tokens == (100, 1500)
        assert c.output_tokens == LogNormal(128.0, 0.8)
        assert c.max_tokens == SDK_MAX_TOKENS
    assert dict(SDK_MAX_TOKENS) == {None: 0.6, 4096: 0.3, EXACT: 0.1}
