from __future__ import annotations

import hashlib
from pathlib import Path
from typing import get_args

import pytest
import yaml

from gateway.admission import KV_ADMISSION_MODES, KvAdmission
from gateway.cli import main
from gateway.config import (
    BackendConfig,
    ConfigError,
    GatewayConfig,
    TenantConfig,
    Tier,
    key_digest,
    load_config,
    parse_config,
)
from gateway.scheduler import CLUSTER_POLICIES, POLICIES, TIERS, make_scheduler

REPO = Path(__file__).resolve().parents[2]

MINIMAL = {
    "backends": [{"name": "b0", "url": "http://127.0.0.1:8000"}],
    "tenants": [{"name": "a", "api_keys": ["k-a"]}],
}


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.scheduler.policy == "vtc"
    assert (cfg.scheduler.input_price, cfg.scheduler.output_price) == (1.0, 2.0)
    assert cfg.backends[0].max_num_seqs == 256
    assert cfg.backends[0].max_kv_tokens is None
    assert cfg.tenants[0].weight == 1.0


def test_every_problem_is_reported_with_its_key_path() -> None:
    raw = {
        "listen": {"port": 70000, "hots": "x"},
        "backends": [{"name": "b0", "url": "ftp://x", "max_num_seqs": 0}],
        "tenants": [
            {"name": "a", "weight": -2},
            {"name": "a", "weight": "heavy", "api_keys": "not-a-list"},
        ],
        "scheduler": {"policy": "round-robin"},
        "limits": {"queue_timeout_s": 0},
        "surprise": 1,
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    text = "\n".join(info.value.problems)
    for expected in (
        "listen.port: must be <= 65535, got 70000",
        "listen.hots: unknown key",
        "backends[0].url: must be an http(s):// URL, got 'ftp://x'",
        "backends[0].max_num_seqs: must be an integer >= 1, got 0",
        "tenants[0].weight: must be a number > 0, got -2",
        "tenants[1].weight: must be a number > 0, got 'heavy'",
        "tenants[1].api_keys: must be a list of non-empty strings, got '<redacted>'",
        "tenants[1].name: duplicate name, got 'a'",
        "scheduler.policy: must be one of",
        "limits.queue_timeout_s: must be a number > 0, got 0",
        "surprise: unknown key",
    ):
        assert expected in text, expected
    assert "not-a-list" not in text  # secrets are not echoed


def test_shared_key_between_tenants_is_rejected() -> None:
    raw = {
        "backends": MINIMAL["backends"],
        "tenants": [
            {"name": "a", "api_keys": ["same"]},
            {"name": "b", "api_keys": ["sha256:" + hashlib.sha256(b"same").hexdigest()]},
        ],
    }
    with pytest.raises(ConfigError, match=r"tenants\[1\]\.api_keys\[0\]: key also belongs"):
        parse_config(raw)


def test_key_digest_accepts_raw_and_hashed_forms() -> None:
    digest = hashlib.sha256(b"secret").digest()
    assert key_digest("secret") == digest
    assert key_digest("sha256:" + digest.hex()) == digest


def test_anonymous_tenant_must_exist() -> None:
    with pytest.raises(ConfigError, match=r"auth\.anonymous_tenant"):
        parse_config({**MINIMAL, "auth": {"anonymous_tenant": "ghost"}})


def test_example_config_is_valid_and_check_config_redacts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = REPO / "deploy" / "gateway.yaml"
    cfg = load_config(path)
    assert {t.name for t in cfg.tenants} == {"team-search", "team-chat", "batch-jobs"}
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sk-chat-example" not in out
    assert "sha256:" in out


def test_check_config_exits_2_listing_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"backends": [], "tenants": [{"name": "x", "weight": 0}]}))
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "backends: at least one backend is required" in err
    assert "tenants[0].weight: must be a number > 0, got 0" in err


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("backends: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_backend_kv_admission_is_validated_and_defaults_to_predict() -> None:
    assert parse_config(MINIMAL).backends[0].kv_admission == "predict"
    raw = {
        "backends": [
            {"name": "b0", "url": "http://x", "kv_admission": "peak"},
            {"name": "b1", "url": "http://y", "kv_admission": "greedy"},
            {"name": "b2", "url": "http://z", "kv_admission": 1},
        ],
        "tenants": [{"name": "a", "api_keys": ["k"]}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == [
        "backends[1].kv_admission: must be one of predict, reserve, peak, got 'greedy'",
        "backends[2].kv_admission: must be a non-empty string, got 1",
    ]
    del raw["backends"][1:]  # type: ignore[attr-defined]
    assert parse_config(raw).backends[0].kv_admission == "peak"


def test_backend_adaptive_must_be_a_boolean() -> None:
    raw = {
        **MINIMAL,
        "backends": [{"name": "b0", "url": "http://127.0.0.1:8000", "adaptive": "yes"}],
    }
    with pytest.raises(ConfigError, match=r"backends\[0\]\.adaptive: must be true or false"):
        parse_config(raw)
    ok = {**MINIMAL, "backends": [{"name": "b0", "url": "http://127.0.0.1:8000", "adaptive": True}]}
    assert parse_config(ok).backends[0].adaptive is True


def test_the_parser_takes_every_default_from_the_schema() -> None:
    """Nothing is retyped in the parser: a minimal file gives exactly the dataclasses'
    defaults."""
    cfg = parse_config(MINIMAL)
    assert cfg == GatewayConfig(
        backends=(BackendConfig(name="b0", url="http://127.0.0.1:8000"),),
        tenants=(TenantConfig(name="a", api_keys=("k-a",)),),
    )
    explicit_nulls = {
        **MINIMAL,
        "listen": {"admin_port": None},
        "backends": [{**MINIMAL["backends"][0], "max_kv_tokens": None, "api_key": None}],
        "limits": {"max_tokens_default": None},
        "auth": {"anonymous_tenant": None},
    }
    assert parse_config(explicit_nulls) == cfg


def test_bounds_and_types_come_from_the_schema_with_key_paths() -> None:
    raw = {
        "listen": {"admin_port": 65536, "port": None},
        "backends": [{"url": "http://x/", "max_model_len": 0, "adaptive": 1}],
        "tenants": [{"name": "a", "weight": True, "max_queued": 1.5, "max_in_flight": 0}],
        "scheduler": {"input_price": -1, "rpm_limit": float("inf")},
        "tokenizer": "",
        "limits": {"max_body_bytes": 1000, "shutdown_timeout_s": -1, "health_interval_s": 0},
        "auth": {"trusted_tenant_header": "X Tenant"},
        "metrics": {"fairness_window_s": 0.5, "max_tenant_labels": 0},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert info.value.problems == [
        "listen.port: must be an integer >= 0, got None",
        "listen.admin_port: must be <= 65535, got 65536",
        "backends[0].name: is required",
        "backends[0].max_model_len: must be an integer >= 1, got 0",
        "backends[0].adaptive: must be true or false, got 1",
        "tenants[0].weight: must be a number > 0, got True",
        "tenants[0].max_queued: must be an integer >= 1, got 1.5",
        "tenants[0].max_in_flight: must be an integer >= 1, got 0",
        "scheduler.input_price: must be a number >= 0, got -1",
        "scheduler.rpm_limit: must be an integer >= 1, got inf",
        "tokenizer: must be a non-empty string, got ''",
        "limits.max_body_bytes: must be an integer >= 1024, got 1000",
        "limits.health_interval_s: must be a number > 0, got 0",
        "limits.shutdown_timeout_s: must be a number >= 0, got -1",
        "auth.trusted_tenant_header: must be a header name, got 'X Tenant'",
        "metrics.max_tenant_labels: must be an integer >= 1, got 0",
        "metrics.fairness_window_s: must be a number >= 1, got 0.5",
    ]


def test_policy_literal_names_every_scheduler() -> None:
    assert set(CLUSTER_POLICIES) <= set(POLICIES)
    for policy in POLICIES:  # the config accepts it and make_scheduler builds it
        assert parse_config({**MINIMAL, "scheduler": {"policy": policy}}).scheduler.policy == policy
        make_scheduler(policy)
    assert set(get_args(KvAdmission)) == set(KV_ADMISSION_MODES)


def test_backend_url_loses_its_trailing_slash() -> None:
    raw = {**MINIMAL, "backends": [{"name": "b0", "url": "http://127.0.0.1:8000/"}]}
    assert parse_config(raw).backends[0].url == "http://127.0.0.1:8000"


def test_caps_and_tiers_are_shared_by_a_cluster_section() -> None:
    tenant = {**MINIMAL["tenants"][0], "max_in_flight": 2, "tier": "batch"}
    parsed = parse_config({**MINIMAL, "tenants": [tenant]}).tenants[0]
    assert (parsed.max_in_flight, parsed.tier, parsed.priority) == (2, "batch", TIERS["batch"])
    assert parse_config(MINIMAL).tenants[0].priority == TIERS["interactive"] > TIERS["batch"]
    raw = {**MINIMAL, "tenants": [tenant], "cluster": {"url": "redis://h:1/0"}}
    shared = parse_config(raw).tenants[0]
    assert (shared.max_in_flight, shared.priority) == (2, TIERS["batch"])


def test_tier_names_match_the_schedulers_tiers() -> None:
    assert set(get_args(Tier)) == set(TIERS)
    bad = {**MINIMAL, "tenants": [{**MINIMAL["tenants"][0], "tier": "bulk"}]}
    with pytest.raises(ConfigError) as info:
        parse_config(bad)
    assert info.value.problems == ["tenants[0].tier: must be one of interactive, batch, got 'bulk'"]


def test_batch_min_share_is_bounded_and_needs_a_counter_policy() -> None:
    assert parse_config(MINIMAL).scheduler.batch_min_share == 0.0
    ok = {**MINIMAL, "scheduler": {"batch_min_share": 0.2}}
    assert parse_config(ok).scheduler.batch_min_share == 0.2
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "scheduler": {"batch_min_share": 0.95}})
    assert info.value.problems == ["scheduler.batch_min_share: must be <= 0.9, got 0.95"]
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, "scheduler": {"batch_min_share": 0.2, "policy": "fcfs"}})
    assert info.value.problems == [
        "scheduler.batch_min_share: needs a policy that orders by counters "
        "(vtc, vtc-predict, lcf), not fcfs, got 0.2"
    ]
