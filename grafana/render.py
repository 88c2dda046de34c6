"""Render a Grafana dashboard's main panels from a live Prometheus, without Grafana.

Every panel query is taken from the dashboard JSON as it is, with the template variables
substituted the way Grafana would (``$tenant`` as a regex, ``$__rate_interval``), evaluated
with Prometheus' ``/api/v1/query_range`` and drawn with matplotlib::

    python grafana/render.py --prometheus http://127.0.0.1:9090 --out docs/img/dashboard.png

``tests/observability/test_dashboards.py`` uses :func:`substitute` for its checks and calls
:func:`render` when ``VTC_RENDER_DASHBOARD`` names an output file.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
FAIRNESS = HERE / "dashboards" / "fairness.json"

#: Panels of the fairness dashboard drawn by default, in this order (a 3 x 3 grid).
MAIN_PANELS = (
    "Service rate per tenant",
    "Share of service vs weight-fair share",
    "Virtual counter per tenant",
    "Counter gap between backlogged tenants",
    "Jain index over time",
    "Queue depth per tenant",
    "Queue wait p50 / p95 per tenant",
    "Time to first token p50 / p95 per tenant",
    "Rejections by reason",
)

_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def substitute(expr: str, tenant: str = ".*", rate_interval: str = "1m") -> str:
    """``expr`` with Grafana's variables replaced: ``$tenant`` (a regex, as Grafana formats a
    multi-value variable), ``$__rate_interval``, ``$__interval`` and ``$__range``."""
    out = expr
    for name, value in (
        ("__rate_interval", rate_interval),
        ("__interval", rate_interval),
        ("__range", rate_interval),
        ("tenant", tenant),
    ):
        out = re.sub(r"\$\{" + name + r"(?::\w+)?\}|\$" + name + r"\b", value, out)
    return out


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(panel title, refId, expr)`` of every target of every panel (rows included)."""
    out = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.append((panel["title"], target.get("refId", "?"), target["expr"]))
    return out


def query_range(
    prometheus: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """Prometheus' range query; raises ``RuntimeError`` with its error message."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    return _get(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}")


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    """Prometheus' instant query; raises ``RuntimeError`` with its error message."""
    params = urllib.parse.urlencode({"query": expr})
    return _get(f"{prometheus.rstrip('/')}/api/v1/query?{params}")


def _get(url: str) -> list[dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400/422: the query did not parse or evaluate
        body = json.loads(exc.read() or b"{}")
    if body.get("status") != "success":
        raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]  # type: ignore[no-any-return]


def legend(fmt: str, labels: dict[str, str]) -> str:
    return _LEGEND.sub(lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def render(
    prometheus: str,
    out: Path,
    *,
    dashboard: Path = FAIRNESS,
    panels: tuple[str, ...] = MAIN_PANELS,
    minutes: float = 5.0,
    tenant: str = ".*",
    rate_interval: str = "15s",
) -> Path:
    """Draw ``panels`` of ``dashboard`` over the last ``minutes`` to ``out`` (PNG)."""
    board = json.loads(dashboard.read_text())
    by_title = {p["title"]: p for p in _all_panels(board)}
    chosen = [by_title[t] for t in panels if t in by_title]
    end = time.time()
    start = end - minutes * 60
    step = max(1.0, (end - start) / 300)
    # every query first, then the drawing: one consistent snapshot of the range
    data = [
        [
            (target, query_range(prometheus, substitute(target["expr"], tenant, rate_interval),
                                 start, end, step))
            for target in panel["targets"]
        ]
        for panel in chosen
    ]  # fmt: skip
    _draw(board.get("title", "dashboard"), chosen, data, end, out)
    return out


def _draw(
    title: str,
    panels: list[dict[str, Any]],
    data: list[list[tuple[dict[str, Any], list[dict[str, Any]]]]],
    end: float,
    out: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.1 * rows), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel, results in zip(axes.flat, panels, data, strict=False):
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "")
        scale = 100.0 if unit == "percentunit" else 1.0
        colors: dict[str, str] = {}  # one colour per tenant (or series) across the targets
        for target, series_list in results:
            fmt = target.get("legendFormat", "")
            for series in series_list:
                label = legend(fmt, series["metric"])
                key = series["metric"].get("tenant", label)
                ax.plot(
                    [float(t) - end for t, _ in series["values"]],
                    [float(v) * scale for _, v in series["values"]],
                    color=colors.setdefault(key, palette[len(colors) % len(palette)]),
                    linewidth=1.2,
                    linestyle="--" if ("fair" in fmt or "p50" in fmt) else "-",
                    label=label,
                )
        if "min" in defaults and "max" in defaults:
            ax.set_ylim(defaults["min"] * scale, defaults["max"] * scale * 1.05)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel("seconds before now", fontsize=8)
        ax.set_ylabel({"s": "seconds", "percentunit": "%", "reqps": "req/s"}.get(unit, ""))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best", ncol=3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=60)
    plt.close(fig)
    _save_small_png(buf, out)


def _save_small_png(buf: io.BytesIO, out: Path) -> None:
    """A palette PNG (a chart has few colours): a fraction of the size of an RGBA one."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib depends on Pillow
        out.write_bytes(buf.getvalue())
        return
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=64).save(out, optimize=True)


def _all_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in board.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    p.add_argument("--out", type=Path, default=Path("docs/img/dashboard.png"))
    p.add_argument("--dashboard", type=Path, default=FAIRNESS)
    p.add_argument("--minutes", type=float, default=5.0, help="time range to draw")
    p.add_argument("--tenant", default=".*", help="regex for $tenant (default: all)")
    p.add_argument("--rate-interval", default="15s", help="value of $__rate_interval")
    args = p.parse_args(argv)
    out = render(
        args.prometheus,
        args.out,
        dashboard=args.dashboard,
        minutes=args.minutes,
        tenant=args.tenant,
        rate_interval=args.rate_interval,
    )
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
