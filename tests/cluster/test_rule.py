"""The Lua scripts against their statement in Python (``gateway/cluster/rule.py``).

Seeded random scripts of operations (several replicas, models, tenants and backends; claims
with holds and batches, marks, syncs with flushed charges, slots booked and returned,
registrations, replicas leaving or losing their lease) run against a real redis-server, through
the scripts' typed calls, and against :class:`SharedState`; after every operation the replies,
the wake-ups published and the whole state must agree (counters within float tolerance).

Leases: the differential scripts never depend on Redis's clock: a live replica's lease is far
in the future, and a replica is made to lose its lease by a heartbeat with a lease far in the
past (each one later than the one before, so the reaping order is the same in both), which the
next operation reaps. ``test_lease_runs_out`` checks reaping by real time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from gateway.cluster import scripts
from gateway.cluster.rule import Candidate, Claim, Flush, SharedState

from .conftest import RedisServer

SEEDS = 30
OPS = 200
P = "{t}"
SEP = "\x1f"
REPLICAS = ("r0", "r1", "r2")
MODELS = ("m0", "m1")
TENANTS = ("a", "b", "c", "d")
BACKENDS = ("b0", "b1", "b2")
LIVE = 10**12  # ms: a lease that does not run out during a test


#: per method of SharedState: its arguments as ARGV, the reply as a value, the script
ARGS: dict[str, Callable[..., list[Any]]] = {
    "sync": scripts.sync_args,
    "register": scripts.register_args,
    "mark": scripts.mark_args,
    "claim": scripts.claim_args,
    "add_slots": scripts.slots_args,
    "leave": lambda: [],
}
REPLIES: dict[str, Callable[[Any], Any]] = {
    "sync": scripts.sync_reply,
    "register": bool,
    "mark": scripts.mark_reply,
    "claim": scripts.claim_reply,
    "add_slots": bool,
    "leave": lambda raw: None,
}
SCRIPT_OF = {"add_slots": "slots"}


class Lua:
    """The scripts, called like :class:`SharedState`'s methods (the same typed arguments and
    replies) through the mapping in :mod:`gateway.cluster.scripts`."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.sha = {name: client.script_load(src) for name, src in scripts.SCRIPTS.items()}

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        replica, lease_ms, *rest = args if method != "leave" else (*args, 0)
        sha = self.sha[SCRIPT_OF.get(method, method)]
        argv = ARGS[method](*rest)
        return REPLIES[method](self.r.evalsha(sha, 0, P, replica, int(lease_ms), *argv))


# -- the whole state, read the same way from both -----------------------------------------------
def redis_state(r: redis.Redis) -> dict[str, Any]:
    pipe = r.pipeline(transaction=False)
    pipe.zrange(f"{P}:replicas", 0, -1)
    for m in MODELS:
        pipe.hgetall(f"{P}:c:{m}")
        pipe.hgetall(f"{P}:q:{m}")
        pipe.hgetall(f"{P}:d:{m}")
        pipe.zrange(f"{P}:bl:{m}", 0, -1, withscores=True)
        pipe.get(f"{P}:last:{m}")
    for b in BACKENDS:
        pipe.hgetall(f"{P}:be:{b}")
    for rep in REPLICAS:
        pipe.hgetall(f"{P}:hold:{rep}")
        pipe.smembers(f"{P}:rq:{rep}")
        pipe.hgetall(f"{P}:rd:{rep}")
    pipe.keys("*")
    res = iter(pipe.execute())
    out: dict[str, Any] = {"replicas": sorted(s.decode() for s in next(res))}
    models = {}
    for m in MODELS:
        c, q, d, bl, last = (next(res) for _ in range(5))
        order = {
            "counters": {k.decode(): float(v) for k, v in c.items()},
            "sites": {k.decode(): int(v) for k, v in q.items()},
            "demand": {k.decode(): int(v) for k, v in d.items()},
            "backlog": {k.decode(): float(v) for k, v in bl},
            "last": last.decode() if last is not None else None,
        }
        if any(order.values()):
            models[m] = order
    out["models"] = models
    slots = {}
    for b in BACKENDS:
        be = next(res)
        if be:
            slots[b] = (int(be[b"s"]), int(be[b"k"]))
    out["slots"] = slots
    holds, waits, queued = {}, {}, {}
    for rep in REPLICAS:
        hold, rq, rd = next(res), next(res), next(res)
        held: dict[str, list[int]] = {}
        for f, v in hold.items():
            backend, kind = f.decode().split(SEP)
            held.setdefault(backend, [0, 0])[kind == "k"] = int(v)
        if held:
            holds[rep] = {b: tuple(v) for b, v in held.items()}
        if rq:
            waits[rep] = sorted(tuple(m.decode().split(SEP)) for m in rq)
        if rd:
            queued[rep] = {tuple(f.decode().split(SEP)): int(v) for f, v in rd.items()}
    out.update(holds=holds, waits=waits, queued=queued)
    out["keys"] = sorted(k.decode() for k in next(res))
    return out


def rule_state(s: SharedState) -> dict[str, Any]:
    out: dict[str, Any] = {"replicas": sorted(s.leases)}
    models = {}
    for m, o in s.orders.items():
        order = {
            "counters": dict(o.counters),
            "sites": dict(o.sites),
            "demand": dict(o.demand),
            "backlog": dict(o.backlog),
            "last": o.last,
        }
        if any(order.values()):
            models[m] = order
    out["models"] = models
    out["slots"] = {b: tuple(v) for b, v in s.slots.items()}
    out["holds"] = {r: {b: tuple(v) for b, v in st.holds.items()} for r, st in s.replicas.items()}
    out["waits"] = {r: sorted(st.waits) for r, st in s.replicas.items()}
    out["queued"] = {r: dict(st.queued) for r, st in s.replicas.items()}
    for name in ("holds", "waits", "queued"):
        out[name] = {r: v for r, v in out[name].items() if v}
    keys = [f"{P}:replicas"] if out["replicas"] else []
    for m, order in models.items():
        names = {"counters": "c", "sites": "q", "demand": "d", "backlog": "bl", "last": "last"}
        keys += [f"{P}:{names[k]}:{m}" for k, v in order.items() if v]
    keys += [f"{P}:be:{b}" for b in out["slots"]]
    for name, prefix in (("holds", "hold"), ("waits", "rq"), ("queued", "rd")):
        keys += [f"{P}:{prefix}:{r}" for r in out[name]]
    out["keys"] = sorted(keys)
    return out


def same(a: Any, b: Any) -> bool:
    """Equal, floats within the tolerance of counters (Redis keeps 14 significant digits)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        return type(a) is type(b) and same(dataclasses.astuple(a), dataclasses.astuple(b))  # type: ignore[arg-type]
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, int | float) or not isinstance(b, int | float):
            return False
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# -- seeded scripts -----------------------------------------------------------------------------
def dyadic(rng: random.Random, top: float) -> float:
    """A multiple of 1/8: sums stay exact, so ties in the order are ties in both."""
    return rng.randint(0, int(top * 8)) / 8


def operations(seed: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """``(method, args)`` per operation of seed ``seed``'s script."""
    rng = random.Random(seed)
    capacity = {b: (rng.randint(1, 6), rng.randint(40, 300)) for b in BACKENDS}
    expiries = 0

    def flushes(first: tuple[str, str] | None = None) -> tuple[Flush, ...]:
        keys = [(m, t) for m in MODELS for t in TENANTS]
        chosen = rng.sample(keys, rng.randint(0, 3))
        if first is not None:
            chosen = [first, *[k for k in chosen if k != first]]
        return tuple(Flush(m, t, dyadic(rng, 50), dyadic(rng, 10)) for m, t in chosen)

    def candidates() -> tuple[Candidate, ...]:
        out = []
        for b in rng.sample(BACKENDS, rng.randint(1, len(BACKENDS))):
            seqs, kv = capacity[b]
            if rng.random() < 0.1:  # this replica knows another capacity
                seqs, kv = rng.randint(0, 5), rng.randint(0, 250)
            out.append(Candidate(b, seqs, kv))
        return tuple(out)

    def credit() -> float:
        return dyadic(rng, 5) if rng.random() < 0.3 else 0.0

    def register(r: str) -> tuple[str, tuple[Any, ...]]:
        holdings = [
            (b, rng.randint(0, 3), rng.randint(0, 150))
            for b in rng.sample(BACKENDS, rng.randint(0, 2))
        ]
        keys = rng.sample([(m, t) for m in MODELS for t in TENANTS], rng.randint(0, 3))
        return "register", (r, LIVE, holdings, [(m, t, rng.randint(1, 4)) for m, t in keys])

    known = set(REPLICAS)
    for r in REPLICAS:
        yield "register", (r, LIVE, [], [])
    for _ in range(OPS):
        r, m, t = rng.choice(REPLICAS), rng.choice(MODELS), rng.choice(TENANTS)
        x = rng.random()
        if x < 0.06 or (r not in known and rng.random() < 0.6):
            known.add(r)
            yield register(r)
        elif x < 0.44:  # a claim: a batch of one to three, or a hold
            hold = rng.random() < 0.25
            n = rng.randint(1, 3)
            reqs = tuple(
                (0.0 if hold and rng.random() < 0.8 else dyadic(rng, 20), rng.randint(0, 80))
                for _ in range(n)
            )
            waiting = None if hold else n + rng.choice((0, 0, 1, 3))
            claim = Claim(m, t, waiting, credit(), reqs, candidates(), flushes((m, t)))
            yield "claim", (r, LIVE, claim)
        elif x < 0.56:
            yield "mark", (r, LIVE, m, t, True, credit(), rng.randint(0, 4))
        elif x < 0.64:
            yield "mark", (r, LIVE, m, t, False, 0.0, 0)
        elif x < 0.72:
            yield "sync", (r, LIVE, list(flushes()))
        elif x < 0.94:  # releases (sometimes more than held) and bookings
            seqs = rng.choice((-3, -2, -1, -1, 1))
            kv = seqs * rng.randint(0, 100)
            yield "add_slots", (r, LIVE, rng.choice(BACKENDS), seqs, kv)
        elif x < 0.97:
            known.discard(r)
            yield "leave", (r,)
        else:  # the lease runs out: the next operation of anyone reaps the replica
            known.discard(r)
            expiries += 1
            yield "sync", (r, -(10**9) + expiries * 10**6, [])


def wakes(sub: Any, n: int) -> list[str]:
    """The next ``n`` wake-ups published, then any more that arrived meanwhile."""
    out: list[str] = []
    deadline = time.monotonic() + 5
    while len(out) < n and time.monotonic() < deadline:
        msg = sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is not None:
            out.append(msg["data"].decode())
    while (msg := sub.get_message(ignore_subscribe_messages=True, timeout=0)) is not None:
        out.append(msg["data"].decode())
    return sorted(out)


def run_script(client: redis.Redis, lua: Lua, sub: Any, seed: int, rule: SharedState) -> None:
    client.flushdb()
    for i, (method, args) in enumerate(operations(seed)):
        expected = getattr(rule, method)(*args)
        got = lua.call(method, args)
        where = f"seed {seed}, op {i}: {method}{args}"
        assert same(got, expected), f"{where}\n lua:  {got}\n rule: {expected}"
        want_wakes = sorted(rule.wakes)
        rule.wakes.clear()
        lua_state, rule_st = redis_state(client), rule_state(rule)
        assert same(lua_state, rule_st), f"{where}\n lua:  {lua_state}\n rule: {rule_st}"
        assert wakes(sub, len(want_wakes)) == want_wakes, where


@pytest.fixture
def lua(redis_server: RedisServer) -> Iterator[tuple[redis.Redis, Lua, Any]]:
    client = redis.Redis.from_url(redis_server.url)
    sub = client.pubsub()
    sub.subscribe(f"{P}:wake")
    try:
        yield client, Lua(client), sub
    finally:
        sub.close()
        client.close()


def test_scripts_decide_as_the_rule(lua: tuple[redis.Redis, Lua, Any]) -> None:
    client, scripts_, sub = lua
    for seed in range(SEEDS):
        run_script(client, scripts_, sub, seed, SharedState(clock=lambda: 0.0))


def test_the_scripts_cover_every_outcome() -> None:
    """The seeded scripts reach every claim outcome, refusals for the demand ahead, holds,
    batches, unknown replicas and reaped leases (else the comparison proves little)."""
    seen: set[str] = set()
    for seed in range(SEEDS):
        rule = SharedState(clock=lambda: 0.0)
        for method, args in operations(seed):
            before = set(rule.leases)
            res = getattr(rule, method)(*args)
            if method != "leave" and before - set(rule.leases):
                seen.add("reaped")
            if method == "claim":
                if res is None:
                    seen.add("claim unknown")
                    continue
                kind = "hold" if args[2].waiting is None else "claim"
                seen.add(f"{kind} {res.status} {min(len(res.backends), 2)}")
                if res.status == "order" and not res.backends and res.lower:
                    seen.add("order refused with room")
                if res.backends and res.lower and kind == "claim":
                    seen.add("granted past tenants ahead")
    for outcome in (
        "claim ok 1",
        "claim ok 2",
        "claim full 0",
        "claim order 0",
        "claim order 1",
        "claim full 1",
        "hold ok 1",
        "hold order 0",
        "claim unknown",
        "order refused with room",
        "granted past tenants ahead",
        "reaped",
    ):
        assert outcome in seen, (outcome, sorted(seen))


def test_lease_runs_out(lua: tuple[redis.Redis, Lua, Any]) -> None:
    """Reaping by Redis's own clock: a replica that stops renewing its lease loses its slots
    and leaves the backlog once the lease ran out, not before."""
    client, scripts_, _ = lua
    client.flushdb()
    rule = SharedState(clock=lambda: time.time() * 1000)
    lease = 1000
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("register", ("r0", lease, [("b0", 2, 40)], [("m0", "a", 3), ("m0", "b", 1)])),
        ("register", ("r1", LIVE, [("b0", 1, 10)], [("m0", "a", 1)])),
        ("sync", ("r1", LIVE, [])),  # r0's lease still runs
    ]
    for method, args in steps:
        assert same(scripts_.call(method, args), getattr(rule, method)(*args))
        assert same(redis_state(client), rule_state(rule))
    assert "r0" in rule.leases
    time.sleep(lease / 1000 + 0.3)
    got = scripts_.call("sync", ("r1", LIVE, []))
    assert same(got, rule.sync("r1", LIVE, []))
    assert got.replicas == 1
    state = redis_state(client)
    assert same(state, rule_state(rule))
    assert state["slots"]["b0"] == (1, 10)
    assert state["models"]["m0"]["backlog"].keys() == {"a"}
    assert state["models"]["m0"]["last"] == "b"
