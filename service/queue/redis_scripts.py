"""The Lua scripts of the Redis Streams backend: each queue operation is one atomic script.

Atomicity is what keeps the books straight across processes: admission (counters), the
state of a job (queued -> running -> succeeded / failed / canceled), its stream entry, its
events and its one result change together or not at all, whichever process dies when.
Every script receives the key prefix as ARGV[1] and the consumer group as ARGV[2]; key
names come from `keys.lua_prelude()`.
"""

from __future__ import annotations

from service.queue.keys import lua_prelude

HELPERS = r"""
local GROUP = ARGV[2]

local function fields(flat)
  local f = {}
  for i = 1, #flat, 2 do f[flat[i]] = flat[i + 1] end
  return f
end

-- the group's last-delivered id in `stream`, and its lag (false when Redis cannot tell)
local function cursor(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = fields(g)
    if f['name'] == GROUP then return f['last-delivered-id'], f['lag'] end
  end
  return '0-0', false
end

-- the first entry after `after` (the group has not been given it), or nil
local function peek(stream, after)
  local e = redis.call('XRANGE', stream, '(' .. after, '+', 'COUNT', 1)[1]
  if e then
    local f = fields(e[2])
    return {entry = e[1], id = f['id'], n = tonumber(f['n'])}
  end
end

-- is stream id a older than b ("ms-seq" compared as numbers)
local function older(a, b)
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  if tonumber(am) ~= tonumber(bm) then return tonumber(am) < tonumber(bm) end
  return tonumber(as) < tonumber(bs)
end

-- the job streams of these model versions, with their priorities
local function streams_of(mvs)
  local out = {}
  for _, mv in ipairs(mvs) do
    for _, p in ipairs(redis.call('SMEMBERS', k_priorities(mv))) do
      local s = k_stream(mv, p)
      if redis.call('EXISTS', s) == 1 then
        table.insert(out, {key = s, priority = tonumber(p)})
      end
    end
  end
  return out
end

-- queued jobs of `mv` at priority >= prio (the group's lag, or a count where it has none)
local function undelivered(mv, prio)
  local jobs = 0
  for _, s in ipairs(streams_of({mv})) do
    if s.priority >= prio then
      local last, lag = cursor(s.key)
      if type(lag) == 'number' then
        jobs = jobs + lag
      else
        jobs = jobs + #redis.call('XRANGE', s.key, '(' .. last, '+')
      end
    end
  end
  return jobs
end

-- jobs and samples that run before entry `entry` of stream `own` (priority prio)
local function ahead(mv, prio, own, entry)
  local jobs, samples = 0, 0
  for _, s in ipairs(streams_of({mv})) do
    if s.priority > prio or s.key == own then
      local stop = '+'
      if s.key == own then stop = '(' .. entry end
      for _, e in ipairs(redis.call('XRANGE', s.key, '(' .. (cursor(s.key)), stop)) do
        jobs = jobs + 1
        samples = samples + tonumber(fields(e[2])['n'])
      end
    end
  end
  return jobs, samples
end

-- a queued job stops being queued: off the counters and its model's queued row-steps
local function unqueue(job, n)
  local h = redis.call('HMGET', job, 'model', 'cost')
  redis.call('HINCRBY', k_counters(), 'jobs', -1)
  redis.call('HINCRBY', k_counters(), 'samples', -n)
  local cost = tonumber(h[2]) or 0
  if h[1] and cost > 0 then redis.call('HINCRBY', k_work(h[1]), 'queued', -cost) end
end

-- a running job (row-steps `cost`, `left` of them not yet run) reported step `step` of
-- `steps`: the row-steps it has left now, or nil when that does not lower `left`
local function progress_left(cost, left, step, steps)
  cost = tonumber(cost) or 0
  if cost <= 0 or steps <= 0 then return nil end
  left = tonumber(left) or cost
  local now_left = math.floor(cost * math.max(steps - step, 0) / steps)
  if now_left < left then return now_left end
  return nil
end

local function add_event(id, etype, data, now)
  local key = k_events(id)
  local seq = redis.call('XLEN', key) + 1
  redis.call('XADD', key, '*', 'seq', seq, 'type', etype, 'data', data, 'time', now)
  return seq
end

-- store the one result of a job, its terminal event, and tell the API; false if the job
-- is unknown or already had its result
local function finish(id, result, state, err, data, ttl, now, inline_max)
  local job = k_job(id)
  local h = redis.call('HMGET', job, 'state', 'n', 'idempotency', 'model', 'cost', 'priority',
    'left')
  if not h[1] then return false end
  if not redis.call('SET', k_result(id), result, 'NX', 'EX', ttl) then return false end
  local n = tonumber(h[2]) or 0
  if h[1] == 'queued' then
    unqueue(job, n)
  end
  local cost = tonumber(h[5]) or 0
  local left = tonumber(h[7]) or cost
  if h[4] and left > 0 then redis.call('HINCRBY', k_work(h[4]), h[6], -left) end
  redis.call('HSET', job, 'state', state, 'error', err)
  add_event(id, state, data, now)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', k_events(id), ttl)
  if h[3] and h[3] ~= '' then redis.call('EXPIRE', h[3], ttl) end
  if #result > inline_max then result = '' end
  local queued = redis.call('HGET', k_work(h[4] or ''), 'queued') or 0
  local stats = (h[4] or '') .. ' ' .. cost .. ' ' .. queued
  redis.call('PUBLISH', k_done(), id .. '\n' .. n .. '\n' .. state .. '\n' .. stats .. '\n'
    .. result)
  return true
end

local function drop(stream, entry)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
end
"""

# ARGV: prefix, group, id, job json, n, fingerprint, max queued samples, model@version,
# priority, idempotency key or "", now, owner (idempotency keys are scoped per owner), cost
# (row-steps), the most row-steps that may be ahead of the job or "" (refused: {'ahead', n})
SUBMIT = r"""
local id, data, n, fp = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local limit, mv, prio, idem, now = tonumber(ARGV[7]), ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local ikey = ''
if idem ~= '' then ikey = k_idempotency(ARGV[12], idem) end
if idem ~= '' then
  local first = redis.call('GET', ikey)
  if first then
    local h = redis.call('HMGET', k_job(first), 'fingerprint', 'data')
    if h[2] then
      if h[1] ~= fp then return {'conflict'} end
      return {'existing', h[2]}
    end
  end
end
local again = redis.call('HGET', k_job(id), 'data')
if again then return {'existing', again} end  -- the same submission, retried
if ARGV[14] ~= '' then  -- admission's bound on the row-steps ahead (service/capacity.py)
  local ahead, work, level = 0, redis.call('HGETALL', k_work(mv)), tonumber(prio)
  for i = 1, #work, 2 do
    local p, w = tonumber(work[i]), tonumber(work[i + 1])
    if p and p >= level and w > 0 then ahead = ahead + w end
  end
  if ahead > tonumber(ARGV[14]) then return {'ahead', tostring(ahead)} end
end
local queued = tonumber(redis.call('HGET', k_counters(), 'samples')) or 0
if queued + n > limit then return {'full', tostring(queued)} end
local stream = k_stream(mv, prio)
if redis.call('EXISTS', stream) == 0 then
  redis.call('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')
end
local entry = redis.call('XADD', stream, '*', 'id', id, 'n', n, 'job', data)
redis.call('HSET', k_job(id), 'data', data, 'fingerprint', fp, 'state', 'queued', 'n', n,
  'model', mv, 'priority', prio, 'stream', stream, 'entry', entry, 'idempotency', ikey,
  'step', 0, 'steps', 0, 'delivery', 0, 'error', '', 'cost', ARGV[13], 'left', ARGV[13])
redis.call('HINCRBY', k_work(mv), prio, ARGV[13])
redis.call('HINCRBY', k_work(mv), 'queued', ARGV[13])
redis.call('SADD', k_priorities(mv), prio)
redis.call('SADD', k_models(), mv)
redis.call('HINCRBY', k_counters(), 'jobs', 1)
redis.call('HINCRBY', k_counters(), 'samples', n)
if idem ~= '' then redis.call('SET', ikey, id) end
local position = undelivered(mv, tonumber(prio)) - 1
add_event(id, 'queued', '{"position": ' .. position .. '}', now)
return {'created', tostring(position)}
"""

# ARGV: prefix, group, consumer, budget (samples), reclaim 0/1, min idle ms, max deliveries,
# result ttl, now, inline max, dead result head, dead result tail, dead error, dead event
# data, caller idle 0/1, then the model@version names the caller serves (none: all)
CLAIM = r"""
local consumer, budget = ARGV[3], tonumber(ARGV[4])
local reclaim, min_idle, max_deliveries = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, now, inline_max = tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local dead_head, dead_tail, dead_error, dead_data = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local idle = ARGV[15] == '1'
local mvs = {}
for i = 16, #ARGV do table.insert(mvs, ARGV[i]) end
if #mvs == 0 then mvs = redis.call('SMEMBERS', k_models()) end
local streams = streams_of(mvs)
local out = {}

local function take(stream, entry, id, delivery)
  local job = k_job(id)
  redis.call('HSET', job, 'delivery', delivery)
  local h = redis.call('HMGET', job, 'data', 'state')
  table.insert(out, {h[1], h[2], delivery, stream, entry})
end

-- 1. entries whose holder went quiet for min_idle: take them over, or dead-letter them
-- (one its holder read but never marked running is marked now)
if reclaim then
  for _, s in ipairs(streams) do
    local pending = redis.call('XPENDING', s.key, GROUP, 'IDLE', min_idle, '-', '+', 100)
    for _, p in ipairs(pending) do
      local entry, deliveries = p[1], p[4]
      local e = redis.call('XRANGE', s.key, entry, entry)[1]
      if not e then
        redis.call('XACK', s.key, GROUP, entry)
      else
        local f = fields(e[2])
        local id, n = f['id'], tonumber(f['n'])
        local job = k_job(id)
        if not redis.call('HGET', job, 'state') or redis.call('EXISTS', k_result(id)) == 1 then
          drop(s.key, entry)
        elseif deliveries >= max_deliveries then
          redis.call('XADD', k_dead(), 'MAXLEN', '~', 10000, '*', 'id', id, 'stream', s.key,
            'entry', entry, 'deliveries', deliveries, 'job', redis.call('HGET', job, 'data'),
            'reason', dead_error, 'time', now)
          finish(id, dead_head .. id .. dead_tail, 'failed', dead_error, dead_data, ttl, now,
            inline_max)
          drop(s.key, entry)
        elseif n <= budget then
          -- its last allowed try goes to an idle worker, which takes nothing else with it
          local last_try = deliveries > 0 and deliveries + 1 >= max_deliveries
          if (not last_try or (idle and #out == 0))
            and #redis.call('XCLAIM', s.key, GROUP, consumer, min_idle, entry) > 0 then
            budget = budget - n
            if redis.call('HGET', job, 'state') == 'queued' then
              redis.call('HSET', job, 'state', 'running')
              unqueue(job, n)
            end
            take(s.key, entry, id, deliveries + 1)
            if last_try then return out end
          end
        end
      end
    end
  end
end

-- 2. new entries, highest priority then oldest first, while they fit; the most urgent job
-- that does not fit waits for room rather than being overtaken
local heads = {}
for i, s in ipairs(streams) do heads[i] = peek(s.key, (cursor(s.key))) end
while true do
  local best
  for i, h in pairs(heads) do
    if best == nil or streams[i].priority > streams[best].priority
      or (streams[i].priority == streams[best].priority and older(h.entry, heads[best].entry))
    then best = i end
  end
  if best == nil then break end
  local h, s = heads[best], streams[best].key
  local state = redis.call('HGET', k_job(h.id), 'state')
  if state == 'queued' and h.n > budget then break end
  redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', 1, 'STREAMS', s, '>')
  if state == 'queued' then
    redis.call('HSET', k_job(h.id), 'state', 'running')
    unqueue(k_job(h.id), h.n)
    budget = budget - h.n
    take(s, h.entry, h.id, 1)
  else
    drop(s, h.entry)  -- canceled (or gone) while queued: nothing to run
  end
  heads[best] = peek(s, h.entry)
end
return out
"""

# ARGV: prefix, group, then stream, entry pairs an idle worker's blocking XREADGROUP got
# (and has started on). Marks them running; returns the ids of those canceled meanwhile.
TAKE = r"""
local out = {}
for i = 3, #ARGV, 2 do
  local s, entry = ARGV[i], ARGV[i + 1]
  local e = redis.call('XRANGE', s, entry, entry)[1]
  local f = e and fields(e[2]) or {}
  local job = f['id'] and k_job(f['id'])
  if job and redis.call('HGET', job, 'state') == 'queued' then
    redis.call('HSET', job, 'state', 'running', 'delivery', 1)
    unqueue(job, tonumber(f['n']))
  else
    drop(s, entry)  -- canceled (or gone) while queued: the worker stops it
    if f['id'] then table.insert(out, f['id']) end
  end
end
return out
"""

# ARGV: prefix, group. The job streams of the model versions that follow (none: all),
# highest priority first.
STREAMS = r"""
local mvs = {}
for i = 3, #ARGV do table.insert(mvs, ARGV[i]) end
if #mvs == 0 then mvs = redis.call('SMEMBERS', k_models()) end
local streams = streams_of(mvs)
table.sort(streams, function(a, b) return a.priority > b.priority end)
local out = {}
for _, s in ipairs(streams) do table.insert(out, s.key) end
return out
"""

# ARGV: prefix, group, id, result json, state, error, terminal event data, ttl, now, inline max
COMPLETE = r"""
local id = ARGV[3]
local h = redis.call('HMGET', k_job(id), 'state', 'stream', 'entry')
if not h[1] then return 0 end
local stored = finish(id, ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9],
  tonumber(ARGV[10]))
-- acknowledge only now that the result is stored; a duplicate completion acks as well
if h[1] ~= 'queued' then drop(h[2], h[3]) end
if stored then return 1 end
return 0
"""

# ARGV: prefix, group, id, canceled result json, error, terminal event data, ttl, now,
# inline max
CANCEL = r"""
local id = ARGV[3]
local state = redis.call('HGET', k_job(id), 'state')
if not state then return false end
if state == 'queued' then
  finish(id, ARGV[4], 'canceled', ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8],
    tonumber(ARGV[9]))
  return 'canceled'
end
if state == 'running' then
  redis.call('HSET', k_job(id), 'state', 'canceled')  -- the worker stops between steps
  redis.call('PUBLISH', k_cancel(), id)
  return 'canceled'
end
return state
"""

# ARGV: prefix, group, then one JSON array of events, each [id, type, data json, time, step
# or "", steps or ""] (all strings): one argument for a whole tick's events, since a client
# library packs each argument on its own (six per event cost the worker more than the script)
PUBLISH = r"""
for _, e in ipairs(cjson.decode(ARGV[3])) do
  local id = e[1]
  local job = k_job(id)
  -- one read for the checks and the progress: a job with its result has a final state
  -- (finish sets both), except 'canceled', which a running job has before its result
  local h = redis.call('HMGET', job, 'state', 'model', 'priority', 'cost', 'left')
  local live = h[1] == 'queued' or h[1] == 'running'
  if h[1] == 'canceled' then live = redis.call('EXISTS', k_result(id)) == 0 end
  if live then
    add_event(id, e[2], e[3], e[4])
    if e[5] ~= '' then
      local step, steps = tonumber(e[5]), tonumber(e[6])
      local left = progress_left(h[4], h[5], step, steps)
      if left and h[2] then
        redis.call('HSET', job, 'step', e[5], 'steps', e[6], 'left', left)
        redis.call('HINCRBY', k_work(h[2]), h[3], left - (tonumber(h[5]) or tonumber(h[4])))
      else
        redis.call('HSET', job, 'step', e[5], 'steps', e[6])
      end
    end
  end
end
return 0
"""

# ARGV: prefix, group, consumer, then per held job: stream, entry, id.
# Returns {ids this consumer no longer holds, ids whose client canceled them}.
HEARTBEAT = r"""
local consumer = ARGV[3]
local lost, canceled = {}, {}
for i = 4, #ARGV, 3 do
  local s, entry, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local p = {}
  if redis.call('EXISTS', s) == 1 then p = redis.call('XPENDING', s, GROUP, entry, entry, 1) end
  if #p == 0 or p[1][2] ~= consumer then
    table.insert(lost, id)
  else
    -- resets the idle time without counting a delivery
    redis.call('XCLAIM', s, GROUP, consumer, 0, entry, 'JUSTID')
    if redis.call('HGET', k_job(id), 'state') == 'canceled' then table.insert(canceled, id) end
  end
end
return {lost, canceled}
"""

# ARGV: prefix, group, id. Returns {job json, state, step, steps, error, jobs ahead, samples
# ahead} (ahead -1 unless queued), or nil.
STATUS = r"""
local h = redis.call('HMGET', k_job(ARGV[3]), 'data', 'state', 'step', 'steps', 'error',
  'model', 'priority', 'stream', 'entry')
if not h[1] then return false end
local jobs, samples = -1, -1
if h[2] == 'queued' then jobs, samples = ahead(h[6], tonumber(h[7]), h[8], h[9]) end
return {h[1], h[2], h[3], h[4], h[5], jobs, samples}
"""

# ARGV: prefix, group, id. Drops a finished job's record, result, events and idempotency
# key; returns 1, or 0 (kept) if the job is unknown or has no result yet.
FORGET = r"""
local id = ARGV[3]
if redis.call('EXISTS', k_result(id)) == 0 then return 0 end
local idem = redis.call('HGET', k_job(id), 'idempotency')
if idem and idem ~= '' and redis.call('GET', idem) == id then redis.call('DEL', idem) end
redis.call('DEL', k_result(id), k_job(id), k_events(id))
return 1
"""

# ARGV: prefix, group, consumer. Forget this consumer where it holds nothing (clean exit).
FORGET_CONSUMER = r"""
for _, s in ipairs(streams_of(redis.call('SMEMBERS', k_models()))) do
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', s.key, GROUP)) do
    local f = fields(c)
    if f['name'] == ARGV[3] and f['pending'] == 0 then
      redis.call('XGROUP', 'DELCONSUMER', s.key, GROUP, ARGV[3])
    end
  end
end
return 0
"""

# ARGV: prefix, group, principal name, rate (tokens per second), burst, cost.
# One token bucket per principal, shared by every API replica; Redis's clock, so replicas
# with skewed clocks agree. Returns {allowed 0/1, retry after s, tokens left, reset s} (as
# strings: Lua numbers would reach the client truncated to integers).
RATE_ACQUIRE = r"""
local key = k_ratelimit(ARGV[3])
local rate, burst, cost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', key, 'tokens', 'ts')
local tokens, ts = tonumber(h[1]), tonumber(h[2])
if tokens == nil or ts == nil then tokens, ts = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed, retry = 0, (cost - tokens) / rate
if tokens >= cost then
  tokens, allowed, retry = tokens - cost, 1, 0
end
redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'ts',
  string.format('%.17g', now))
local reset = (burst - tokens) / rate
redis.call('PEXPIRE', key, math.ceil(reset * 1000) + 1000)
return {allowed, string.format('%.17g', retry), string.format('%.17g', tokens),
  string.format('%.17g', reset)}
"""

# ARGV: prefix, group, principal name, job id, samples, limit, ttl s. Admits the job's
# samples if the principal's samples in flight stay within limit; an entry older than its
# ttl (its replica died before releasing it) no longer counts. Idempotent per job id.
# Returns {allowed 0/1, samples in flight after}.
INFLIGHT_ACQUIRE = r"""
local key, job = k_inflight(ARGV[3]), ARGV[4]
local n, limit, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local used, latest, again = 0, now + ttl, false
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do
  local samples, expiry = string.match(flat[i + 1], '(%d+) (%S+)')
  if tonumber(expiry) <= now then
    redis.call('HDEL', key, flat[i])
  else
    used = used + tonumber(samples)
    latest = math.max(latest, tonumber(expiry))
    again = again or flat[i] == job
  end
end
if again then return {1, used} end  -- already admitted (a retried admission)
if used + n > limit then return {0, used} end
redis.call('HSET', key, job, n .. ' ' .. string.format('%.17g', now + ttl))
redis.call('PEXPIREAT', key, math.ceil(latest * 1000))
return {1, used + n}
"""

# ARGV: prefix, group, principal name, job id. Returns 1 if the job was in flight.
INFLIGHT_RELEASE = r"""
return redis.call('HDEL', k_inflight(ARGV[3]), ARGV[4])
"""

SCRIPTS = {
    "submit": SUBMIT,
    "claim": CLAIM,
    "take": TAKE,
    "streams": STREAMS,
    "complete": COMPLETE,
    "cancel": CANCEL,
    "publish": PUBLISH,
    "heartbeat": HEARTBEAT,
    "status": STATUS,
    "forget_consumer": FORGET_CONSUMER,
    "forget": FORGET,
    "rate_acquire": RATE_ACQUIRE,
    "inflight_acquire": INFLIGHT_ACQUIRE,
    "inflight_release": INFLIGHT_RELEASE,
}


def sources() -> dict[str, str]:
    """Each script's full source: key names, shared helpers, then its own body."""
    head = lua_prelude() + HELPERS
    return {name: head + body for name, body in SCRIPTS.items()}
