"""Micro-benchmark of the scheduler's hot path: enqueue, pick and charge at growing tenant counts.

    vtc-gateway bench scheduler [--tenants 10,1000,10000,100000] [--ops 20000]
                                [--policies vtc,lcf,vtc-predict,fcfs] [--out FILE]

(also ``python -m tools.scheduler_bench``)

For each policy and tenant count T the run builds a scheduler with T backlogged tenants (one
queued job each, untimed) and then times, in µs per operation:

* ``enqueue``: ``submit`` of ``ops`` jobs to tenants drawn at random (mostly non-empty queues;
  a drained tenant's first job pays for the counter lift);
* ``pick``: ``pop`` of ``ops`` jobs, half before and half after the charges below, so the
  second half also pays for the lazy repair of stale heap keys;
* ``charge``: ``on_output(job, 1)`` ``ops`` times on random running jobs (one output token);
* ``cycle``: one steady-state request, ``submit + pop + 4 x on_output + finish``, with a new
  random tenant each time (reported per request, not per call).

Each phase is repeated ``--repeat`` times on a fresh scheduler and the fastest run is kept (as
``timeit`` does), with the garbage collector off while timing. A benchmark, not a test: it
prints a table and, with ``--out``, writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.scheduler import Job, Scheduler, make_scheduler

PHASES = ("enqueue", "pick", "charge", "cycle")


@dataclass(frozen=True, slots=True)
class Result:
    policy: str
    tenants: int
    ops: int
    enqueue_us: float
    pick_us: float
    charge_us: float
    cycle_us: float
    heap_entries: int | None  # VTC family: lazy-heap size after the run (stale entries included)
    depth: int = 1  # levels of the tenant tree (1: flat; see --fanout)


def _timed(fn: Callable[[], None]) -> float:
    """Seconds ``fn`` takes with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


def _job(tenant: str, rng: random.Random) -> Job:
    return Job(tenant=tenant, prompt_tokens=rng.randint(16, 512), max_tokens=256, arrival=0.0)


def build_tree(
    sched: Scheduler, names: list[str], fanout: int, rng: random.Random
) -> dict[str, str | None]:
    """Group ``names`` ``fanout`` to a group, level by level, until at most ``fanout`` nodes
    are left at the top; returns tenant -> parent (None at the top)."""
    parents: dict[str, str | None] = dict.fromkeys(names)
    level, depth = list(names), 0
    layers: list[list[tuple[str, list[str]]]] = []
    while fanout > 1 and len(level) > fanout:
        depth += 1
        groups = [(f"g{depth}-{i}", level[i : i + fanout]) for i in range(0, len(level), fanout)]
        layers.append(groups)
        level = [g for g, _ in groups]
    for groups in reversed(layers):  # parents first
        for g, kids in groups:
            sched.set_group(g, rng.choice((1.0, 2.0)), parents.get(g))
            for kid in kids:
                parents[kid] = g
    return parents


def run_once(
    policy: str, tenants: int, ops: int, seed: int, fanout: int = 0
) -> dict[str, float | int | None]:
    """One fresh scheduler through every phase; returns seconds per phase (and heap size)."""
    rng = random.Random(seed)
    names = [f"tenant-{i}" for i in range(tenants)]
    sched: Scheduler = make_scheduler(policy, rpm_limit=1 << 30)
    parents = build_tree(sched, names, fanout, rng) if fanout else {}
    for name in names:
        sched.set_tenant(name, rng.choice((1.0, 1.0, 2.0, 4.0)), parent=parents.get(name))
        sched.submit(_job(name, rng), 0.0)

    new_jobs = [_job(rng.choice(names), rng) for _ in range(ops)]
    running: list[Job] = []
    half = ops // 2

    def enqueue() -> None:
        submit = sched.submit
        for j in new_jobs:
            submit(j, 1.0)

    def pick(n: int) -> Callable[[], None]:
        def run() -> None:
            pop, append = sched.pop, running.append
            for _ in range(n):
                j = pop(2.0)
                assert j is not None
                append(j)

        return run

    out: dict[str, float | int | None] = {}
    out["enqueue"] = _timed(enqueue)
    first_pick = _timed(pick(half))
    targets = [running[rng.randrange(len(running))] for _ in range(ops)]

    def charge() -> None:
        on_output = sched.on_output
        for j in targets:
            on_output(j, 1, 3.0)

    out["charge"] = _timed(charge)
    out["pick"] = first_pick + _timed(pick(ops - half))

    cycles = max(1, ops // 10)
    cycle_jobs = [_job(rng.choice(names), rng) for _ in range(cycles)]

    def cycle() -> None:
        submit, pop, on_output, finish = sched.submit, sched.pop, sched.on_output, sched.finish
        for i, new in enumerate(cycle_jobs):
            now = 4.0 + i
            submit(new, now)
            j = pop(now)
            assert j is not None
            for _ in range(4):
                on_output(j, 1, now)
            finish(j, now)

    out["cycle"] = _timed(cycle)
    heap = getattr(sched, "_heap", None)
    out["heap_entries"] = len(heap) if isinstance(heap, list) else None
    out["depth"] = len(sched.path(names[0])) if names else 1
    return out


def bench(
    policy: str, tenants: int, ops: int, repeat: int, seed: int = 1, fanout: int = 0
) -> Result:
    runs = [run_once(policy, tenants, ops, seed + r, fanout) for r in range(repeat)]

    def best(phase: str, per: int) -> float:
        return min(float(r[phase] or 0.0) for r in runs) / per * 1e6

    heap = runs[-1]["heap_entries"]
    return Result(
        policy=policy,
        tenants=tenants,
        ops=ops,
        enqueue_us=best("enqueue", ops),
        pick_us=best("pick", ops),
        charge_us=best("charge", ops),
        cycle_us=best("cycle", max(1, ops // 10)),
        heap_entries=int(heap) if heap is not None else None,
        depth=int(runs[-1]["depth"] or 1),
    )


def format_table(results: Sequence[Result]) -> str:
    head = (
        f"{'policy':<12}{'tenants':>9}{'depth':>6}{'enqueue':>10}{'pick':>9}{'charge':>9}"
        f"{'cycle':>9}"
    )
    note = "µs per op; cycle: per request (submit + pop + 4 x on_output + finish)"
    lines = [note, head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.policy:<12}{r.tenants:>9,}{r.depth:>6}{r.enqueue_us:>10.2f}{r.pick_us:>9.2f}"
            f"{r.charge_us:>9.2f}{r.cycle_us:>9.2f}"
        )
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``vtc-gateway bench scheduler`` (and ``python -m tools.scheduler_bench``)."""
    ap.add_argument("--tenants", type=_ints, default=[10, 1_000, 10_000, 100_000])
    ap.add_argument("--policies", default="vtc,lcf,vtc-predict,fcfs")
    ap.add_argument("--ops", type=int, default=20_000, help="operations timed per phase")
    ap.add_argument("--repeat", type=int, default=3, help="fresh runs per point; best is kept")
    ap.add_argument("--out", type=Path, help="write the results as JSON to this file")
    ap.add_argument(
        "--fanout",
        type=_ints,
        default=[0],
        help="tenant trees to time: groups of this many children per level (0: flat)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` (from :func:`add_arguments`) ask for; print and save it."""
    if args.ops < 2 or args.repeat < 1:
        print("--ops must be >= 2 and --repeat >= 1", file=sys.stderr)
        return 2
    results: list[Result] = []
    for policy in [p for p in args.policies.split(",") if p]:
        for t in args.tenants:
            for fanout in args.fanout:
                results.append(bench(policy, t, args.ops, args.repeat, fanout=fanout))
                print(f"  {policy} x {t:,} tenants done", file=sys.stderr, flush=True)
    print(format_table(results))
    if args.out is not None:
        doc = {
            "benchmark": "tools.scheduler_bench",
            "unit": "microseconds per operation (cycle: per request)",
            "ops": args.ops,
            "repeat": args.repeat,
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "results": [asdict(r) for r in results],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.scheduler_bench", description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
