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
    P:c:<model>        hash   node -> counter (tenants and groups)     [ModelOrder.counters]
    P:up:<model>       hash   node -> its parent (~t<tier> at the top)      [ModelOrder.up]
    P:q:<model>        hash   tenant -> how many replicas it waits at  [len ModelOrder.sites]
    P:d:<model>        hash   node -> requests waiting in its subtree       [ModelOrder.demand]
    P:bl:<model>\\x1f<parent>  zset  child -> counter, backlogged children [ModelOrder.backlog]
    P:last:<model>     hash   parent -> the child that last left its backlog  [ModelOrder.last]
    P:tiers:<model>    zset   ~t<tier> -> tier, the tiers with a backlog     [ModelOrder.tiers]
    P:be:<backend>     hash   s -> sequences in flight, k -> KV tokens      [slots]
    P:cap              hash   backend -> its sequence limit, as the last claim said [capacity]
    P:bm:<backend>     set    the models claims named it a candidate for    [models_of]
    P:run              hash   capped node -> requests running, all replicas  [running]
    P:caps             hash   capped node -> its cap, as the last claim said  [caps]
    P:w:<model>\\x1f<tenant>  set  replicas where the tenant waits    [ModelOrder.sites]
    P:hold:<replica>   hash   <backend>\\x1fs / <backend>\\x1fk -> held   [ReplicaState.holds]
    P:rq:<replica>     set    <model>\\x1f<tenant> waiting there           [ReplicaState.waits]
    P:rd:<replica>     hash   <model>\\x1f<tenant> -> requests waiting     [ReplicaState.queued]
    P:rr:<replica>     hash   capped node -> requests running there         [ReplicaState.runs]
    P:wake             channel  "b:<backend>" (slots freed, nobody known to wake first),
                                "m:<model>" (backlog shrank), "c:<node>" (a capped node
                                fell below its cap): every replica                [wakes]
    P:wake:<replica>   channel  "b:<backend>": slots freed, and a tenant waiting at the
                                replica comes first for them                      [wakes]

Every ARGV starts with P, the replica and its lease in ms. Each operation is a Lua function of
its ARGV (``op_<name>``); a script runs one alone or, as the store does, a round trip's
operations in order (``BATCH``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from .rule import Claim, ClaimResult, Flush, Place, SyncResult

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
local function counter(model, node)
  return num(redis.call('HGET', P .. ':c:' .. model, node)) or 0
end
local function bl(model, parent) return P .. ':bl:' .. model .. SEP .. parent end
-- ModelOrder.set_counter
local function set_counter(model, node, c)
  redis.call('HSET', P .. ':c:' .. model, node, tostring(c))
  local up = redis.call('HGET', P .. ':up:' .. model, node)
  if up and redis.call('ZSCORE', bl(model, up), node) then
    redis.call('ZADD', bl(model, up), c, node)
  end
end
-- ModelOrder.floor and ModelOrder.lift
local function lift(model, node, parent, credit)
  local c = counter(model, node)
  local top = redis.call('ZRANGE', bl(model, parent), 0, 0, 'WITHSCORES')
  local floor = nil
  if #top > 0 then
    floor = tonumber(top[2])
  else
    local last = redis.call('HGET', P .. ':last:' .. model, parent)
    if last then floor = counter(model, last) end
  end
  if floor and floor - credit > c then
    c = floor - credit
    redis.call('HSET', P .. ':c:' .. model, node, tostring(c))
  end
  return c
end
-- ModelOrder.add_demand
local function add_demand(model, node, n)
  if n == 0 then return end
  local d, up = P .. ':d:' .. model, P .. ':up:' .. model
  local at = node
  while at do
    if redis.call('HINCRBY', d, at, n) <= 0 then redis.call('HDEL', d, at) end
    at = redis.call('HGET', up, at)
  end
end
-- ModelOrder.leave
local function leave(model, node)
  local up = P .. ':up:' .. model
  while true do
    local parent = redis.call('HGET', up, node)
    local key = bl(model, parent)
    redis.call('ZREM', key, node)
    redis.call('HSET', P .. ':last:' .. model, parent, node)
    if redis.call('EXISTS', key) == 1 then return end
    if redis.call('HEXISTS', up, parent) == 0 then
      redis.call('ZREM', P .. ':tiers:' .. model, parent)
      return
    end
    node = parent
  end
end
-- a Place at args[i] (tier, levels, (name, weight, credit, cap) per level); and the index after
local function place_at(args, i)
  local p = {tier = args[i], n = tonumber(args[i + 1]), name = {}, weight = {}, credit = {},
             cap = {}}
  for j = 1, p.n do
    local b = i + 4 * j - 2
    p.name[j], p.weight[j], p.credit[j] = args[b], tonumber(args[b + 1]), tonumber(args[b + 2])
    p.cap[j] = tonumber(args[b + 3])
  end
  return p, i + 2 + 4 * p.n
end
-- Place.parent
local function parent_of(p, j)
  if j > 1 then return p.name[j - 1] end
  return '~t' .. p.tier
end
-- ModelOrder.enter (nolift: a registration's)
local function enter(model, p, nolift)
  local up = P .. ':up:' .. model
  for j = 1, p.n do
    local node, parent = p.name[j], parent_of(p, j)
    local old = redis.call('HGET', up, node)
    if old ~= parent then
      local d = num(redis.call('HGET', P .. ':d:' .. model, node)) or 0
      if old then
        add_demand(model, old, -d)
        if redis.call('ZSCORE', bl(model, old), node) then leave(model, node) end
      end
      redis.call('HSET', up, node, parent)
      add_demand(model, parent, d)
    end
  end
  for j = p.n, 1, -1 do
    local node, parent = p.name[j], parent_of(p, j)
    if j < p.n and redis.call('EXISTS', bl(model, node)) == 0 then break end
    if not redis.call('ZSCORE', bl(model, parent), node) then
      local c
      if nolift then c = counter(model, node) else c = lift(model, node, parent, p.credit[j]) end
      redis.call('ZADD', bl(model, parent), c, node)
      if j == 1 then redis.call('ZADD', P .. ':tiers:' .. model, tonumber(p.tier), parent) end
    end
  end
end
-- ModelOrder.ahead: how many nodes are ahead of the path's counters cs, and (with total) their
-- demand, counted until it passes total - 1
local function ahead(model, p, cs, total)
  local keys, lows = {P .. ':tiers:' .. model}, {'(' .. p.tier}
  local highs = {'+inf'}
  for j = 1, p.n do
    local c = cs[j]
    keys[j + 1], lows[j + 1] = bl(model, parent_of(p, j)), '-inf'
    highs[j + 1] = '(' .. (c - 1e-9 * math.max(1, math.abs(c)))  -- rule.ORDER_TOLERANCE
  end
  local lower, need, d = 0, 0, P .. ':d:' .. model
  for k = 1, #keys do lower = lower + redis.call('ZCOUNT', keys[k], lows[k], highs[k]) end
  if lower == 0 or not total then return lower, 0 end
  for k = 1, #keys do
    local xs = redis.call('ZRANGEBYSCORE', keys[k], lows[k], highs[k], 'LIMIT', 0, total)
    for _, x in ipairs(xs) do
      need = need + math.max(1, num(redis.call('HGET', d, x)) or 0)
      if need > total - 1 then return lower, need end
    end
  end
  return lower, need
end
-- SharedState._set_demand
local function set_demand(replica, model, tenant, n)
  local rd, f = P .. ':rd:' .. replica, model .. SEP .. tenant
  local old = num(redis.call('HGET', rd, f)) or 0
  if n == old then return end
  if n > 0 then redis.call('HSET', rd, f, n) else redis.call('HDEL', rd, f) end
  add_demand(model, tenant, n - old)
end
-- SharedState._mark
local function mark(replica, model, p, waiting, nolift)
  local tenant = p.name[p.n]
  if redis.call('SADD', P .. ':rq:' .. replica, model .. SEP .. tenant) == 1 then
    redis.call('SADD', P .. ':w:' .. model .. SEP .. tenant, replica)
    redis.call('HINCRBY', P .. ':q:' .. model, tenant, 1)
  end
  enter(model, p, nolift)
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
      local up = redis.call('HGET', P .. ':up:' .. model, tenant)
      if up and redis.call('ZSCORE', bl(model, up), tenant) then leave(model, tenant) end
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
  local room = cap - (num(redis.call('HGET', be, 's')) or 0)
  if room <= 0 then return end
  local sent = {}
  for _, model in ipairs(models) do
    local need, d = 0, P .. ':d:' .. model
    local function walk(parent)  -- ModelOrder.tenants_in_order; true once the room is met
      for _, x in ipairs(redis.call('ZRANGE', bl(model, parent), 0, room - 1)) do
        if redis.call('EXISTS', bl(model, x)) == 1 then
          if walk(x) then return true end
        else
          for _, r in ipairs(redis.call('SMEMBERS', P .. ':w:' .. model .. SEP .. x)) do
            if not sent[r] then
              sent[r] = true
              redis.call('PUBLISH', P .. ':wake:' .. r, msg)
            end
          end
          need = need + math.max(1, num(redis.call('HGET', d, x)) or 0)
          if need >= room then return true end
        end
      end
      return false
    end
    for _, r in ipairs(redis.call('ZREVRANGE', P .. ':tiers:' .. model, 0, -1)) do
      if walk(r) then break end
    end
  end
end
-- backends sequences returned to in this script (SharedState._released): woken at its end
local released, released_set = {}, {}
-- SharedState._wake_released
local function wake_released()
  for _, backend in ipairs(released) do wake_for(backend) end
  released, released_set = {}, {}
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
  if seqs < 0 and not released_set[backend] then
    released_set[backend] = true
    released[#released + 1] = backend
  end
end
-- SharedState._set_runs
local function set_runs(replica, node, n)
  local rr = P .. ':rr:' .. replica
  local old = num(redis.call('HGET', rr, node)) or 0
  if n == old then return end
  if n > 0 then redis.call('HSET', rr, node, n) else redis.call('HDEL', rr, node) end
  local before = num(redis.call('HGET', P .. ':run', node)) or 0
  local after = math.max(0, before + n - old)
  if after > 0 then redis.call('HSET', P .. ':run', node, after)
  else redis.call('HDEL', P .. ':run', node) end
  local cap = num(redis.call('HGET', P .. ':caps', node))
  if cap and before >= cap and cap > after then
    redis.call('PUBLISH', P .. ':wake', 'c:' .. node)
  end
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
  local rr = redis.call('HKEYS', P .. ':rr:' .. replica)
  table.sort(rr, bytes_before)
  for _, node in ipairs(rr) do set_runs(replica, node, 0) end
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

#: SharedState.sync. ARGV: P, replica, lease_ms, r, (node, requests running) per capped node
#: or tally (r), k, (backend, KV tokens) per backend (k), m, model * m, b, backend * b, then
#: (model, node, base, sent) per flush. Returns {known, live replicas, m, b, t, 1/0 per model
#: (a tenant waits for it), (sequences, KV tokens) per backend, (name, sum) per tally (t),
#: counter per flush...}.
SYNC = r"""
local replica = ARGV[2]
local known = heartbeat(replica, tonumber(ARGV[3]))
local r = tonumber(ARGV[4])
local k = tonumber(ARGV[5 + 2 * r])
local i = 6 + 2 * r + 2 * k
local m = tonumber(ARGV[i])
local b = tonumber(ARGV[i + 1 + m])
if known then
  for j = 5, 4 + 2 * r, 2 do set_runs(replica, ARGV[j], tonumber(ARGV[j + 1])) end
  local hold = P .. ':hold:' .. replica
  for j = 6 + 2 * r, 5 + 2 * r + 2 * k, 2 do
    local held = num(redis.call('HGET', hold, ARGV[j] .. SEP .. 'k')) or 0
    add_slots(replica, ARGV[j], 0, tonumber(ARGV[j + 1]) - held)
  end
end
local counters = flush(ARGV, i + 2 + m + b, #ARGV)
local tallies = {}
local run = redis.call('HGETALL', P .. ':run')
for j = 1, #run, 2 do
  if string.sub(run[j], 1, 1) == '~' then
    tallies[#tallies + 1] = run[j]
    tallies[#tallies + 1] = run[j + 1]
  end
end
local out = {known and 1 or 0, redis.call('ZCARD', P .. ':replicas'), m, b, #tallies / 2}
for j = i + 1, i + m do
  out[#out + 1] = redis.call('EXISTS', P .. ':tiers:' .. ARGV[j])
end
for j = i + 2 + m, i + 1 + m + b do
  local be = P .. ':be:' .. ARGV[j]
  out[#out + 1] = num(redis.call('HGET', be, 's')) or 0
  out[#out + 1] = num(redis.call('HGET', be, 'k')) or 0
end
for _, x in ipairs(tallies) do out[#out + 1] = x end
for _, c in ipairs(counters) do out[#out + 1] = c end
return out
"""

#: SharedState.register. ARGV: P, replica, lease_ms, n_holdings, (backend, seqs, kv) * n, r,
#: (node, requests running) per capped node (r), then per tenant waiting: model, requests
#: waiting, its place (tier, levels, (name, weight, credit, cap) per level). Returns 1.
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
local told = {}
for j = i + 1, i + 2 * tonumber(ARGV[i]), 2 do told[ARGV[j]] = tonumber(ARGV[j + 1]) end
local rr = redis.call('HKEYS', P .. ':rr:' .. replica)
table.sort(rr, bytes_before)
for _, node in ipairs(rr) do
  if not told[node] then set_runs(replica, node, 0) end
end
for j = i + 1, i + 2 * tonumber(ARGV[i]), 2 do set_runs(replica, ARGV[j], told[ARGV[j]]) end
i = i + 1 + 2 * tonumber(ARGV[i])
local want, entries = {}, {}
while i <= #ARGV do
  local p, nxt = place_at(ARGV, i + 2)
  for j = 1, p.n do p.credit[j] = 0 end
  entries[#entries + 1] = {ARGV[i], tonumber(ARGV[i + 1]), p}
  want[ARGV[i] .. SEP .. p.name[p.n]] = true
  i = nxt
end
for _, m in ipairs(sorted_members(P .. ':rq:' .. replica)) do
  if not want[m] then
    local model, tenant = split(m)
    unmark(replica, model, tenant)
  end
end
for _, e in ipairs(entries) do mark(replica, e[1], e[3], e[2], true) end
redis.call('ZADD', P .. ':replicas', now + tonumber(ARGV[3]), replica)
return 1
"""

#: SharedState.mark. ARGV: P, replica, lease_ms, model, tenant, on (1/0), requests waiting,
#: and with on its place (tier, levels, (name, weight, credit, cap) per level). Returns the tenant's
#: counter, or nil when the replica is unknown.
MARK = r"""
local replica, model, tenant = ARGV[2], ARGV[4], ARGV[5]
if not heartbeat(replica, tonumber(ARGV[3])) then return false end
if ARGV[6] == '1' then
  mark(replica, model, place_at(ARGV, 8), tonumber(ARGV[7]))
else
  unmark(replica, model, tenant)
end
return tostring(counter(model, tenant))
"""

#: SharedState.claim (the order check, the room rule, holds, batches, forced grants). ARGV: P,
#: replica, lease_ms, model, waiting ('h': a hold), forced (1/0), the place (tier, levels,
#: (name, weight, credit, cap) per level), f, (model, node, base, sent) per flush, n, (cost,
#: tokens) per request, (backend, max_seqs, max_kv) per candidate. Returns {status, lower, k,
#: room, levels, counter per level, backend per granted request (k), counter per flush...}, or
#: {'unknown'}.
CLAIM = r"""
local replica, model = ARGV[2], ARGV[4]
local known = heartbeat(replica, tonumber(ARGV[3]))
local p, i = place_at(ARGV, 7)
local forced = ARGV[6] == '1'
local f = tonumber(ARGV[i])
flush(ARGV, i + 1, i + 4 * f)
if not known then return {'unknown'} end
local hold = ARGV[5] == 'h'
local tenant = p.name[p.n]
if not hold then mark(replica, model, p, tonumber(ARGV[5])) end
local cs = {}
for j = 1, p.n do
  cs[j] = counter(model, p.name[j])
  local key = bl(model, parent_of(p, j))
  if hold and not redis.call('ZSCORE', key, p.name[j]) then
    local top = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #top > 0 then cs[j] = math.max(cs[j], tonumber(top[2]) - p.credit[j]) end
  end
end
local base = i + 1 + 4 * f
local n = tonumber(ARGV[base])
local first = base + 1 + 2 * n
local granted = {}
local out = {'ok', 0, 0, 0, p.n}
local function room_for(tokens)  -- SharedState._room
  local best, best_room, total = nil, 0, 0
  for k = first, #ARGV, 3 do
    local be = P .. ':be:' .. ARGV[k]
    local s = num(redis.call('HGET', be, 's')) or 0
    local kv = num(redis.call('HGET', be, 'k')) or 0
    local room = math.min(tonumber(ARGV[k + 1]) - s,
                          math.floor((tonumber(ARGV[k + 2]) - kv) / tokens))
    if room > 0 then
      total = total + room
      if room > best_room then best, best_room = ARGV[k], room end
    end
  end
  return best, total
end
for k = first, #ARGV, 3 do  -- what SharedState._wake_for needs
  redis.call('SADD', P .. ':bm:' .. ARGV[k], model)
  redis.call('HSET', P .. ':cap', ARGV[k], ARGV[k + 1])
end
local capped = {}
for j = 1, p.n do
  if p.cap[j] > 0 then
    capped[#capped + 1] = j
    redis.call('HSET', P .. ':caps', p.name[j], p.cap[j])
  end
end
local function at_cap()
  for _, j in ipairs(capped) do
    if (num(redis.call('HGET', P .. ':run', p.name[j])) or 0) >= p.cap[j] then return true end
  end
  return false
end
for j = 1, n do
  local cost = tonumber(ARGV[base - 1 + 2 * j])
  local tokens = math.max(1, tonumber(ARGV[base + 2 * j]))
  local best = ARGV[first]  -- forced: granted already, on a slot leased there
  if not forced then  -- SharedState._check
    if at_cap() then out[1] = 'cap' break end
    local lower = ahead(model, p, cs)
    out[2] = lower
    if j > 1 and lower > 0 then out[1] = 'order' break end
    local total
    best, total = room_for(tokens)
    if not best then out[1] = 'full' break end
    if lower > 0 then  -- the demand ahead must still fit (more nodes than room: it cannot)
      local _, need = ahead(model, p, cs, total)
      if total - 1 < need then out[1] = 'order' break end
    end
  end
  if forced then  -- a leased slot becomes the request: its KV is adjusted
    add_slots(replica, best, 0, tonumber(ARGV[base + 2 * j]))
  else
    add_slots(replica, best, 1, tokens)
  end
  granted[#granted + 1] = best
  for _, k in ipairs(capped) do
    local rr = P .. ':rr:' .. replica
    set_runs(replica, p.name[k], (num(redis.call('HGET', rr, p.name[k])) or 0) + 1)
  end
  for k = 1, p.n do
    cs[k] = cs[k] + cost / p.weight[k]
    set_counter(model, p.name[k], cs[k])
  end
end
if not hold then
  local left = tonumber(ARGV[5]) - #granted
  if left > 0 then set_demand(replica, model, tenant, left) else unmark(replica, model, tenant) end
end
out[3] = #granted
local _, left = room_for(math.max(1, tonumber(ARGV[base + 2 * n])))
out[4] = left
for j = 1, p.n do out[#out + 1] = tostring(counter(model, p.name[j])) end
for _, b in ipairs(granted) do out[#out + 1] = b end
for k = i + 1, i + 4 * f, 4 do out[#out + 1] = tostring(counter(ARGV[k], ARGV[k + 1])) end
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
wake_released()
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
    **{
        name: f"{_FUNCTIONS}local reply = op_{name}(ARGV)\nwake_released()\nreturn reply\n"
        for name in OPERATIONS
    },
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


def _runs_args(runs: Iterable[tuple[str, int]]) -> list[Any]:
    pairs = list(runs)
    return [len(pairs), *(x for pair in pairs for x in pair)]


def sync_args(
    flushes: Iterable[Flush],
    runs: Iterable[tuple[str, int]] = (),
    kv: Iterable[tuple[str, int]] = (),
    models: Sequence[str] = (),
    backends: Sequence[str] = (),
) -> list[Any]:
    out = [*_runs_args(runs), *_runs_args(kv), len(models), *models, len(backends), *backends]
    return out + _flush_args(flushes)


def sync_reply(raw: Sequence[Any]) -> SyncResult:
    m, b, t = int(raw[2]), int(raw[3]), int(raw[4])
    used = raw[5 + m : 5 + m + 2 * b]
    tallies = raw[5 + m + 2 * b : 5 + m + 2 * b + 2 * t]
    return SyncResult(
        bool(int(raw[0])),
        int(raw[1]),
        tuple(float(c) for c in raw[5 + m + 2 * b + 2 * t :]),
        tuple(bool(int(x)) for x in raw[5 : 5 + m]),
        tuple((int(used[j]), int(used[j + 1])) for j in range(0, 2 * b, 2)),
        tuple(sorted((_text(tallies[j]), int(tallies[j + 1])) for j in range(0, 2 * t, 2))),
    )


def _place_args(place: Place) -> list[Any]:
    out: list[Any] = [str(int(place.tier)), len(place.path)]
    for node in place.path:
        out += [node.name, repr(float(node.weight)), repr(float(node.credit)), node.cap]
    return out


def register_args(
    holdings: Iterable[tuple[str, int, int]],
    waiting: Iterable[tuple[str, Place, int]],
    runs: Iterable[tuple[str, int]] = (),
) -> list[Any]:
    held = list(holdings)
    out: list[Any] = [len(held)]
    for backend, seqs, kv in held:
        out += [backend, seqs, kv]
    out += _runs_args(runs)
    for model, place, n in waiting:
        out += [model, n, *_place_args(place)]
    return out


def mark_args(model: str, tenant: str, on: Place | None, waiting: int = 1) -> list[Any]:
    if on is None:
        return [model, tenant, "0", waiting]
    return [model, tenant, "1", waiting, *_place_args(on)]


def mark_reply(raw: Any) -> float | None:
    return None if raw is None else float(raw)


def claim_args(claim: Claim) -> list[Any]:
    waiting = "h" if claim.waiting is None else claim.waiting
    out: list[Any] = [claim.model, waiting, "1" if claim.forced else "0"]
    out += _place_args(claim.place)
    out += [len(claim.flushes), *_flush_args(claim.flushes), len(claim.requests)]
    for cost, tokens in claim.requests:
        out += [repr(float(cost)), tokens]
    for c in claim.candidates:
        out += [c.name, c.max_seqs, c.max_kv]
    return out


def claim_reply(raw: Sequence[Any]) -> ClaimResult | None:
    """None: the replica is unknown."""
    status = _text(raw[0])
    if status == "unknown":
        return None
    k, levels = int(raw[2]), int(raw[4])
    granted = 5 + levels
    return ClaimResult(
        status,
        tuple(float(c) for c in raw[5:granted]),
        int(raw[1]),
        tuple(_text(b) for b in raw[granted : granted + k]),
        int(raw[3]),
        tuple(float(c) for c in raw[granted + k :]),
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
