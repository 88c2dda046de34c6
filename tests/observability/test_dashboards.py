"""Every panel query of every dashboard, evaluated by a real Prometheus scraping a loaded gateway.

Starts the simulated backend and the gateway in-process, a real ``prometheus`` (Debian package
``prometheus``) on loopback scraping both every second, drives a few streaming tenants, then
asks Prometheus for each panel's ``expr`` (variables substituted as Grafana would): each must
parse and return data. Skipped when the ``prometheus`` binary is not installed.

``VTC_RENDER_DASHBOARD=docs/img/dashboard.png`` also renders the fairness dashboard's main
panels there (``grafana/render.py``), after ``VTC_RENDER_SECONDS`` (default 40) more of load.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from tests.gateway.conftest import Stack, gateway_stack, tenants
from tools.procs import free_port

from .conftest import clients

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
TENANT_REGEX = "(a|b|c)"  # how Grafana formats $tenant with a, b and c selected
RATE_INTERVAL = "5s"  # $__rate_interval for a 1 s scrape interval
DEADLINE_S = 40.0

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus binary not found; install it (Debian: apt-get install -y prometheus)",
)


def _render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grafana_render", ROOT / "grafana" / "render.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


render = _render_module()


def _hostport(url: str) -> str:
    return url.split("://", 1)[1].rstrip("/")


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, stack: Stack) -> AsyncIterator[str]:
    """A Prometheus scraping the gateway and its simulated backend every second."""
    assert PROMETHEUS is not None
    cfg = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "vtc-gateway", "static_configs": [{"targets": [_hostport(stack.url)]}]},
            {"job_name": "vllm", "static_configs": [{"targets": [_hostport(stack.sims[0].url)]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = _start_prometheus(tmp, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def _start_prometheus(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    with (tmp / "prometheus.log").open("wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:] if path.exists() else ""


async def _poll(
    http: httpx.AsyncClient, deadline: float, what: str, check: Any, proc_log: Path
) -> Any:
    """Call ``await check()`` until it returns a truthy value or ``deadline`` passes."""
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except httpx.TransportError as exc:  # Prometheus still starting
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.25)
    raise AssertionError(
        f"timed out waiting for {what}: {last!r}\nprometheus log:\n{_tail(proc_log)}"
    )


async def _instant(http: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await http.get("/api/v1/query", params={"query": expr})
    body = r.json()
    if body.get("status") != "success":
        raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]  # type: ignore[no-any-return]


def _all_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, substituted expr) of every target."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for title, ref, expr in render.panel_queries(board):
            expr = render.substitute(expr, TENANT_REGEX, RATE_INTERVAL)
            out.append((path.name, title, ref, expr))
    return out


def test_dashboards_have_datasource_and_tenant_variables() -> None:
    assert {p.name for p in DASHBOARDS} >= {"fairness.json", "operations.json"}
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["tenant"]["multi"] and variables["tenant"]["includeAll"]
        for title, _, expr in render.panel_queries(board):
            assert expr.strip(), title
        for panel in board["panels"]:
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_substitute_formats_variables_like_grafana() -> None:
    expr = 'rate(x{tenant=~"$tenant"}[$__rate_interval]) + y{t=~"${tenant:regex}"}'
    assert render.substitute(expr, "(a|b)", "5s") == (
        'rate(x{tenant=~"(a|b)"}[5s]) + y{t=~"(a|b)"}'
    )


@needs_prometheus
async def test_every_panel_query_returns_data_from_real_prometheus(tmp_path: Path) -> None:
    a, b, c = tenants(("a", 1), ("b", 2), ("c", 1))
    gw = {"tenants": [{"name": "org", "weight": 2, "tenants": [a, b]}, c]}  # tree panels too
    backend = {"max_num_seqs": 2}
    async with gateway_stack(gateway=gw, backend=backend) as stack:
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as gw_http,
            prometheus(tmp_path, stack) as prom_url,
            httpx.AsyncClient(base_url=prom_url, timeout=10) as http,
        ):
            stop = asyncio.Event()
            load = asyncio.create_task(clients(gw_http, ["key-a", "key-b", "key-c"], 3, 24, stop))
            try:
                await _check_all_panels(http, tmp_path / "prometheus.log")
                out = os.environ.get("VTC_RENDER_DASHBOARD")
                if out:
                    await asyncio.sleep(float(os.environ.get("VTC_RENDER_SECONDS", "40")))
                    path = await asyncio.to_thread(
                        render.render, prom_url, Path(out), minutes=1.0, rate_interval="5s"
                    )
                    assert path.stat().st_size < 150_000
            finally:
                stop.set()
                await asyncio.wait_for(load, 30)


async def _check_all_panels(http: httpx.AsyncClient, proc_log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S

    async def ready() -> bool:
        return (await http.get("/-/ready")).status_code == 200

    await _poll(http, deadline, "prometheus ready", ready, proc_log)

    async def targets_up() -> bool:
        r = await http.get("/api/v1/targets")
        if r.status_code != 200:
            return False
        active = r.json()["data"]["activeTargets"]
        return len(active) == 2 and all(t["health"] == "up" for t in active)

    await _poll(http, deadline, "both scrape targets up", targets_up, proc_log)

    # the tenant variable's query, label_values(vtc_tenant_weight, tenant), in PromQL
    async def tenants_listed() -> set[str]:
        rows = await _instant(http, "group by (tenant) (vtc_tenant_weight)")
        return {r["metric"]["tenant"] for r in rows}

    assert await _poll(http, deadline, "tenant variable values", tenants_listed, proc_log) == {
        "a",
        "b",
        "c",
    }

    queries = _all_queries()
    assert len(queries) > 30

    async def empty_panels() -> list[str] | None:
        empty = []
        for board, title, ref, expr in queries:
            if not await _instant(http, expr):  # a parse error raises at once
                empty.append(f"{board} / {title} / {ref}: {expr}")
        return empty or None

    async def all_have_data() -> bool:
        return await empty_panels() is None

    with contextlib.suppress(AssertionError):
        await _poll(http, deadline, "data for every panel", all_have_data, proc_log)
    assert await empty_panels() is None
