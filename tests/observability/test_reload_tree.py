"""Hot reload of the tenant tree: tenants move between groups, groups come and go, weights
change; queued requests of tenants that stay keep their place and are served."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from gateway.config import ConfigError, parse_config
from gateway.reload import apply_config
from tests.gateway.conftest import MODEL, gateway_stack, wait_for

from .conftest import body
from .test_reload import raw_config


def team(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "api_keys": [f"key-{name}"], **extra}


OLD = [
    {"name": "org-a", "weight": 3, "tenants": [team("a1"), team("a2")]},
    {"name": "org-b", "weight": 1, "tenants": [team("b")]},
]
NEW = [  # a2 moves to a new org with b; org-b is gone; org-a's weight and a new team c
    {"name": "org-a", "weight": 1, "tenants": [team("a1")]},
    {"name": "org-x", "weight": 2, "max_queued": 50, "tenants": [team("a2"), team("b"), team("c")]},
]


async def test_moving_tenants_between_groups_keeps_their_queued_requests() -> None:
    gw = {"tenants": OLD}
    async with gateway_stack(gateway=gw, backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        pool = d.core.pool(MODEL)
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:

            def post(key: str, n: int) -> asyncio.Task[httpx.Response]:
                headers = {"Authorization": f"Bearer key-{key}"}
                return asyncio.create_task(
                    http.post("/v1/completions", json=body(n), headers=headers)
                )

            first = post("a1", 40)  # holds the only slot
            await wait_for(lambda: d.core.running.get("a1") == 1)
            queued = [post(t, 2) for t in ("a1", "a2", "a2", "b", "b")]
            await wait_for(lambda: d.core.total_queued() == 5)
            counters = {t: pool.counter(t) for t in ("a1", "a2", "b")}
            a_counter = pool.group_counter("org-a")
            result = apply_config(stack.state, parse_config(raw_config(stack, NEW)))
            assert result.rejected == 0 and not result.removed
            assert result.added == ("c",)
            assert set(result.changed) == {"a2", "b"}  # moved to another group
            assert d.core.total_queued() == 5  # nothing lost
            assert pool.parent("a2") == pool.parent("b") == "org-x"
            assert pool.queued_under("org-x") == 4 and pool.queued_under("org-a") == 1
            assert {t: pool.counter(t) for t in counters} == counters
            assert pool.group_counter("org-a") == a_counter and pool.group_weight("org-a") == 1
            groups = d.core.group_limits()
            assert groups["org-x"].max_queued == 50 and "org-b" not in groups
            c = post("c", 2)  # the new team works at once
            responses = await asyncio.gather(first, *queued, c)
            assert [r.status_code for r in responses] == [200] * 7
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        assert d.core.total_queued() == 0
        assert d.core.group_running.get("org-a") == 0 and d.core.group_running.get("org-x") == 0


async def test_a_group_queue_limit_answers_429_for_all_its_tenants() -> None:
    tree = [{"name": "org", "max_queued": 2, "tenants": [team("t1"), team("t2")]}, team("solo")]
    gw = {"tenants": tree}
    async with gateway_stack(gateway=gw, backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:

            def post(key: str, n: int) -> asyncio.Task[httpx.Response]:
                headers = {"Authorization": f"Bearer key-{key}"}
                return asyncio.create_task(
                    http.post("/v1/completions", json=body(n), headers=headers)
                )

            first = post("solo", 40)
            await wait_for(lambda: d.core.running.get("solo") == 1)
            queued = [post("t1", 2), post("t2", 2)]
            await wait_for(lambda: d.core.total_queued() == 2)
            full = await post("t2", 2)  # org has 2 queued: its limit
            assert full.status_code == 429 and "Retry-After" in full.headers
            assert "org" in full.json()["error"]["message"]
            other = post("solo", 2)  # a tenant outside the group is not limited by it
            await wait_for(lambda: d.core.total_queued() == 3)
            responses = await asyncio.gather(first, *queued, other)
            assert [r.status_code for r in responses] == [200] * 4
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        assert d.core.total_queued() == 0


async def test_a_tenant_cannot_become_a_group_by_reload() -> None:
    async with gateway_stack(gateway={"tenants": OLD}) as stack:
        d = stack.state.dispatcher
        flipped = [{"name": "a1", "tenants": [team("x")]}, {**team("b2"), "name": "org-b"}]
        with pytest.raises(ConfigError) as exc:
            apply_config(stack.state, parse_config(raw_config(stack, flipped)))
        assert exc.value.problems == [
            "tenants: 'a1' would change between tenant and group; restart",
            "tenants: 'org-b' would change between tenant and group; restart",
        ]
        assert stack.state.config.hierarchical and "x" not in d.core.tenant_limits()  # unchanged
