"""Metrics of the tenant tree: per-group series labelled by path and level, tenants' paths,
and the group-label cap."""

from __future__ import annotations

import httpx

from gateway.config import parse_config
from gateway.reload import apply_config
from tests.gateway.conftest import gateway_stack

from .conftest import scrape, stream_all, value

TREE = [
    {
        "name": "org-a",
        "weight": 3,
        "tenants": [
            {"name": "team-1", "tenants": [{"name": "a1", "api_keys": ["key-a1"]}]},
            {"name": "a2", "api_keys": ["key-a2"]},
        ],
    },
    {"name": "b", "api_keys": ["key-b"]},
]


async def test_groups_are_exported_by_path_and_level() -> None:
    async with gateway_stack(gateway={"tenants": TREE}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            assert await stream_all(http, "key-a1", 4) == 200
            assert await stream_all(http, "key-b", 4) == 200
            s = await scrape(http)
    assert value(s, "vtc_group_weight", group="org-a", level="1") == 3
    assert value(s, "vtc_group_weight", group="org-a/team-1", level="2") == 1
    a1 = value(s, "vtc_tenant_service_tokens_total", tenant="a1")
    assert a1 > 0
    assert value(s, "vtc_group_service_tokens_total", group="org-a", level="1") == a1
    assert value(s, "vtc_group_service_tokens_total", group="org-a/team-1", level="2") == a1
    assert value(s, "vtc_tenant_path", tenant="a1", path="org-a/team-1/a1") == 1
    assert value(s, "vtc_group_queued", group="org-a", level="1") == 0
    assert value(s, "vtc_group_in_flight", group="org-a", level="1") == 0
    counters = [v for (n, labels), v in s.items() if n == "vtc_group_counter"]
    assert counters and max(counters) > 0
    assert not any(dict(labels).get("tenant") == "b" for n, labels in s if n == "vtc_tenant_path")


async def test_group_series_are_capped_like_tenant_labels() -> None:
    gw = {"tenants": TREE, "metrics": {"max_tenant_labels": 1}}
    async with gateway_stack(gateway=gw) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            s = await scrape(http)
    groups = {dict(labels)["group"] for n, labels in s if n == "vtc_group_weight"}
    assert groups == {"org-a"}


async def test_lift_series_start_at_zero_for_every_configured_tenant() -> None:
    """Before any request, every configured tenant (nested ones too) has its lift series at
    0, and so does a tenant a reload adds: the lift panels read 0 instead of no data."""
    async with gateway_stack(gateway={"tenants": TREE}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            s = await scrape(http)
            for tenant in ("a1", "a2", "b"):
                assert value(s, "vtc_tenant_lifts_total", tenant=tenant) == 0
                assert value(s, "vtc_tenant_lift_units_total", tenant=tenant) == 0
            raw = {
                "backends": stack.state.config.redacted()["backends"],
                "tenants": [*TREE, {"name": "c", "api_keys": ["key-c"]}],
                "limits": {"health_interval_s": 60},
            }
            assert apply_config(stack.state, parse_config(raw)).added == ("c",)
            s = await scrape(http)
            assert value(s, "vtc_tenant_lifts_total", tenant="c") == 0
            assert value(s, "vtc_tenant_lift_units_total", tenant="c") == 0


async def test_lift_series_are_capped_like_tenant_labels() -> None:
    gw = {"tenants": TREE, "metrics": {"max_tenant_labels": 1}}
    async with gateway_stack(gateway=gw) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            s = await scrape(http)
    for name in ("vtc_tenant_lifts_total", "vtc_tenant_lift_units_total"):
        series = {dict(labels)["tenant"]: v for (n, labels), v in s.items() if n == name}
        assert len(series) == 2 and "other" in series and set(series.values()) == {0}
