"""PNG figures like the VTC paper's, drawn with matplotlib's Agg backend (no display needed).

* ``service_rate.png``: service rate (weighted tokens/s, 60 s window) per tenant over time, one
  panel per policy (paper Fig. 3-5 style);
* ``acc_gap.png``: the maximum accumulated service gap between backlogged tenants over time, one
  line per policy, with the 2·U bound (paper Fig. 2 style);
* ``first_token_latency.png``: mean first-token latency per tenant over time (60 s window,
  requests placed at their first-token time, as the paper's artifact does), one panel per policy;
* ``quota.png`` (a quota workload): tokens per tenant in each quota window, stacked, against
  the quota line, one panel per policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import metrics as m
from .report import LabResults

Groups = Mapping[str, Sequence[m.RequestRecord]]

#: Tenants beyond this many get no legend entries (the real trace has 27).
MAX_LEGEND = 8


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_grid(duration: float, steps: int = 100) -> list[float]:
    return [duration * i / steps for i in range(1, steps + 1)]


def latency_over_time(
    recs: Sequence[m.RequestRecord], ticks: Sequence[float], window: float
) -> list[float]:
    """Mean first-token latency of the requests whose first token falls in each window."""
    half = window / 2.0
    out = []
    for x in ticks:
        lat = [
            r.first_token_s - r.arrival_s
            for r in recs
            if r.first_token_s is not None and x - half <= r.first_token_s <= x + half
        ]
        out.append(sum(lat) / len(lat) if lat else float("nan"))
    return out


def _panels(plt: Any, n: int, dpi: int) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 2.6 * rows), dpi=dpi, squeeze=False, sharex=True
    )
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig: Any, axes: Sequence[Any], path: Path, ntenants: int) -> None:
    if 1 < ntenants <= MAX_LEGEND and axes:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(
            handles, labels, loc="upper center", ncol=min(ntenants, 4), fontsize=7, frameon=False
        )
        fig.tight_layout(rect=(0, 0, 1, 0.92))
    else:
        fig.tight_layout()
    fig.savefig(path)


def _style_panel(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, linewidth=0.3)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("time (s)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def _tenant_panels(
    results: LabResults,
    path: Path,
    dpi: int,
    ylabel: str,
    series: Callable[[Groups, list[float], m.Ticks], dict[str, list[float]]],
) -> None:
    """One panel per policy, one line per tenant: ``series(records by tenant, grid, ticks)``."""
    plt = _pyplot()
    ticks = m.Ticks.for_duration(results.duration_s)
    grid = _time_grid(results.duration_s)
    fig, axes = _panels(plt, len(results.policies), dpi)
    for ax, (policy, run) in zip(axes, results.policies.items(), strict=True):
        lines = series(m.by_tenant(run.records, results.tenants), grid, ticks)
        for tenant, ys in lines.items():
            ax.plot(grid, ys, linewidth=1, label=tenant)
        _style_panel(ax, policy, ylabel)
    _finish(fig, axes, path, len(results.tenants))
    plt.close(fig)


def plot_service_rate(results: LabResults, path: Path, dpi: int = 80) -> None:
    def rate(groups: Groups, grid: list[float], ticks: m.Ticks) -> dict[str, list[float]]:
        return m.service_rates(groups, grid, ticks.window, results.prices)

    _tenant_panels(results, path, dpi, "service (tok/s)", rate)


def plot_acc_gap(results: LabResults, path: Path, dpi: int = 80) -> None:
    plt = _pyplot()
    ticks = m.Ticks.for_duration(results.duration_s)
    grid = ticks.fine()
    fig, ax = plt.subplots(figsize=(5, 3), dpi=dpi)
    bound = 0.0
    for policy, run in results.policies.items():
        groups = m.by_tenant(run.records, results.tenants)
        gaps = m.accumulated_gap(groups, grid, results.prices, results.tenants, ticks.warmup)
        ax.plot(grid, gaps, linewidth=1.2, label=policy)
        bound = run.summary.bound_2u
    if bound:
        ax.axhline(bound, color="black", linestyle="--", linewidth=0.8, label="2·U")
    ax.set_xlabel("time (s)", fontsize=8)
    ax.set_ylabel("max accumulated service gap", fontsize=8)
    ax.set_title(f"{results.workload}: accumulated service gap", fontsize=9)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.tick_params(labelsize=7)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(results: LabResults, path: Path, dpi: int = 80) -> None:
    def latency(groups: Groups, grid: list[float], ticks: m.Ticks) -> dict[str, list[float]]:
        return {t: latency_over_time(recs, grid, ticks.window) for t, recs in groups.items()}

    _tenant_panels(results, path, dpi, "first-token latency (s)", latency)


def plot_levels(results: LabResults, path: Path, dpi: int = 80) -> None:
    """Service rate of every node of the tenant tree (a group: its tenants' summed), labelled
    by path; line style by level (solid: the top)."""
    plt = _pyplot()
    ticks = m.Ticks.for_duration(results.duration_s)
    grid = _time_grid(results.duration_s)
    fig, axes = _panels(plt, len(results.policies), dpi)
    styles = ("-", "--", ":", "-.")
    nodes: dict[str, list[str]] = {}  # path -> its tenants
    for tenant, p in results.paths.items():
        parts = p.split("/")
        for level in range(1, len(parts) + 1):
            nodes.setdefault("/".join(parts[:level]), []).append(tenant)
    for ax, (policy, run) in zip(axes, results.policies.items(), strict=True):
        by = m.by_tenant(run.records, results.tenants)
        groups = {n: [r for t in ts for r in by.get(t, [])] for n, ts in nodes.items()}
        rates = m.service_rates(groups, grid, ticks.window, results.prices)
        for node, ys in rates.items():
            style = styles[min(node.count("/"), len(styles) - 1)]
            ax.plot(grid, ys, linewidth=1, linestyle=style, label=node)
        _style_panel(ax, policy, "service (tok/s)")
    _finish(fig, axes, path, len(nodes))
    plt.close(fig)


def plot_quota(results: LabResults, path: Path, dpi: int = 80) -> None:
    """A quota workload: tokens per tenant in each window (stacked, by dispatch time: what the
    provider counts) against the quota line, one panel per policy."""
    from .quota import window_tokens

    assert results.quota is not None
    plt = _pyplot()
    tpm, window = results.quota["tpm"], results.quota["window_s"]
    fig, axes = _panels(plt, len(results.policies), dpi)
    tenants = list(results.tenants)
    for ax, (policy, run) in zip(axes, results.policies.items(), strict=True):
        rows = window_tokens(run.records, tenants, window, results.duration_s)
        lefts = [k * window for k in range(len(rows))]
        bottom = [0.0] * len(rows)
        for tenant in tenants:
            heights = [float(row[tenant]) for row in rows]
            ax.bar(lefts, heights, width=window * 0.9, bottom=bottom, align="edge", label=tenant)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
        ax.axhline(tpm, color="black", linewidth=1, linestyle="--", label="quota")
        _style_panel(ax, policy, f"tokens per {window:g} s")
    _finish(fig, axes, path, len(tenants) + 1)
    plt.close(fig)


def plot_all(results: LabResults, out_dir: Path, dpi: int = 80, prefix: str = "") -> list[Path]:
    """Write the three figures (four with a tenant tree) into ``out_dir``; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        out_dir / f"{prefix}service_rate.png",
        out_dir / f"{prefix}acc_gap.png",
        out_dir / f"{prefix}first_token_latency.png",
    ]
    plot_service_rate(results, paths[0], dpi)
    plot_acc_gap(results, paths[1], dpi)
    plot_latency(results, paths[2], dpi)
    if results.paths:
        paths.append(out_dir / f"{prefix}service_per_level.png")
        plot_levels(results, paths[-1], dpi)
    if results.quota is not None:
        paths.append(out_dir / f"{prefix}quota.png")
        plot_quota(results, paths[-1], dpi)
    return paths
