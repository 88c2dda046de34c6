"""Calibration check: drive the pure engine core in virtual time with a paper workload.

``python -m backends.sim.calibrate`` runs the VTC paper's ``overload`` workload (2 clients at
1.5/s and 3/s, constant-rate arrivals, 256 prompt / 256 output tokens, ``ignore_eos``, 360 s)
through :class:`~backends.sim.engine.EngineCore` with the ``a10g-llama2-7b`` profile, FCFS
order, no HTTP and no sleeping, and reports the throughput (prompt + output tokens of completed
requests per second). The paper measured about 876-904 tokens/s for this workload on an A10G;
the profile's coefficients are tuned to land there. Pass ``--profile`` to check another profile
or ``--l-floor/--a/--b/--k/--overhead`` (ms, µs, ns as labelled) to try other coefficients.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

from backends.sim.costmodel import CostModel, Profile, get_profile
from backends.sim.engine import EngineConfig, EngineCore

__all__ = ["Arrival", "SimStats", "overload_arrivals", "run_virtual", "trace_arrivals"]


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a workload: when it arrives and its sizes."""

    time: float
    client: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class SimStats:
    """Summary of a virtual-time run."""

    duration: float
    completed: int
    submitted: int
    throughput: float  # (prompt + output tokens of completed requests) / duration
    output_throughput: float
    steps: int
    preemptions: int
    mean_running: float
    wall_seconds: float


def overload_arrivals(duration: float = 360.0) -> list[Arrival]:
    """The paper's ``overload`` workload: constant-rate clients at 1.5/s and 3/s, 256/256."""
    arrivals: list[Arrival] = []
    for client, rate in (("c1", 1.5), ("c2", 3.0)):
        n = 0
        while n / rate < duration:
            arrivals.append(Arrival(n / rate, client, 256, 256))
            n += 1
    arrivals.sort(key=lambda a: (a.time, a.client))
    return arrivals


def trace_arrivals(path: str) -> list[Arrival]:
    """Arrivals from a CSV trace with columns arrival_s, tenant, prompt_tokens, output_tokens."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    arrivals = [
        Arrival(
            float(r["arrival_s"]),
            r["tenant"],
            max(1, int(r["prompt_tokens"])),
            max(1, int(r["output_tokens"])),
        )
        for r in rows
    ]
    arrivals.sort(key=lambda a: a.time)
    return arrivals


def run_virtual(profile: Profile, arrivals: list[Arrival], duration: float) -> SimStats:
    """Run ``arrivals`` FCFS through a fresh engine until ``duration`` (virtual seconds).

    Arrivals that happen during a step join the queue at the step's end, as in a real engine.
    """
    core = EngineCore(EngineConfig.from_profile(profile), profile.cost)
    sizes: dict[str, int] = {}
    t = 0.0
    i = 0
    done_tokens = 0
    done_output = 0
    completed = 0
    running_sum = 0
    wall0 = time.perf_counter()
    while t < duration:
        while i < len(arrivals) and arrivals[i].time <= t:
            a = arrivals[i]
            rid = f"r{i}"
            core.add_request(rid, a.prompt_tokens, a.output_tokens, a.output_tokens, a.time)
            sizes[rid] = a.prompt_tokens + a.output_tokens
            i += 1
        if not core.has_unfinished():
            if i >= len(arrivals):
                break
            t = arrivals[i].time
            continue
        running_sum += core.num_running
        result = core.step(t)
        t = result.end
        if t > duration:
            break
        for out in result.outputs:
            if out.finished:
                completed += 1
                done_tokens += sizes[out.req_id]
                done_output += out.num_output_tokens
    steps = core.num_steps
    return SimStats(
        duration=duration,
        completed=completed,
        submitted=i,
        throughput=done_tokens / duration,
        output_throughput=done_output / duration,
        steps=steps,
        preemptions=core.num_preemptions,
        mean_running=running_sum / steps if steps else 0.0,
        wall_seconds=time.perf_counter() - wall0,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; prints a summary and optionally JSON."""
    parser = argparse.ArgumentParser(prog="python -m backends.sim.calibrate", description=__doc__)
    parser.add_argument("--profile", default="a10g-llama2-7b")
    parser.add_argument("--duration", type=float, help="seconds (default: 360, trace: 600)")
    parser.add_argument(
        "--trace", help="CSV trace (arrival_s, tenant, prompt_tokens, output_tokens) instead"
    )
    parser.add_argument("--l-floor", type=float, help="ms")
    parser.add_argument("--a", type=float, help="ms")
    parser.add_argument("--b", type=float, help="µs per token")
    parser.add_argument("--k", type=float, help="ns per context token")
    parser.add_argument("--overhead", type=float, help="ms")
    parser.add_argument("--json", action="store_true", help="print the stats as JSON")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    c = profile.cost
    cost = CostModel(
        l_floor=args.l_floor * 1e-3 if args.l_floor is not None else c.l_floor,
        a=args.a * 1e-3 if args.a is not None else c.a,
        b=args.b * 1e-6 if args.b is not None else c.b,
        k=args.k * 1e-9 if args.k is not None else c.k,
        overhead=args.overhead * 1e-3 if args.overhead is not None else c.overhead,
    )
    if args.trace:
        duration = args.duration if args.duration is not None else 600.0
        arrivals, workload = trace_arrivals(args.trace), "trace"
    else:
        duration = args.duration if args.duration is not None else 360.0
        arrivals, workload = overload_arrivals(duration), "overload"
    stats = run_virtual(profile.with_cost(cost), arrivals, duration)
    if args.json:
        print(json.dumps(asdict(stats), indent=2))
    else:
        print(
            f"profile {profile.name}: {workload} {duration:.0f}s -> "
            f"{stats.throughput:.1f} tokens/s (prompt+output), "
            f"{stats.output_throughput:.1f} output tokens/s, {stats.completed}/{stats.submitted} "
            f"completed, {stats.steps} steps, mean batch {stats.mean_running:.1f}, "
            f"{stats.preemptions} preemptions, simulated in {stats.wall_seconds:.2f}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
