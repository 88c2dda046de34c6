"""The Redis server-side scripts that make the shared decisions atomic.

Every decision that must see one consistent state (lift a tenant against the global backlog,
claim a batch slot against the global minimum and the backend's capacity, return slots) runs
as one Lua script inside Redis; the gateway never reads, decides and writes back.

Keys (``P`` is the configured prefix, hash-tagged so that every key lives in one slot)::

    P:replicas         zset   replica -> lease expiry (ms, Redis clock)
    P:c:<model>        hash   tenant -> counter (weighted service, counter units)
    P:q:<model>        hash   tenant -> number of replicas where the tenant waits
    P:d:<model>        hash   tenant -> its requests waiting, all replicas (the demand)
    P:bl:<model>       zset   tenant -> counter, for tenants waiting somewhere (the backlog)
    P:last:<model>     string the tenant that most recently left the backlog
    P:be:<backend>     hash   s -> sequences in flight, k -> KV tokens booked
    P:cap              hash   backend -> its sequence limit, as the last claim said
    P:bm:<backend>     set    the models claims named it a candidate for
    P:w:<model>\x1f<tenant>  set  replicas where the tenant waits
    P:hold:<replica>   hash   <backend>\\x1fs / <backend>\\x1fk -> what this replica holds
    P:rq:<replica>     set    <model>\\x1f<tenant> the replica has waiting
    P:rd:<replica>     hash   <model>\\x1f<tenant> -> how many requests wait there
    P:wake             channel  "b:<backend>" (slots freed, nobody known to wake first),
                                "m:<model>" (backlog shrank): every replica
    P:wake:<replica>   channel  "b:<backend>": slots freed, and a tenant waiting at the replica
                                comes first for them

A replica's lease is renewed by every script it runs; any script first *reaps* replicas whose
lease ran out: their slots return to the backends and their waiting tenants leave the backlog.
Counters are never reaped (a tenant keeps its position). Slot counts are clamped at zero so a
release racing a reap can never drive a backend negative.
"""

from __future__ import annotations

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
local function counter(model, tenant)
  return num(redis.call('HGET', P .. ':c:' .. model, tenant)) or 0
end
local function set_counter(model, tenant, c)
  redis.call('HSET', P .. ':c:' .. model, tenant, tostring(c))
  local bl = P .. ':bl:' .. model
  if redis.call('ZSCORE', bl, tenant) then redis.call('ZADD', bl, c, tenant) end
end
-- Lift on entering the backlog: max(own, floor - credit), the floor being the smallest counter
-- of the backlogged others or, with nobody waiting, the counter of the tenant that left the
-- backlog last; credit > 0 only for a busy tenant resubmitting (see gateway/scheduler/vtc.py).
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
-- How many of a tenant's requests wait at a replica (as the replica last said); the sum over
-- replicas is the tenant's demand, which a claim of a tenant further back must leave room for.
local function set_demand(replica, model, tenant, n)
  local rd, f = P .. ':rd:' .. replica, model .. SEP .. tenant
  local old = num(redis.call('HGET', rd, f)) or 0
  if n == old then return end
  if n > 0 then redis.call('HSET', rd, f, n) else redis.call('HDEL', rd, f) end
  if redis.call('HINCRBY', P .. ':d:' .. model, tenant, n - old) <= 0 then
    redis.call('HDEL', P .. ':d:' .. model, tenant)
  end
end
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
-- A release wakes only the replicas where the tenants first in the order wait (for each model
-- the backend served in a claim): as many tenants as their demand takes to fill the room the
-- backend has now. Unknown models or room (no claim seen yet): every replica.
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
local function add_slots(replica, backend, seqs, kv)
  local be = P .. ':be:' .. backend
  local hold = P .. ':hold:' .. replica
  local hs = num(redis.call('HGET', hold, backend .. SEP .. 's')) or 0
  local hk = num(redis.call('HGET', hold, backend .. SEP .. 'k')) or 0
  -- never return more than this replica holds: counts stay >= 0 whatever raced
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
  for _, m in ipairs(redis.call('SMEMBERS', P .. ':rq:' .. replica)) do
    local model, tenant = split(m)
    unmark(replica, model, tenant)
  end
  redis.call('DEL', P .. ':rq:' .. replica)
  redis.call('DEL', P .. ':rd:' .. replica)
  redis.call('ZREM', P .. ':replicas', replica)
end
-- Reap replicas whose lease ran out; renew ours if we are known. Returns whether we were.
local function heartbeat(replica, lease_ms)
  local now = now_ms()
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', P .. ':replicas', '-inf', now)) do
    drop(r)
  end
  local known = redis.call('ZSCORE', P .. ':replicas', replica) ~= false
  if known then redis.call('ZADD', P .. ':replicas', now + lease_ms, replica) end
  return known, now
end
"""

#: Heartbeat + flush of locally accumulated charges. ARGV: P, replica, lease_ms, then
#: (model, tenant, base, sent) per tenant: ``base`` re-creates a counter lost by an empty
#: restart, ``sent`` is added. Returns {known, live replicas, counter per entry...}.
SYNC = r"""
local known = heartbeat(ARGV[2], tonumber(ARGV[3]))
local out = {known and 1 or 0, redis.call('ZCARD', P .. ':replicas')}
for i = 4, #ARGV, 4 do
  local model, tenant = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', P .. ':c:' .. model, tenant)
  local c = (raw and tonumber(raw) or tonumber(ARGV[i + 2])) + tonumber(ARGV[i + 3])
  set_counter(model, tenant, c)
  out[#out + 1] = tostring(c)
end
return out
"""

#: (Re)register a replica with its full local state: what it holds and where tenants wait.
#: ARGV: P, replica, lease_ms, n_holdings, (backend, seqs, kv) * n, then (model, tenant,
#: requests waiting) *.
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
while i <= #ARGV do
  want[ARGV[i] .. SEP .. ARGV[i + 1]] = tonumber(ARGV[i + 2])
  i = i + 3
end
for _, m in ipairs(redis.call('SMEMBERS', P .. ':rq:' .. replica)) do
  if not want[m] then
    local model, tenant = split(m)
    unmark(replica, model, tenant)
  end
end
for m, waiting in pairs(want) do
  local model, tenant = split(m)
  mark(replica, model, tenant, 0, waiting)
end
redis.call('ZADD', P .. ':replicas', now + tonumber(ARGV[3]), replica)
return 1
"""

#: A tenant starts (1) or stops (0) waiting at this replica. ARGV: P, replica, lease_ms, model,
#: tenant, on, credit (counter units a resubmitting tenant may stay below the lift's floor),
#: its requests waiting here.
#: Returns the tenant's counter (lifted when it joined the global backlog), or nil when the
#: replica is unknown (it registers its whole state instead).
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

#: Claim slots for the next ``n`` requests of ``tenant`` (its head request and those queued
#: behind it here), flushing the replica's unsent charges first (the claimant's and its other
#: tenants', so that the order check sees this replica's own counters exact). ARGV: P, replica,
#: lease_ms, model, tenant, waiting (the tenant's requests waiting here, the claimed ones
#: included; 'h': a *hold*, see below), credit (as for MARK), f, then (model, tenant, base,
#: sent) per flushed counter (as in SYNC; the claimant's first), then n, then (extra, tokens)
#: per request (``extra``: counter units charged when granted), then (backend, max_seqs,
#: max_kv) per candidate backend.
#:
#: The first request is granted when some candidate has room and either no backlogged tenant
#: has a smaller counter or, after this booking, the candidates still have room for a request
#: of this size for each request such tenants have waiting (their replicas claim it: a batch of
#: slots freed at once goes to the tenants first in the order, whichever replica asks first;
#: work-conserving, since the room beyond their demand is taken; a stale entry holds back what
#: its replica last said waits there). Each further one only while the tenant, charged for the
#: ones before,
#: still has the smallest counter of the backlog and a candidate has room; the first refusal
#: ends the claim. A hold books slots for the expected next requests of a tenant that waits
#: nowhere (a busy tenant resubmitting, see gateway/core.py): charged nothing (``extra`` 0), the
#: tenant not entered in the backlog, its counter taken as it would be lifted on arrival
#: (``max(own, floor - credit)``) for the order check. Returns {status, counter, lower, k,
#: room, backend per granted request (k), counter per flushed entry...} (``room``: requests of
#: the last one's size the candidates still have room for, after the grants): status
#: 'ok' (all granted), 'full' or 'order' (why the first not granted was refused); or
#: {'unknown'} (the replica must register first).
CLAIM = r"""
local replica, model, tenant = ARGV[2], ARGV[4], ARGV[5]
local known = heartbeat(replica, tonumber(ARGV[3]))
local f = tonumber(ARGV[8])
for i = 9, 8 + 4 * f, 4 do  -- the charges count whether or not the replica is known
  local raw = redis.call('HGET', P .. ':c:' .. ARGV[i], ARGV[i + 1])
  set_counter(ARGV[i], ARGV[i + 1],
              (raw and tonumber(raw) or tonumber(ARGV[i + 2])) + tonumber(ARGV[i + 3]))
end
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
-- the candidate with the most room for a request of ``tokens`` (nil: none has room), and the
-- room of all candidates together (requests of that size)
local function room_for(tokens)
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
for i = first, #ARGV, 3 do  -- what a release needs to know whom to wake
  redis.call('SADD', P .. ':bm:' .. ARGV[i], model)
  redis.call('HSET', P .. ':cap', ARGV[i], ARGV[i + 1])
end
for j = 1, n do
  local extra = tonumber(ARGV[base - 1 + 2 * j])
  local tokens = math.max(1, tonumber(ARGV[base + 2 * j]))
  local tol = 1e-9 * math.max(1, math.abs(c))
  local lower = redis.call('ZCOUNT', bl, '-inf', '(' .. (c - tol))
  out[3] = lower
  if j > 1 and lower > 0 then out[1] = 'order' break end
  local best, total = room_for(tokens)
  if not best then out[1] = 'full' break end
  if lower > 0 then  -- room for all the requests waiting ahead (bounded by the room)
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
if not hold then  -- what still waits here after the grants
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

#: Book (+) or return (-) slots without any check (a release, or a request moved to another
#: backend after its first refused it). ARGV: P, replica, lease_ms, backend, seqs, kv.
#: An unknown replica books nothing (its next registration carries its whole holdings).
SLOTS = r"""
if not heartbeat(ARGV[2], tonumber(ARGV[3])) then return 0 end
add_slots(ARGV[2], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]))
return 1
"""

#: A replica shutting down returns its slots and leaves the backlog. ARGV: P, replica.
LEAVE = "drop(ARGV[2])\nreturn 1\n"

#: Every operation of one round trip in one script call. ARGV: P, replica, lease_ms, then per
#: operation its name, the count of its own arguments and those arguments (as each script above
#: takes them after lease_ms). Returns the operations' replies, in order.
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
