"""The Lua scripts against their statement in Python (``gateway/cluster/rule.py``).

Seeded random scripts of operations (several replicas, models, tenants and backends; claims
with holds and batches, marks, syncs with flushed charges, slots booked and returned,
registrations, replicas leaving or losing their lease) run against a real redis-server, through
the scripts' typed calls, and against :class:`SharedState`; the replies, the wake-ups published
(channel and message: the broadcast and each replica's own) and the whole state must agree
(counters within float tolerance). Most scripts go as the store sends them, through ``BATCH``
(runs of one to four consecutive operations of one replica in one call; the state and the
wake-ups are compared after each call); every third goes one operation per call through the
operation's own script, compared after each operation.

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
from gateway.cluster.rule import Candidate, Claim, Flush, Node, Place, SharedState, flat

from .conftest import RedisServer

SEEDS = 30
OPS = 200
P = "{t}"
SEP = "\x1f"
REPLICAS = ("r0", "r1", "r2")
MODELS = ("m0", "m1")
TENANTS = ("a", "b", "c", "d", "e")
#: each tenant's places, (tier, its groups from the top): the usual one first, then where a
#: reload may move it (to another group, another tier, or its group to another tier)
PLACES: dict[str, list[tuple[int, tuple[str, ...]]]] = {
    "a": [(0, ("g1",)), (0, ("g2",))],
    "b": [(0, ("g1",))],
    "c": [(0, ("g2", "g3")), (-1, ())],
    "d": [(0, ()), (-1, ())],
    "e": [(-1, ("g4",)), (0, ("g4",))],
}
WEIGHTS = {"g1": 2.0, "g2": 1.0, "g3": 0.5, "g4": 4.0, "a": 1.0, "b": 2.0, "c": 0.5, "d": 1.0}
CAPS = {"a": 1, "g2": 2, "d": 3}  # max_in_flight (a reload may lift one)
TALLIES = ("~q\x1fa", "~q\x1fb", "~a\x1fm0\x1fa")  # counts summed for each replica's view
NODES = (*TENANTS, "g1", "g2", "g3", "g4")
PARENTS = ("~t0", "~t-1", "g1", "g2", "g3", "g4")
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

Op = tuple[str, tuple[Any, ...]]  # (method of SharedState, its arguments)


def caller(op: Op) -> tuple[str, int]:
    """The (replica, lease_ms) an operation is sent with (a leaving replica's lease unused)."""
    method, args = op
    return (args[0], LIVE) if method == "leave" else (args[0], int(args[1]))


class Lua:
    """The scripts, called like :class:`SharedState`'s methods (the same typed arguments and
    replies) through the mapping in :mod:`gateway.cluster.scripts`."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.sha = {name: client.script_load(src) for name, src in scripts.SCRIPTS.items()}

    def call(self, op: Op) -> Any:
        """One operation through its own script."""
        method, args = op
        replica, lease_ms = caller(op)
        argv = ARGS[method](*args[2:])
        sha = self.sha[SCRIPT_OF.get(method, method)]
        return REPLIES[method](self.r.evalsha(sha, 0, P, replica, lease_ms, *argv))

    def batch(self, ops: list[Op]) -> list[Any]:
        """Operations of one replica with one lease in one ``BATCH`` call, as the store sends a
        round trip; their replies in order."""
        replica, lease_ms = caller(ops[0])
        calls = [(SCRIPT_OF.get(m, m), ARGS[m](*args[2:])) for m, args in ops]
        raw = self.r.evalsha(self.sha["batch"], 0, P, replica, lease_ms, *scripts.batch_args(calls))
        assert len(raw) == len(ops)
        return [REPLIES[m](reply) for (m, _), reply in zip(ops, raw, strict=True)]


# -- the whole state, read the same way from both -----------------------------------------------
def redis_state(r: redis.Redis) -> dict[str, Any]:
    pipe = r.pipeline(transaction=False)
    pipe.zrange(f"{P}:replicas", 0, -1)
    for m in MODELS:
        pipe.hgetall(f"{P}:c:{m}")
        pipe.hgetall(f"{P}:up:{m}")
        pipe.hgetall(f"{P}:q:{m}")
        pipe.hgetall(f"{P}:d:{m}")
        pipe.hgetall(f"{P}:last:{m}")
        pipe.zrange(f"{P}:tiers:{m}", 0, -1, withscores=True)
        for parent in PARENTS:
            pipe.zrange(f"{P}:bl:{m}{SEP}{parent}", 0, -1, withscores=True)
    for m in MODELS:
        for t in TENANTS:
            pipe.smembers(f"{P}:w:{m}{SEP}{t}")
    for b in BACKENDS:
        pipe.hgetall(f"{P}:be:{b}")
        pipe.smembers(f"{P}:bm:{b}")
    pipe.hgetall(f"{P}:cap")
    pipe.hgetall(f"{P}:run")
    pipe.hgetall(f"{P}:caps")
    for rep in REPLICAS:
        pipe.hgetall(f"{P}:hold:{rep}")
        pipe.smembers(f"{P}:rq:{rep}")
        pipe.hgetall(f"{P}:rd:{rep}")
        pipe.hgetall(f"{P}:rr:{rep}")
    pipe.keys("*")
    res = iter(pipe.execute())
    out: dict[str, Any] = {"replicas": sorted(s.decode() for s in next(res))}
    models = {}
    for m in MODELS:
        c, up, q, d, last, tiers = (next(res) for _ in range(6))
        backlog = {parent: {k.decode(): float(v) for k, v in next(res)} for parent in PARENTS}
        order = {
            "counters": {k.decode(): float(v) for k, v in c.items()},
            "up": {k.decode(): v.decode() for k, v in up.items()},
            "sites": {k.decode(): int(v) for k, v in q.items()},
            "demand": {k.decode(): int(v) for k, v in d.items()},
            "backlog": {parent: v for parent, v in backlog.items() if v},
            "last": {k.decode(): v.decode() for k, v in last.items()},
            "tiers": {k.decode(): int(v) for k, v in tiers},
        }
        models[m] = order
    for m in MODELS:
        where = {t: sorted(r.decode() for r in w) for t in TENANTS if (w := next(res))}
        models[m]["where"] = where
    out["models"] = {m: order for m, order in models.items() if any(order.values())}
    slots, models_of = {}, {}
    for b in BACKENDS:
        be, bm = next(res), next(res)
        if be:
            slots[b] = (int(be[b"s"]), int(be[b"k"]))
        if bm:
            models_of[b] = sorted(m.decode() for m in bm)
    out["slots"] = slots
    out["models_of"] = models_of
    out["capacity"] = {k.decode(): int(v) for k, v in next(res).items()}
    out["running"] = {k.decode(): int(v) for k, v in next(res).items()}
    out["caps"] = {k.decode(): int(v) for k, v in next(res).items()}
    holds, waits, queued, runs = {}, {}, {}, {}
    for rep in REPLICAS:
        hold, rq, rd, rr = next(res), next(res), next(res), next(res)
        if rr:
            runs[rep] = {k.decode(): int(v) for k, v in rr.items()}
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
    out.update(holds=holds, waits=waits, queued=queued, runs=runs)
    out["keys"] = sorted(k.decode() for k in next(res))
    return out


def rule_state(s: SharedState) -> dict[str, Any]:
    out: dict[str, Any] = {"replicas": sorted(s.leases)}
    models = {}
    for m, o in s.orders.items():
        order = {
            "counters": dict(o.counters),
            "up": dict(o.up),
            "sites": {t: len(rs) for t, rs in o.sites.items()},
            "demand": dict(o.demand),
            "backlog": {parent: dict(v) for parent, v in o.backlog.items() if v},
            "last": dict(o.last),
            "tiers": dict(o.tiers),
            "where": {t: sorted(rs) for t, rs in o.sites.items()},
        }
        if any(order.values()):
            models[m] = order
    out["models"] = models
    out["slots"] = {b: tuple(v) for b, v in s.slots.items()}
    out["models_of"] = {b: sorted(ms) for b, ms in s.models_of.items() if ms}
    out["capacity"] = dict(s.capacity)
    out["running"] = dict(s.running)
    out["caps"] = dict(s.caps)
    out["holds"] = {r: {b: tuple(v) for b, v in st.holds.items()} for r, st in s.replicas.items()}
    out["waits"] = {r: sorted(st.waits) for r, st in s.replicas.items()}
    out["queued"] = {r: dict(st.queued) for r, st in s.replicas.items()}
    out["runs"] = {r: dict(st.runs) for r, st in s.replicas.items()}
    for name in ("holds", "waits", "queued", "runs"):
        out[name] = {r: v for r, v in out[name].items() if v}
    keys = [f"{P}:replicas"] if out["replicas"] else []
    names = {"counters": "c", "up": "up", "sites": "q", "demand": "d", "last": "last"}
    names["tiers"] = "tiers"
    for m, order in models.items():
        keys += [f"{P}:{names[k]}:{m}" for k, v in order.items() if v and k in names]
        keys += [f"{P}:bl:{m}{SEP}{parent}" for parent in order["backlog"]]
        keys += [f"{P}:w:{m}{SEP}{t}" for t in order["where"]]
    keys += [f"{P}:be:{b}" for b in out["slots"]]
    keys += [f"{P}:bm:{b}" for b in out["models_of"]]
    keys += [f"{P}:cap"] if out["capacity"] else []
    keys += [f"{P}:run"] if out["running"] else []
    keys += [f"{P}:caps"] if out["caps"] else []
    for name, prefix in (("holds", "hold"), ("waits", "rq"), ("queued", "rd"), ("runs", "rr")):
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


def operations(seed: int) -> Iterator[Op]:
    """``(method, args)`` per operation of seed ``seed``'s script."""
    rng = random.Random(seed)
    capacity = {b: (rng.randint(1, 6), rng.randint(40, 300)) for b in BACKENDS}
    expiries = 0

    def flushes(first: tuple[str, str] | None = None) -> tuple[Flush, ...]:
        keys = [(m, t) for m in MODELS for t in NODES]
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

    def place(t: str) -> Place:
        tier, groups = PLACES[t][0] if rng.random() < 0.85 else rng.choice(PLACES[t])
        lifted = rng.random() < 0.1
        path = tuple(
            Node(n, WEIGHTS.get(n, 1.0), credit(), 0 if lifted else CAPS.get(n, 0))
            for n in (*groups, t)
        )
        return Place(path, tier)

    def runs() -> list[tuple[str, int]]:  # capped nodes' running requests, and tallies
        names = [*sorted(CAPS), *TALLIES]
        return [(n, rng.randint(0, 3)) for n in rng.sample(names, rng.randint(0, 3))]

    def register(r: str) -> Op:
        holdings = [
            (b, rng.randint(0, 3), rng.randint(0, 150))
            for b in rng.sample(BACKENDS, rng.randint(0, 2))
        ]
        keys = rng.sample([(m, t) for m in MODELS for t in TENANTS], rng.randint(0, 3))
        waiting = [(m, place(t), rng.randint(1, 4)) for m, t in keys]
        return "register", (r, LIVE, holdings, waiting, runs())

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
            forced = not hold and rng.random() < 0.1  # granted by the replica on leased slots
            if forced:  # the KV each leased slot's booking changes by
                reqs = tuple((cost, rng.randint(-60, 20)) for cost, _ in reqs)
            claim = Claim(m, place(t), waiting, reqs, candidates(), flushes((m, t)), forced)
            yield "claim", (r, LIVE, claim)
        elif x < 0.56:
            yield "mark", (r, LIVE, m, t, place(t), rng.randint(0, 4))
        elif x < 0.64:
            yield "mark", (r, LIVE, m, t, None, 0)
        elif x < 0.72:
            kv = [(b, rng.randint(0, 200)) for b in rng.sample(BACKENDS, rng.randint(0, 2))]
            views = rng.sample(MODELS, rng.randint(0, 2)), rng.sample(BACKENDS, rng.randint(0, 3))
            yield "sync", (r, LIVE, list(flushes()), runs(), kv, *views)
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


CHANNELS = (f"{P}:wake", *(f"{P}:wake:{r}" for r in REPLICAS))


def channel(replica: str | None) -> str:
    """The channel of a wake-up of :attr:`SharedState.wakes` (None: every replica's)."""
    return f"{P}:wake" if replica is None else f"{P}:wake:{replica}"


def wakes(sub: Any, n: int) -> list[tuple[str, str]]:
    """The next ``n`` wake-ups published, (channel, message), then any more that arrived
    meanwhile."""
    out: list[tuple[str, str]] = []
    deadline = time.monotonic() + 5
    while len(out) < n and time.monotonic() < deadline:
        msg = sub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is not None:
            out.append((msg["channel"].decode(), msg["data"].decode()))
    while (msg := sub.get_message(ignore_subscribe_messages=True, timeout=0)) is not None:
        out.append((msg["channel"].decode(), msg["data"].decode()))
    return sorted(out)


def calls(seed: int) -> Iterator[list[Op]]:
    """Seed ``seed``'s operations as script calls: one each for every third seed, else runs
    of one to four consecutive operations of one replica with one lease (one ``BATCH``)."""
    rng = random.Random(f"batch {seed}")
    run: list[Op] = []
    size = 1
    for op in operations(seed):
        if run and (len(run) >= size or caller(op) != caller(run[0])):
            yield run
            run = []
        if not run:
            size = 1 if seed % 3 == 0 else rng.randint(1, 4)
        run.append(op)
    if run:
        yield run


def run_script(client: redis.Redis, lua: Lua, sub: Any, seed: int, rule: SharedState) -> None:
    client.flushdb()
    for i, ops in enumerate(calls(seed)):
        where = f"seed {seed}, call {i}: {ops}"
        with rule.batch():  # (one operation alone: the same)
            expected = [getattr(rule, method)(*args) for method, args in ops]
        got = lua.batch(ops) if seed % 3 else [lua.call(ops[0])]
        assert same(got, expected), f"{where}\n lua:  {got}\n rule: {expected}"
        want_wakes = sorted((channel(r), msg) for r, msg in rule.wakes)
        rule.wakes.clear()
        lua_state, rule_st = redis_state(client), rule_state(rule)
        assert same(lua_state, rule_st), f"{where}\n lua:  {lua_state}\n rule: {rule_st}"
        got_wakes = wakes(sub, len(want_wakes))
        assert got_wakes == want_wakes, f"{where}\n lua:  {got_wakes}\n rule: {want_wakes}"


@pytest.fixture
def lua(redis_server: RedisServer) -> Iterator[tuple[redis.Redis, Lua, Any]]:
    client = redis.Redis.from_url(redis_server.url)
    sub = client.pubsub()
    sub.subscribe(*CHANNELS)
    try:
        yield client, Lua(client), sub
    finally:
        sub.close()
        client.close()


def test_scripts_decide_as_the_rule(lua: tuple[redis.Redis, Lua, Any]) -> None:
    client, scripts_, sub = lua
    for seed in range(SEEDS):
        run_script(client, scripts_, sub, seed, SharedState(clock=lambda: 0.0))


def wake_outcomes(rule: SharedState) -> set[str]:
    """What the wake-ups of one operation show: broadcasts of a release, targeted ones, one
    release waking several replicas, and one leaving out a replica where a backlogged tenant
    of the backend's models waits (the room reached only the tenants before it)."""
    seen: set[str] = set()
    woken: dict[str, set[str]] = {}
    for replica, msg in rule.wakes:
        if replica is None:
            seen.add(f"wake every replica {msg[0]}")
        else:
            woken.setdefault(msg[2:], set()).add(replica)
    for backend, replicas in woken.items():
        seen.add("wake targeted" if len(replicas) == 1 else "wake targeted at several")
        waiting = {
            r
            for m in rule.models_of[backend]
            if m in rule.orders
            for rs in rule.orders[m].sites.values()
            for r in rs
        }
        if waiting - replicas:
            seen.add("wake cut by the room")
    rule.wakes.clear()
    return seen


def tree_outcomes(rule: SharedState, ups: dict[str, dict[str, str]]) -> set[str]:
    """What one operation shows of the tree: groups in the backlog (two under one parent),
    nodes moved to another parent (a reload)."""
    seen: set[str] = set()
    for m, order in rule.orders.items():
        for children in order.backlog.values():
            groups = [c for c in children if c in order.backlog]
            if groups:
                seen.add("a group backlogged")
            if len(groups) > 1 and len(set(children.values())) > 1:
                seen.add("a group behind a group")
        for node, parent in ups.get(m, {}).items():
            if order.up.get(node) != parent:
                seen.add("moved by a reload")
    return seen


def test_the_scripts_cover_every_outcome() -> None:
    """The seeded scripts reach every claim outcome, refusals for the demand ahead, holds,
    batches, unknown replicas, reaped leases, a grant that leaves no room and each kind of
    wake-up (else the comparison proves little)."""
    seen: set[str] = set()
    for seed in range(SEEDS):
        rule = SharedState(clock=lambda: 0.0)
        for method, args in operations(seed):
            before = set(rule.leases)
            ups = {m: dict(o.up) for m, o in rule.orders.items()}
            res = getattr(rule, method)(*args)
            seen |= wake_outcomes(rule)
            seen |= tree_outcomes(rule, ups)
            if method != "leave" and before - set(rule.leases):
                seen.add("reaped")
            if method == "sync":
                seen.update(f"sync sees waiting {w}" for w in res.waiting)
            if method == "claim":
                if res is None:
                    seen.add("claim unknown")
                    continue
                kind = "hold" if args[2].waiting is None else "claim"
                kind = "forced" if args[2].forced else kind
                seen.add(f"{kind} {res.status} {min(len(res.backends), 2)}")
                if res.status == "order" and not res.backends and res.lower:
                    seen.add("order refused with room")
                if res.backends and res.lower and kind == "claim":
                    seen.add("granted past tenants ahead")
                tiers = rule.orders[args[2].model].tiers.values()
                if res.status == "order" and max(tiers, default=-9) > args[2].place.tier:
                    seen.add("order behind a higher tier")
                seen.add(f"{res.status} room {min(res.room, 1)}")
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
        "ok room 0",
        "ok room 1",
        "full room 0",
        "order room 1",
        "wake every replica b",
        "wake every replica m",
        "wake targeted",
        "wake targeted at several",
        "wake cut by the room",
        "order behind a higher tier",
        "a group backlogged",
        "a group behind a group",
        "moved by a reload",
        "sync sees waiting True",
        "sync sees waiting False",
        "forced ok 1",
        "forced ok 2",
        "claim cap 0",
        "claim cap 1",
        "wake every replica c",
    ):
        assert outcome in seen, (outcome, sorted(seen))


def test_lease_runs_out(lua: tuple[redis.Redis, Lua, Any]) -> None:
    """Reaping by Redis's own clock: a replica that stops renewing its lease loses its slots
    and leaves the backlog once the lease ran out, not before."""
    client, scripts_, _ = lua
    client.flushdb()
    rule = SharedState(clock=lambda: time.time() * 1000)
    lease = 1000
    steps: list[Op] = [
        ("register", ("r0", lease, [("b0", 2, 40)], [("m0", flat("a"), 3), ("m0", flat("b"), 1)])),
        ("register", ("r1", LIVE, [("b0", 1, 10)], [("m0", flat("a"), 1)])),
        ("sync", ("r1", LIVE, [])),  # r0's lease still runs
    ]
    for method, args in steps:
        assert same(scripts_.batch([(method, args)]), [getattr(rule, method)(*args)])
        assert same(redis_state(client), rule_state(rule))
    assert "r0" in rule.leases
    time.sleep(lease / 1000 + 0.3)
    got = scripts_.call(("sync", ("r1", LIVE, [])))
    assert same(got, rule.sync("r1", LIVE, []))
    assert got.replicas == 1
    state = redis_state(client)
    assert same(state, rule_state(rule))
    assert state["slots"]["b0"] == (1, 10)
    assert state["models"]["m0"]["backlog"] == {"~t0": {"a": 0.0}}
    assert state["models"]["m0"]["last"] == {"~t0": "b"}
