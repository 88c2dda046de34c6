"""Hot reload: weights, tenants and keys change under load; bad files are refused; SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config import parse_config
from gateway.reload import REMOVED_MESSAGE, Reloader, apply_config
from tests.gateway.conftest import (
    MODEL,
    Stack,
    gateway_process,
    gateway_stack,
    tenants,
    wait_for,
)

from .conftest import body, parse, scrape, stream_all, value

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def raw_config(stack: Stack, tenant_list: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The stack's config as a plain document, with ``tenant_list`` as its tenants."""
    backend = stack.state.config.redacted()["backends"][0]  # as the stack was started
    backend.update(extra.pop("backend", {}))
    return {
        "backends": [backend],
        "tenants": tenant_list,
        "limits": {"health_interval_s": 60},
        **extra,
    }


async def test_weight_change_keeps_counters_and_running_stream() -> None:
    async with gateway_stack(backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(60), headers=A) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                await anext(lines)
                queued = asyncio.create_task(http.post("/v1/completions", json=body(4), headers=B))
                await wait_for(lambda: d.core.total_queued() == 1)
                pool = d.core.pool(MODEL)
                before_a, before_b = pool.counter("a"), pool.counter("b")
                result = apply_config(
                    stack.state, parse_config(raw_config(stack, tenants(("a", 1), ("b", 4))))
                )
                assert result.changed == ("b",) and not result.removed and not result.needs_restart
                assert pool.weight("b") == 4.0 and d.core.tenant_limits()["b"].weight == 4.0
                assert pool.counter("a") >= before_a and pool.counter("b") == before_b
                rest = [line async for line in lines if line]
                assert rest[-1] == "data: [DONE]"
                assert sum(1 for x in rest if x.startswith("data: {")) >= 59
            assert (await queued).status_code == 200
            s = await scrape(http)
        assert value(s, "vtc_tenant_weight", tenant="b") == 4
        assert value(s, "vtc_config_reloads_total", result="ok") == 1
        assert value(s, "vtc_config_reloads_total", result="error") == 0
        assert value(s, "vtc_requests_total", tenant="a", outcome="ok") == 1
        # b's 4 output tokens were charged at its new weight
        prompt = stack.state.counter.count_text("hello there")
        assert pool.counter("b") == before_b + (prompt + 2 * 4) / 4


async def test_removed_tenant_queued_requests_get_401_running_ones_finish() -> None:
    gw = {"tenants": tenants(("a", 1), ("b", 1), ("c", 1))}
    async with gateway_stack(gateway=gw, backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(40), headers=B) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                await anext(lines)
                queued_b = [
                    asyncio.create_task(http.post("/v1/completions", json=body(2), headers=B))
                    for _ in range(2)
                ]
                queued_a = asyncio.create_task(
                    http.post("/v1/completions", json=body(2), headers=A)
                )
                await wait_for(lambda: d.core.total_queued() == 3)
                new = tenants(("a", 1), ("c", 1), ("d", 2))
                result = apply_config(stack.state, parse_config(raw_config(stack, new)))
                assert result.removed == ("b",) and result.added == ("d",)
                assert result.rejected == 2
                for t in queued_b:
                    resp = await t
                    assert resp.status_code == 401
                    assert resp.json()["error"]["message"] == REMOVED_MESSAGE
                    assert resp.json()["error"]["type"] == "AuthenticationError"
                # b's running stream is not dropped
                rest = [line async for line in lines if line]
                assert rest[-1] == "data: [DONE]"
                assert sum(1 for x in rest if x.startswith("data: {")) >= 39
            assert (await queued_a).status_code == 200
            # b's key is gone, d's key works at once
            assert (await http.post("/v1/completions", json=body(2), headers=B)).status_code == 401
            assert await stream_all(http, "key-d", 2) == 200
            s = await scrape(http)
        assert value(s, "vtc_tenant_weight", tenant="d") == 2
        assert ("vtc_tenant_weight", (("tenant", "b"),)) not in s
        assert value(s, "vtc_requests_total", tenant="b", outcome="ok") == 1
        # the two queued requests answered 401 are counted; the later unknown key has no tenant
        assert value(s, "vtc_requests_total", tenant="b", outcome="rejected_unauthorized") == 2
        assert d.core.pool(MODEL).counter("b") > 0  # kept, should b come back


async def test_restart_only_changes_are_reported_and_not_applied() -> None:
    async with gateway_stack() as stack:
        state = stack.state
        new = raw_config(
            stack,
            tenants(("a", 1), ("b", 1)),
            backend={"max_num_seqs": 7},
            scheduler={"policy": "fcfs"},
            limits={"health_interval_s": 30, "read_timeout_s": 9, "queue_timeout_s": 12},
        )
        result = apply_config(state, parse_config(new))
        assert set(result.needs_restart) == {"backends", "scheduler", "limits.read_timeout_s"}
        assert state.config.scheduler.policy == "vtc"
        assert state.config.backends[0].max_num_seqs == 256
        assert state.config.limits.read_timeout_s == 300
        assert state.config.limits.queue_timeout_s == 12  # reloadable
        assert state.pool.health_interval == 30


async def test_reloader_refuses_invalid_file_and_keeps_the_old_config(tmp_path: Path) -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1), ("b", 1)))))
        reloader = Reloader(stack.state, path)
        assert not reloader.changed()
        old = stack.state.config
        path.write_text("tenants: [{name: a, weight: -1}]\n")
        assert reloader.changed()
        assert reloader.reload("test") is False
        assert stack.state.config is old
        path.write_text("tenants: [unclosed\n")
        assert reloader.reload("test") is False
        path.unlink()
        assert reloader.reload("test") is False
        assert await stream_all(http, "key-a", 2) == 200  # still serving with the old config
        s = await scrape(http)
        assert value(s, "vtc_config_reloads_total", result="error") == 3
        assert value(s, "vtc_config_reloads_total", result="ok") == 0


async def test_reload_applies_exactly_the_content_it_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write landing while a reload reads the file must not leave the stored digest
    disagreeing with the applied config (it would hide the write from the watcher)."""
    async with gateway_stack() as stack:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1), ("b", 1)))))
        reloader = Reloader(stack.state, path)
        edited = yaml.safe_dump(raw_config(stack, tenants(("a", 2), ("b", 1))))
        concurrent = yaml.safe_dump(raw_config(stack, tenants(("a", 3.5), ("b", 1))))
        path.write_text(edited)
        real_bytes, real_text = Path.read_bytes, Path.read_text
        writes = []

        def write_after(p: Path, data: Any) -> Any:
            if p == path and not writes:  # the first read sees `edited`, then `concurrent` lands
                writes.append(1)
                path.write_text(concurrent)
            return data

        def read_text(p: Path, *args: Any, **kwargs: Any) -> Any:
            return write_after(p, real_text(p, *args, **kwargs))

        monkeypatch.setattr(Path, "read_bytes", lambda p: write_after(p, real_bytes(p)))
        monkeypatch.setattr(Path, "read_text", read_text)
        assert reloader.reload("test")
        weights = stack.state.dispatcher.core.tenant_limits()
        assert weights["a"].weight == 2.0  # what was read and hashed is what is applied
        assert reloader.changed()  # so the concurrent write is seen as a change ...
        assert reloader.reload("test")
        assert stack.state.dispatcher.core.tenant_limits()["a"].weight == 3.5  # ... and applied
        assert not reloader.changed()


async def test_watch_reloads_when_the_file_changes(tmp_path: Path) -> None:
    async with gateway_stack() as stack:
        path = tmp_path / "gw.yaml"
        path.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1), ("b", 1)))))
        reloader = Reloader(stack.state, path)
        task = asyncio.create_task(reloader.watch(interval_s=0.05))
        try:
            path.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 3), ("b", 1)))))
            d = stack.state.dispatcher
            await wait_for(lambda: d.core.tenant_limits()["a"].weight == 3.0)
            # an edit that leaves the content as it was (touch) is not a reload
            reloads = stack.state.stats.reloads["ok"]
            os.utime(path, ns=(1, 1))
            await asyncio.sleep(0.2)  # several watch periods (asserting nothing happened)
            assert stack.state.stats.reloads["ok"] == reloads == 1
        finally:
            task.cancel()


async def _reloads(http: httpx.AsyncClient, result: str, n: int) -> dict[Any, float]:
    """Poll /metrics (bounded) until ``vtc_config_reloads_total{result}`` reaches ``n``."""
    for _ in range(200):
        s = parse((await http.get("/metrics")).text)
        if value(s, "vtc_config_reloads_total", result=result) >= n:
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {result} reload #{n} within 10 s")


async def test_sighup_reloads_a_running_process(tmp_path: Path) -> None:
    async with gateway_stack() as stack:  # only its simulated backend is used
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1)))))
        async with gateway_process("--config", str(cfg), "--no-watch") as (proc, url):
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                hdr = {"Authorization": "Bearer key-new"}
                assert (await http.get("/v1/models", headers=hdr)).status_code == 401
                cfg.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1), ("new", 5)))))
                proc.send_signal(signal.SIGHUP)
                s = await _reloads(http, "ok", 1)
                assert value(s, "vtc_tenant_weight", tenant="new") == 5
                assert (await http.get("/v1/models", headers=hdr)).status_code == 200
                cfg.write_text("backends: nope\n")
                proc.send_signal(signal.SIGHUP)
                await _reloads(http, "error", 1)
                assert (await http.get("/v1/models", headers=hdr)).status_code == 200
                assert (await http.get("/health")).status_code == 200
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
            assert "config reload (SIGHUP) refused" in err
            assert "key-new" not in err


async def test_running_process_reloads_when_its_config_file_changes(tmp_path: Path) -> None:
    async with gateway_stack() as stack:
        cfg = tmp_path / "gw.yaml"
        cfg.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 1)))))
        async with (
            gateway_process("--config", str(cfg)) as (proc, url),
            httpx.AsyncClient(base_url=url, timeout=10) as http,
        ):
            cfg.write_text(yaml.safe_dump(raw_config(stack, tenants(("a", 7)))))
            s = await _reloads(http, "ok", 1)
            assert value(s, "vtc_tenant_weight", tenant="a") == 7
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_fairness_window_reloads() -> None:
    async with gateway_stack() as stack:
        assert stack.state.recorder.fairness.window_s == 60
        raw = raw_config(stack, tenants(("a", 1), ("b", 1)))
        raw["metrics"] = {"fairness_window_s": 120}
        apply_config(stack.state, parse_config(raw))
        assert stack.state.recorder.fairness.window_s == 120
