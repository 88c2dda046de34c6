"""The shared fair order's decisions as Redis server-side scripts, and their typed calls.

Every decision that must see one consistent state runs as one Lua script inside Redis; the
gateway never reads, decides and writes back. The rules are those of
:mod:`gateway.cluster.rule`, which states each of them with its reasoning; the Lua below keeps
what Redis needs and names the ``rule.py`` method it implements (``tests/cluster/test_rule.py``
checks the two equal on seeded scripts of operations). The functions at the end map the
typed arguments and replies of :class:`gateway.cluster.rule.SharedState` to ARGV and back.

Keys (``P`` is the configured prefix, hash-tagged so that every key lives in one slot; the
fields of :class:`~gateway.cluster.rule.SharedState` in brackets)::

    P:replicas         zset   replica -> lease expiry (ms, Redis clock)     [leases]
    P:c:<model>        hash   tenant -> counter                             [ModelOrder.counters]
    P:q:<model>        hash   tenant -> how many replicas it waits at  [len ModelOrder.sites]
    P:d:<model>        hash   tenant -> its requests waiting, all replicas  [ModelOrder.demand]
    P:bl:<model>       zset   tenant -> counter, tenants waiting somewhere  [ModelOrder.backlog]
    P:last:<model>     string the tenant that most recently left the backlog [ModelOrder.last]
    P:be:<backend>     hash   s -> sequences in flight, k -> KV tokens      [slots]
    P:cap              hash   backend -> its sequence limit, as the last claim said [capacity]
    P:bm:<backend>     set    the models claims named it a candidate for    [models_of]
    P:w:<model>\\x1f<tenant>  set  replicas where the tenant waits    [ModelOrder.sites]
    P:hold:<replica>   hash   <backend>\\x1fs / <backend>\\x1fk -> held   [ReplicaState.holds]
    P:rq:<replica>     set    <model>\\x1f<tenant> waiting there           [ReplicaState.waits]
    P:rd:<replica>     hash   <model>\\x1f<tenant> -> requests waiting     [ReplicaState.queued]
    P:wake             channel  "b:<backend>" (slots freed, nobody known to wake first),
                                "m:<model>" (backlog shrank): every replica       [wakes]
    P:wake:<replica>   channel  "b:<backend>": slots freed, and a tenant waiting at the
                                replica comes first for them                      [wakes]

Every ARGV starts with P, the replica and its lease in ms. Each operation is a Lua function of
its ARGV (``op_<name>``); a script runs one alone or, as the store does, a round trip's
operations in order (``BATCH``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .rule import Claim, ClaimResult, Flush, SyncResult

_COMMON = r"""
local P = ARGV[1]
local SEP = '\31'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v) if v then return tonumber(v) end return nil end
local function split(s)
  local i = string.find(s, SEP, 1, true)
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end
-- byte order whatever the server's locale (Lua's < on strings uses strcoll)
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local function sorted_members(key)
  local m = redis.call('SMEMBERS', key)
  table.sort(m, bytes_before)
  return m
end
local function counter(model, tenant)
  return num(redis.call('HGET', P .. ':c:' .. model, tenant)) or 0
end
-- ModelOrder.set_counter
local function set_counter(model, tenant, c)
  redis.call('HSET', P .. ':c:' .. model, tenant, tostring(c))
  local bl = P .. ':bl:' .. model
  if redis.call('ZSCORE', bl, tenant) then redis.call('ZADD', bl, c, tenant) end
end
-- ModelOrder.floor and ModelOrder.lift
local function lift(model, tenant, credit)
  local c = counter(model, tenant)
  local top = redis.call('ZRANGE', P .. ':bl:' .. model, 0, 0, 'WITHSCORES')
  local floor = nil
  if #top > 0 then
    floor = tonumber(top[2])
  else
    local last = redis.call('GET', P .. ':last:' .. model)
    if last then floor = counter(model, last) end
  end
  if floor and floor - credit > c then
    c = floor - credit
    redis.call('HSET', P .. ':c:' .. model, tenant, tostring(c))
  end
  return c
end
-- SharedState._set_demand
local function set_demand(replica, model, tenant, n)
  local rd, f = P .. ':rd:' .. replica, model .. SEP .. tenant
  local old = num(redis.call('HGET', rd, f)) or 0
  if n == old then return end
  if n > 0 then redis.call('HSET', rd, f, n) else redis.call('HDEL', rd, f) end
  if redis.call('HINCRBY', P .. ':d:' .. model, tenant, n - old) <= 0 then
    redis.call('HDEL', P .. ':d:' .. model, tenant)
  end
end
-- SharedState._mark
local function mark(replica, model, tenant, credit, waiting)
  if redis.call('SADD', P .. ':rq:' .. replica, model .. SEP .. tenant) == 1 then
    redis.call('SADD', P .. ':w:' .. model .. SEP .. tenant, replica)
    local n = redis.call('HINCRBY', P .. ':q:' .. model, tenant, 1)
    if n == 1 then
      local c = lift(model, tenant, credit)
      redis.call('ZADD', P .. ':bl:' .. model, c, tenant)
    end
  end
  set_demand(replica, model, tenant, math.max(1, waiting))
end
-- SharedState._unmark
local function unmark(replica, model, tenant)
  set_demand(replica, model, tenant, 0)
  if redis.call('SREM', P .. ':rq:' .. replica, model .. SEP .. tenant) == 1 then
    redis.call('SREM', P .. ':w:' .. model .. SEP .. tenant, replica)
    local n = redis.call('HINCRBY', P .. ':q:' .. model, tenant, -1)
    if n <= 0 then
      redis.call('HDEL', P .. ':q:' .. model, tenant)
      redis.call('ZREM', P .. ':bl:' .. model, tenant)
      redis.call('SET', P .. ':last:' .. model, tenant)
      redis.call('PUBLISH', P .. ':wake', 'm:' .. model)
    end
  end
end
-- SharedState._wake_for
local function wake_for(backend)
  local be, msg = P .. ':be:' .. backend, 'b:' .. backend
  local models = redis.call('SMEMBERS', P .. ':bm:' .. backend)
  local cap = num(redis.call('HGET', P .. ':cap', backend))
  if #models == 0 or not cap then
    redis.call('PUBLISH', P .. ':wake', msg)
    return
  end
  local room = math.max(1, cap - (num(redis.call('HGET', be, 's')) or 0))
  local sent = {}
  for _, model in ipairs(models) do
    local need, d = 0, P .. ':d:' .. model
    for _, t in ipairs(redis.call('ZRANGE', P .. ':bl:' .. model, 0, room - 1)) do
      for _, r in ipairs(redis.call('SMEMBERS', P .. ':w:' .. model .. SEP .. t)) do
        if not sent[r] then
          sent[r] = true
          redis.call('PUBLISH', P .. ':wake:' .. r, msg)
        end
      end
      need = need + math.max(1, num(redis.call('HGET', d, t)) or 0)
      if need >= room then break end
    end
  end
end
-- SharedState._add_slots (clamped: never below zero, never more returned than held)
local function add_slots(replica, backend, seqs, kv)
  local be = P .. ':be:' .. backend
  local hold = P .. ':hold:' .. replica
  local hs = num(redis.call('HGET', hold, backend .. SEP .. 's')) or 0
  local hk = num(redis.call('HGET', hold, backend .. SEP .. 'k')) or 0
  if seqs < -hs then seqs = -hs end
  if kv < -hk then kv = -hk end
  local s = (num(redis.call('HGET', be, 's')) or 0) + seqs
  local k = (num(redis.call('HGET', be, 'k')) or 0) + kv
  if s < 0 then s = 0 end
  if k < 0 then k = 0 end
  redis.call('HSET', be, 's', s, 'k', k)
  redis.call('HSET', hold, backend .. SEP .. 's', hs + seqs, backend .. SEP .. 'k', hk + kv)
  if seqs < 0 then wake_for(backend) end
end
-- SharedState._drop
local function drop(replica)
  local hold = redis.call('HGETALL', P .. ':hold:' .. replica)
  for i = 1, #hold, 2 do
    local backend, kind = split(hold[i])
    if kind == 's' then
      local k = num(redis.call('HGET', P .. ':hold:' .. replica, backend .. SEP .. 'k')) or 0
      add_slots(replica, backend, -tonumber(hold[i + 1]), -k)
    end
  end
  redis.call('DEL', P .. ':hold:' .. replica)
  for _, m in ipairs(sorted_members(P .. ':rq:' .. replica)) do
    local model, tenant = split(m)
    unmark(replica, model, tenant)
  end
  redis.call('DEL', P .. ':rq:' .. replica)
  redis.call('DEL', P .. ':rd:' .. replica)
  redis.call('ZREM', P .. ':replicas', replica)
end
-- SharedState._heartbeat: returns (known, now)
local function heartbeat(replica, lease_ms)
  local now = now_ms()
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', P .. ':replicas', '-inf', now)) do
    drop(r)
  end
  local known = redis.call('ZSCORE', P .. ':replicas', replica) ~= false
  if known then redis.call('ZADD', P .. ':replicas', now + lease_ms, replica) end
  return known, now
end
-- SharedState._flush of the (model, tenant, base, sent) entries at args[from..to]
local function flush(args, from, to)
  local out = {}
  for i = from, to, 4 do
    local raw = redis.call('HGET', P .. ':c:' .. args[i], args[i + 1])
    local c = (raw and tonumber(raw) or tonumber(args[i + 2])) + tonumber(args[i + 3])
    set_counter(args[i], args[i + 1], c)
    out[#out + 1] = tostring(c)
  end
  return out
end
"""

#: SharedState.sync. ARGV: P, replica, lease_ms, (model, tenant, base, sent) per flush.
#: Returns {known, live replicas, counter per flush...}.
SYNC = r"""
local known = heartbeat(ARGV[2], tonumber(ARGV[3]))
local out = {known and 1 or 0, redis.call('ZCARD', P .. ':replicas')}
for _, c in ipairs(flush(ARGV, 4, #ARGV)) do out[#out + 1] = c end
return out
"""

#: SharedState.register. ARGV: P, replica, lease_ms, n_holdings, (backend, seqs, kv) * n, then
#: (model, tenant, requests waiting) *. Returns 1.
REGISTER = r"""
local replica = ARGV[2]
local known, now = heartbeat(replica, tonumber(ARGV[3]))
local hold = P .. ':hold:' .. replica
local n = tonumber(ARGV[4])
local i = 5
for _ = 1, n do
  local backend, seqs, kv = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local hs = num(redis.call('HGET', hold, backend .. SEP .. 's')) or 0
  local hk = num(redis.call('HGET', hold, backend .. SEP .. 'k')) or 0
  add_slots(replica, backend, seqs - hs, kv - hk)
  i = i + 3
end
local want = {}
for j = i, #ARGV, 3 do want[ARGV[j] .. SEP .. ARGV[j + 1]] = true end
for _, m in ipairs(sorted_members(P .. ':rq:' .. replica)) do
  if not want[m] then
    local model, tenant = split(m)
    unmark(replica, model, tenant)
  end
end
for j = i, #ARGV, 3 do mark(replica, ARGV[j], ARGV[j + 1], 0, tonumber(ARGV[j + 2])) end
redis.call('ZADD', P .. ':replicas', now + tonumber(ARGV[3]), replica)
return 1
"""

#: SharedState.mark. ARGV: P, replica, lease_ms, model, tenant, on (1/0), credit, requests
#: waiting. Returns the tenant's counter, or nil when the replica is unknown.
MARK = r"""
local replica, model, tenant = ARGV[2], ARGV[4], ARGV[5]
if not heartbeat(replica, tonumber(ARGV[3])) then return false end
if ARGV[6] == '1' then
  mark(replica, model, tenant, tonumber(ARGV[7]), tonumber(ARGV[8]))
else
  unmark(replica, model, tenant)
end
return tostring(counter(model, tenant))
"""

#: SharedState.claim (the order check, the room rule, holds, batches). ARGV: P, replica,
#: lease_ms, model, tenant, waiting ('h': a hold), credit, f, (model, tenant, base, sent) per
#: flush, n, (extra, tokens) per request, (backend, max_seqs, max_kv) per candidate. Returns
#: {status, counter, lower, k, room, backend per granted request (k), counter per flush...},
#: or {'unknown'}.
CLAIM = r"""
local replica, model, tenant = ARGV[2], ARGV[4], ARGV[5]
local known = heartbeat(replica, tonumber(ARGV[3]))
local f = tonumber(ARGV[8])
flush(ARGV, 9, 8 + 4 * f)
if not known then return {'unknown'} end
local hold = ARGV[6] == 'h'
local c = counter(model, tenant)
local bl = P .. ':bl:' .. model
if hold then
  local top = redis.call('ZRANGE', bl, 0, 0, 'WITHSCORES')
  if #top > 0 then c = math.max(c, tonumber(top[2]) - tonumber(ARGV[7])) end
else
  mark(replica, model, tenant, tonumber(ARGV[7]), tonumber(ARGV[6]))
  c = counter(model, tenant)
end
local base = 9 + 4 * f
local n = tonumber(ARGV[base])
local first = base + 1 + 2 * n
local granted = {}
local out = {'ok', '', 0, 0, 0}
local function room_for(tokens)  -- SharedState._room
  local best, best_room, total = nil, 0, 0
  for i = first, #ARGV, 3 do
    local be = P .. ':be:' .. ARGV[i]
    local s = num(redis.call('HGET', be, 's')) or 0
    local k = num(redis.call('HGET', be, 'k')) or 0
    local room = math.min(tonumber(ARGV[i + 1]) - s,
                          math.floor((tonumber(ARGV[i + 2]) - k) / tokens))
    if room > 0 then
      total = total + room
      if room > best_room then best, best_room = ARGV[i], room end
    end
  end
  return best, total
end
for i = first, #ARGV, 3 do  -- what SharedState._wake_for needs
  redis.call('SADD', P .. ':bm:' .. ARGV[i], model)
  redis.call('HSET', P .. ':cap', ARGV[i], ARGV[i + 1])
end
for j = 1, n do
  local extra = tonumber(ARGV[base - 1 + 2 * j])
  local tokens = math.max(1, tonumber(ARGV[base + 2 * j]))
  local tol = 1e-9 * math.max(1, math.abs(c))  -- rule.ORDER_TOLERANCE
  local lower = redis.call('ZCOUNT', bl, '-inf', '(' .. (c - tol))
  out[3] = lower
  if j > 1 and lower > 0 then out[1] = 'order' break end
  local best, total = room_for(tokens)
  if not best then out[1] = 'full' break end
  if lower > 0 then  -- the demand ahead must still fit (more tenants than room: it cannot)
    local need, d = 0, P .. ':d:' .. model
    for _, t in ipairs(redis.call('ZRANGEBYSCORE', bl, '-inf', '(' .. (c - tol),
                                  'LIMIT', 0, total)) do
      need = need + math.max(1, num(redis.call('HGET', d, t)) or 0)
      if need > total - 1 then break end
    end
    if total - 1 < need then out[1] = 'order' break end
  end
  add_slots(replica, best, 1, tokens)
  granted[#granted + 1] = best
  c = c + extra
  set_counter(model, tenant, c)
end
if not hold then
  local left = tonumber(ARGV[6]) - #granted
  if left > 0 then set_demand(replica, model, tenant, left) else unmark(replica, model, tenant) end
end
out[2] = tostring(counter(model, tenant))
out[4] = #granted
local _, left = room_for(math.max(1, tonumber(ARGV[base + 2 * n])))
out[5] = left
for _, b in ipairs(granted) do out[#out + 1] = b end
for i = 9, 8 + 4 * f, 4 do out[#out + 1] = tostring(counter(ARGV[i], ARGV[i + 1])) end
return out
"""

#: SharedState.add_slots. ARGV: P, replica, lease_ms, backend, seqs, kv. Returns 1, or 0 when
#: the replica is unknown.
SLOTS = r"""
if not heartbeat(ARGV[2], tonumber(ARGV[3])) then return 0 end
add_slots(ARGV[2], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
"""

#: SharedState.leave. ARGV: P, replica.
LEAVE = "drop(ARGV[2])\nreturn 1\n"

#: Every operation of one round trip in one script call. ARGV: P, replica, lease_ms, then per
#: operation its name, the count of its own arguments and those arguments (as each operation
#: takes them after lease_ms: :func:`batch_args`). Returns the operations' replies, in order.
BATCH = r"""
local ops = {sync = op_sync, register = op_register, mark = op_mark, claim = op_claim,
             slots = op_slots, leave = op_leave}
local out = {}
local i = 4
while i <= #ARGV do
  local f, n = ops[ARGV[i]], tonumber(ARGV[i + 1])
  local a = {ARGV[1], ARGV[2], ARGV[3]}
  for j = 1, n do a[3 + j] = ARGV[i + 1 + j] end
  out[#out + 1] = f(a)
  i = i + 2 + n
end
return out
"""

#: The operations, each a Lua function of its argument table (the bodies above read it as
#: ARGV), defined once after the common functions.
OPERATIONS = {
    "sync": SYNC,
    "register": REGISTER,
    "mark": MARK,
    "claim": CLAIM,
    "slots": SLOTS,
    "leave": LEAVE,
}
_FUNCTIONS = _COMMON + "".join(
    f"local function op_{name}(ARGV)\n{body}\nend\n" for name, body in OPERATIONS.items()
)

#: name -> the full script text: each operation alone, and ``batch``
SCRIPTS = {
    **{name: f"{_FUNCTIONS}return op_{name}(ARGV)\n" for name in OPERATIONS},
    "batch": _FUNCTIONS + BATCH,
}


# -- typed calls: the arguments after (P, replica, lease_ms), and the replies ---------------------
def _flush_args(flushes: Iterable[Flush]) -> list[Any]:
    out: list[Any] = []
    for f in flushes:
        out += [f.model, f.tenant, repr(float(f.base)), repr(float(f.sent))]
    return out


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def sync_args(flushes: Iterable[Flush]) -> list[Any]:
    return _flush_args(flushes)


def sync_reply(raw: Sequence[Any]) -> SyncResult:
    return SyncResult(bool(int(raw[0])), int(raw[1]), tuple(float(c) for c in raw[2:]))


def register_args(
    holdings: Iterable[tuple[str, int, int]], waiting: Iterable[tuple[str, str, int]]
) -> list[Any]:
    held = list(holdings)
    out: list[Any] = [len(held)]
    for backend, seqs, kv in held:
        out += [backend, seqs, kv]
    for model, tenant, n in waiting:
        out += [model, tenant, n]
    return out


def mark_args(
    model: str, tenant: str, on: bool, credit: float = 0.0, waiting: int = 0
) -> list[Any]:
    return [model, tenant, "1" if on else "0", repr(float(credit)), waiting]


def mark_reply(raw: Any) -> float | None:
    return None if raw is None else float(raw)


def claim_args(claim: Claim) -> list[Any]:
    waiting = "h" if claim.waiting is None else claim.waiting
    out: list[Any] = [claim.model, claim.tenant, waiting, repr(float(claim.credit))]
    out += [len(claim.flushes), *_flush_args(claim.flushes), len(claim.requests)]
    for extra, tokens in claim.requests:
        out += [repr(float(extra)), tokens]
    for c in claim.candidates:
        out += [c.name, c.max_seqs, c.max_kv]
    return out


def claim_reply(raw: Sequence[Any]) -> ClaimResult | None:
    """None: the replica is unknown."""
    status = _text(raw[0])
    if status == "unknown":
        return None
    k = int(raw[3])
    return ClaimResult(
        status,
        float(raw[1]),
        int(raw[2]),
        tuple(_text(b) for b in raw[5 : 5 + k]),
        int(raw[4]),
        tuple(float(c) for c in raw[5 + k :]),
    )


def slots_args(backend: str, seqs: int, kv: int) -> list[Any]:
    return [backend, seqs, kv]


def batch_args(calls: Iterable[tuple[str, Sequence[Any]]]) -> list[Any]:
    """``BATCH``'s arguments after (P, replica, lease_ms): ``(operation, its arguments)`` per
    call, in the order they run (the operation as named in :data:`OPERATIONS`)."""
    out: list[Any] = []
    for name, args in calls:
        out += [name, len(args), *args]
    return out
