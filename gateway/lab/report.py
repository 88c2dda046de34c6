"""Results of a lab run: ``results.json``, a markdown table, and a progress bar.

``results.json`` (the same shape for ``lab simulate`` and ``lab replay``, so any tool can
recompute the metrics from the per-request records)::

    {"workload": NAME, "duration_s": D, "prices": {"input": 1, "output": 2},
     "tenants": {NAME: {"weight": W}},
     "policies": {POLICY: {"summary": {"max_diff", "avg_diff", "diff_var", "max_acc_gap",
                                       "bound_2u", "throughput_tok_s", "rejected"},
                           "requests": [{"tenant", "arrival_s", "first_token_s", "finish_s",
                                         "prompt_tokens", "output_tokens", "status",
                                         "max_tokens"}],
                           "preemptions": N}}}    # the engine's; lab simulate only

A run that includes the ``direct`` policy (the engine alone) adds a table of what each policy
costs against it (output tokens/s and their ratio, request latency, preemptions).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gateway.scheduler import Prices

from . import metrics as m
from .simulate import DIRECT
from .workloads import Workload


@dataclass(slots=True)
class PolicyRun:
    """One policy's outcome: its records and their summary."""

    records: list[m.RequestRecord]
    summary: m.Summary
    #: the engine's preemptions in the run (None: not known, e.g. a replay)
    preemptions: int | None = None


@dataclass(slots=True)
class LabResults:
    workload: str
    duration_s: float
    prices: Prices
    tenants: dict[str, float]
    policies: dict[str, PolicyRun]
    #: tenant -> its path in the tenant tree (``org/team/tenant``); empty for a flat workload
    paths: dict[str, str] = field(default_factory=dict)
    #: a quota workload's rate budget: ``{"tpm": N, "window_s": S}`` (None: batch slots)
    quota: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "duration_s": self.duration_s,
            "prices": {"input": self.prices.input, "output": self.prices.output},
            "tenants": {
                t: {"weight": w, **({"path": self.paths[t]} if t in self.paths else {})}
                for t, w in self.tenants.items()
            },
            "policies": {
                p: {
                    "summary": run.summary.to_json(),
                    "requests": [r.to_json() for r in run.records],
                    **({} if run.preemptions is None else {"preemptions": run.preemptions}),
                }
                for p, run in self.policies.items()
            },
            **({} if self.quota is None else {"quota": self.quota}),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LabResults:
        prices = Prices(float(doc["prices"]["input"]), float(doc["prices"]["output"]))
        policies = {}
        for p, body in doc["policies"].items():
            s = body["summary"]
            summary = m.Summary(
                max_diff=float(s["max_diff"]),
                avg_diff=float(s["avg_diff"]),
                diff_var=float(s["diff_var"]),
                max_acc_gap=float(s["max_acc_gap"]),
                bound_2u=float(s["bound_2u"]),
                throughput_tok_s=float(s["throughput_tok_s"]),
                rejected=int(s["rejected"]),
            )
            records = [m.RequestRecord.from_json(r) for r in body["requests"]]
            pre = body.get("preemptions")
            policies[p] = PolicyRun(records, summary, None if pre is None else int(pre))
        tenants = {t: float(v["weight"]) for t, v in doc["tenants"].items()}
        paths = {t: str(v["path"]) for t, v in doc["tenants"].items() if "path" in v}
        quota = doc.get("quota")
        return cls(
            str(doc["workload"]),
            float(doc["duration_s"]),
            prices,
            tenants,
            policies,
            paths,
            None if quota is None else {k: float(v) for k, v in quota.items()},
        )


def build_results(
    workload: Workload,
    runs: Mapping[str, Sequence[m.RequestRecord]],
    prices: Prices,
    batch_tokens: int,
    preemptions: Mapping[str, int] | None = None,
) -> LabResults:
    """Summarise each policy's records (``batch_tokens``: M of the 2U bound, the KV budget;
    ``preemptions``: the engine's, per policy, when known)."""
    policies = {}
    for policy, records in runs.items():
        summary = m.summarize(
            records,
            workload.tenants,
            workload.duration_s,
            prices,
            batch_tokens,
            longest_prompt=workload.longest_prompt(),
        )
        policies[policy] = PolicyRun(list(records), summary, (preemptions or {}).get(policy))
    paths = workload.paths() if workload.tree else {}
    quota = None
    if workload.quota_tpm is not None:
        quota = {"tpm": float(workload.quota_tpm), "window_s": workload.quota_window_s}
    return LabResults(
        workload.name, workload.duration_s, prices, dict(workload.tenants), policies, paths, quota
    )


def write_json(results: LabResults, path: Path) -> None:
    path.write_text(json.dumps(results.to_json(), separators=(",", ":")) + "\n")


def load_json(path: Path) -> LabResults:
    return LabResults.from_json(json.loads(path.read_text()))


# -- markdown ----------------------------------------------------------------------------------
def _num(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def tenant_service(results: LabResults, policy: str) -> dict[str, float]:
    """Weighted tokens served to each tenant in ``[warmup, T]``, divided by its weight."""
    ticks = m.Ticks.for_duration(results.duration_s)
    groups = m.by_tenant(results.policies[policy].records, results.tenants)
    return {
        t: sum(m.service_in(r, ticks.warmup, ticks.duration, results.prices) for r in recs)
        / results.tenants.get(t, 1.0)
        for t, recs in groups.items()
    }


def markdown(results: LabResults) -> str:
    """The side-by-side tables: fairness/throughput, first-token latency, service per tenant."""
    lines = [
        f"### {results.workload} ({results.duration_s:g} s)",
        "",
        "| policy | Max Diff | Avg Diff | Diff Var | max acc. gap | 2·U | throughput (tok/s) "
        "| rejected |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, run in results.policies.items():
        s = run.summary
        lines.append(
            f"| {p} | {_num(s.max_diff)} | {_num(s.avg_diff)} | {_num(s.diff_var)} "
            f"| {_num(s.max_acc_gap, 0)} | {_num(s.bound_2u, 0)} | {_num(s.throughput_tok_s, 1)} "
            f"| {s.rejected} |"
        )
    policies = list(results.policies)
    lat = {
        p: m.latency_percentiles(m.by_tenant(run.records, results.tenants))
        for p, run in results.policies.items()
    }
    svc = {p: tenant_service(results, p) for p in policies}
    lines += [
        "",
        "First-token latency p50 / p99 (s), and service received after the warm-up divided by "
        "the tenant's weight (weighted tokens):",
        "",
        "| tenant | weight | " + " | ".join(f"{p} latency | {p} service" for p in policies) + " |",
        "|---|---:|" + "---:|---:|" * len(policies),
    ]
    for t, w in results.tenants.items():
        cells = []
        for p in policies:
            p50, p99 = lat[p].get(t, (math.nan, math.nan))
            cells.append(f"{_num(p50)} / {_num(p99)} | {_num(svc[p].get(t, 0.0), 0)}")
        lines.append(f"| {t} | {w:g} | " + " | ".join(cells) + " |")
    if results.paths:
        lines += ["", *level_table(results)]
    if DIRECT in results.policies:
        lines += ["", *direct_table(results)]
    if results.quota is not None:
        lines += ["", *quota_lines(results)]
    return "\n".join(lines) + "\n"


def quota_summaries(results: LabResults) -> dict[str, dict[str, Any]]:
    """Per policy, :func:`gateway.lab.quota.quota_summary` of a quota workload's run."""
    from .quota import quota_summary

    assert results.quota is not None
    tpm, window = int(results.quota["tpm"]), results.quota["window_s"]
    return {
        p: quota_summary(run.records, results.tenants, tpm, window, results.duration_s)
        for p, run in results.policies.items()
    }


def quota_lines(results: LabResults) -> list[str]:
    """Markdown: the quota used, the shares against the weights' per phase, the most tokens
    in any window, and the provider's refusals (each requeued by the gateway)."""
    from .quota import quota_table

    assert results.quota is not None
    summaries = quota_summaries(results)
    refused = ", ".join(f"{p} {s['refusals']}" for p, s in summaries.items())
    return [
        f"Quota: {results.quota['tpm']:g} tokens per {results.quota['window_s']:g} s, counted "
        "as the provider counts them (prompt + output, at dispatch), per phase over whole "
        "windows after its first; provider 429s requeued by the gateway: " + refused + ".",
        "",
        *quota_table(summaries),
    ]


def direct_table(results: LabResults) -> list[str]:
    """Markdown: what each policy costs against the engine alone (``direct``): output
    tokens/s over the run and their ratio, request latency, first-token latency, preemptions."""
    out_rate = {
        p: sum(r.output_tokens for r in run.records if m.served(r))
        / m.run_time(run.records, results.duration_s)
        for p, run in results.policies.items()
    }
    base = out_rate[DIRECT]
    lines = [
        "Against the engine alone (`direct`): output tokens/s over the run, request latency "
        "(arrival to last token) and first-token latency p50 / p99 (s):",
        "",
        "| policy | output tok/s | vs direct | request latency | first token | preemptions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p, run in results.policies.items():
        done = [r for r in run.records if m.served(r)]
        latency = [r.finish_s - r.arrival_s for r in done if r.finish_s is not None]
        first = m.first_token_latencies(done)
        pre = "-" if run.preemptions is None else str(run.preemptions)
        lines.append(
            f"| {p} | {_num(out_rate[p], 1)} | {_num(out_rate[p] / base if base else math.nan)} "
            f"| {_num(m.quantile(latency, 0.5))} / {_num(m.quantile(latency, 0.99))} "
            f"| {_num(m.quantile(first, 0.5))} / {_num(m.quantile(first, 0.99))} | {pre} |"
        )
    return lines


def level_table(results: LabResults) -> list[str]:
    """Markdown: each node's share of the service after the warm-up, level by level."""
    ticks = m.Ticks.for_duration(results.duration_s)
    policies = list(results.policies)
    shares = {
        p: m.level_shares(run.records, results.paths, ticks.warmup, ticks.duration, results.prices)
        for p, run in results.policies.items()
    }
    lines = [
        "Share of the service after the warm-up, per level of the tenant tree:",
        "",
        "| level | node | " + " | ".join(policies) + " |",
        "|---:|---|" + "---:|" * len(policies),
    ]
    levels = sorted({lv for s in shares.values() for lv in s})
    for level in levels:
        nodes = list(shares[policies[0]].get(level, {}))
        for node in nodes:
            cells = [f"{shares[p].get(level, {}).get(node, 0.0):.3f}" for p in policies]
            lines.append(f"| {level} | {node} | " + " | ".join(cells) + " |")
    return lines


# -- progress ----------------------------------------------------------------------------------
class ProgressBar:
    """``label [#####.....] done/total`` on stderr, redrawn at most every 0.2 s."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = done >= total
        if not final and now - self._last < 0.2:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if final else ""
        self.stream.write(f"\r{self.label:>14} [{bar}] {done}/{total}{end}")
        self.stream.flush()
