-- Session: one step of a call session on a time feature, with a reservation held on the
-- account (Diameter credit control: initial, update, termination; RFC 4006).
-- KEYS and ARGV[1..7]: see _lib.lua (the request id is "<session id>#<sequence>").
-- KEYS[5]  session HASH  the session's state (fields below)
-- KEYS[6] index   ZSET  the bucket's open sessions, "<tenant>:<account>|<session id>"
--                        scored by the time (ms) past which the server closes them
-- ARGV[8] step: start | update | end | close       ARGV[9] session id
-- ARGV[10..13] the limit args (rules, zone, windows: see usage limits in _lib.lua; and
--                the tenant's recharge policy: see recharges); the rules of every
--                feature of the tenant (a step past the start knows its feature from the
--                session, the server does not)
-- start:         ARGV[14] feature   ARGV[15] credits per increment   ARGV[16] increment (s)
--                ARGV[17] seconds of quota requested ('0' = the default)
--                ARGV[18] the default quota, in increments
--                ARGV[19] timeout policy (charge_quota | release)
--                ARGV[20] grace (ms) before a silent session is closed
-- update, end:   ARGV[14] sequence   ARGV[15] seconds used since the last report
--                ARGV[16] seconds of quota requested next (update; '0' = the default)
--                ARGV[17] the default quota, in increments (update)
-- close:         closes the session if it is open and past valid_until + grace; charges
--                the granted quota (charge_quota) or nothing more (release).
--
-- Session fields: feature, rate (credits per increment), inc (s), policy, grace (ms),
-- state (open, ended, timed_out), seq, used (s, whole call), units (increments charged),
-- charged (credits), reserved (credits held), runits (increments held), final (0/1),
-- granted (s the call may run from the last report), started, valid_until, ended (ms),
-- uncollected (credits used but not collectable: held credit removed meanwhile).
--
-- Charging is over the whole call: increments due = ceil(used / inc), and each step
-- charges the increments due beyond those already charged, so no report is rounded on
-- its own. Charges burn lots like Consume and append `session` events (reference = the
-- session id), one transaction per step. Reservations move no credit: acct.reserved is
-- the sum of the holds, and every spend (Consume, other sessions) sees only balance -
-- reserved. A step that changes what it holds appends one `hold` or `release` event (the
-- change, after the step's charge) for balance watchers.
-- returns {'OK', charged, released, credit in lots after, reserved, unlimited ('1'/'0'),
--          field1, value1, ...}
--      or {'OK', 'not_due'} (close of a session that is not past its time)
--      or {'ERR', reason, ...}: SESSION_NOT_FOUND, SESSION_CLOSED, SESSION_OUT_OF_SEQUENCE,
--         SESSION_EXISTS, INSUFFICIENT_CREDITS and USAGE_LIMIT_EXCEEDED (start only),
--         TIME_ZONE (the limit args assumed another zone), IDEMPOTENCY_KEY_REUSED
--
-- Usage limits (_lib.lua): a quota is capped by what the feature's limits leave, and
-- is held against them (held units and credits of the counters) until charged or let
-- go, so concurrent sessions and charges never pass a limit together; final is set when
-- a limit (or the balance) cut the quota short. What a call used past its quota is
-- still charged and counted (it happened).
--
-- Credit line (_lib.lua): a quota may hold down to the overdraft limit (available()
-- counts it), and a charge past the lots becomes debt, as Consume's does.
local step = ARGV[8]
local sid = ARGV[9]
RECHARGE = ARGV[13]
local member = TENANT .. ':' .. ACCOUNT .. '|' .. sid

local replay = idem_lookup()
if replay then
  return replay
end

local function load()
  local flat = redis.call('HGETALL', KEYS[5])
  if #flat == 0 then
    return nil
  end
  local s = {}
  for i = 1, #flat, 2 do
    s[flat[i]] = flat[i + 1]
  end
  return s
end

local function num(s, field)
  return tonumber(s[field] or '0')
end

local unlimited = acct_unlimited()

-- The increments of `inc` seconds a step asks for: its seconds rounded up, or the default.
local function quota(requested_s, default_units, inc)
  if tonumber(requested_s) > 0 then
    return math.ceil(tonumber(requested_s) / inc)
  end
  return tonumber(default_units)
end

-- Increments (at most `want`) that `free` spendable credits can hold at `rate` each.
local function holdable(want, rate, free)
  if unlimited then
    return want
  end
  return math.max(0, math.min(want, math.floor(free / rate)))
end

-- Change the account's reserved credit by `delta` and tell watchers (hold or release).
local function reserve(delta)
  if delta == 0 then
    return
  end
  acct_incr('reserved', delta)
  emit(TXN, delta > 0 and 'hold' or 'release', {'amount', fmt(math.abs(delta)), 'reference', sid},
       balance_fields(acct_int('balance')))
end

local function finish(s, charged, released)
  local flat = {}
  for field, value in pairs(s) do
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
  redis.call('HSET', KEYS[5], unpack(flat))
  local reply = add_holdings({'OK', fmt(charged), fmt(released)})
  for _, v in ipairs(flat) do
    reply[#reply + 1] = v
  end
  idem_store(reply)
  return reply
end

-- ---- start ----
if step == 'start' then
  if redis.call('EXISTS', KEYS[5]) == 1 then
    return {'ERR', 'SESSION_EXISTS', 'session_id', sid}
  end
  local limits, wrong_zone = limit_state(ARGV[14], ARGV[10], ARGV[11], ARGV[12])
  if wrong_zone then
    return wrong_zone
  end
  sweep()
  local rate = tonumber(ARGV[15])
  local inc = tonumber(ARGV[16])
  local want = quota(ARGV[17], ARGV[18], inc)
  local grace = tonumber(ARGV[20])
  local units = holdable(want, rate, available())
  if limits then
    local room = limit_room(limits, rate)
    if room == 0 then
      return limit_refusal(limits, ARGV[14], 1, rate)
    end
    units = math.min(units, room)
  end
  if units == 0 then
    return insufficient(0, fmt(rate))
  end
  local hold = unlimited and 0 or units * rate
  reserve(hold)
  if limits then
    count_limits(limits, 0, 0, units, units * rate)
  end
  local valid_until = NOW + units * inc * 1000
  redis.call('ZADD', KEYS[6], valid_until + grace, member)
  return finish({
    feature = ARGV[14], rate = ARGV[15], inc = ARGV[16], policy = ARGV[19], grace = ARGV[20],
    state = 'open', seq = '0', used = '0', units = '0', charged = '0', reserved = fmt(hold),
    runits = fmt(units), final = (units < want) and '1' or '0', granted = fmt(units * inc),
    started = ARGV[1], valid_until = fmt(valid_until), ended = '0', uncollected = '0',
  }, 0, 0)
end

-- ---- update, end, close ----
local s = load()
if not s or s.state ~= 'open' then
  if step == 'close' then
    redis.call('ZREM', KEYS[6], member) -- ended meanwhile: nothing left to close
  end
  if not s then
    return {'ERR', 'SESSION_NOT_FOUND', 'session_id', sid}
  end
  return {'ERR', 'SESSION_CLOSED', 'session_id', sid, 'state', s.state}
end
local seq = num(s, 'seq')
if step == 'close' then
  if NOW < num(s, 'valid_until') + num(s, 'grace') then
    return {'OK', 'not_due'}
  end
elseif tonumber(ARGV[14]) ~= seq + 1 then
  return {'ERR', 'SESSION_OUT_OF_SEQUENCE', 'session_id', sid, 'expected', fmt(seq + 1),
          'sequence', ARGV[14]}
end
local limits, wrong_zone = limit_state(s.feature, ARGV[10], ARGV[11], ARGV[12])
if wrong_zone then
  return wrong_zone
end
sweep()

local rate = num(s, 'rate')
local inc = num(s, 'inc')
local held = num(s, 'reserved')
local used
if step == 'close' then
  if s.policy == 'charge_quota' then
    -- The call may have gone on through all it was granted.
    used = math.max(num(s, 'used'), (num(s, 'units') + num(s, 'runits')) * inc)
  else
    used = num(s, 'used')
  end
else
  used = num(s, 'used') + tonumber(ARGV[15])
end
local due_units = math.ceil(used / inc)
local new_units = due_units - num(s, 'units')
local cost = new_units * rate

-- Writes: charge what is due from the credit not held by other sessions (this session's
-- own hold is its to use), then replace the hold. The hold changes once, after the
-- charge, so the step's events say the balance before and after it (see _lib.lua).
local collect = cost
if not unlimited then
  collect = math.min(cost, math.max(0, available() + held))
end
if collect > 0 then
  local txn_units = fmt(new_units)
  if unlimited then
    emit(TXN, 'session', {
      'lot', '', 'amount', fmt(collect), 'feature', s.feature, 'units', txn_units,
      'reference', sid,
    }, balance_fields(acct_int('balance')))
  else
    burn(collect, 'session', s.feature, txn_units, sid)
  end
  count_usage(collect, s.feature, new_units)
end
if limits then
  -- The increments due are counted (and this session's hold let go) whatever could be
  -- collected: they were used.
  local runits = num(s, 'runits')
  count_limits(limits, math.max(new_units, 0), collect, -runits, -runits * rate)
end
s.used = fmt(used)
s.units = fmt(due_units)
s.charged = fmt(num(s, 'charged') + collect)
s.uncollected = fmt(num(s, 'uncollected') + cost - collect)
if step ~= 'close' then
  s.seq = ARGV[14]
end

if step == 'update' then
  local want = quota(ARGV[16], ARGV[17], inc)
  local units = holdable(want, rate, available() + held)
  if limits then
    units = math.min(units, limit_room(limits, rate))
    count_limits(limits, 0, 0, units, units * rate)
  end
  local hold = unlimited and 0 or units * rate
  reserve(hold - held)
  -- What the charged increments still cover, plus the new quota.
  local granted = due_units * inc - used + units * inc
  local valid_until = NOW + granted * 1000
  redis.call('ZADD', KEYS[6], valid_until + num(s, 'grace'), member)
  s.reserved = fmt(hold)
  s.runits = fmt(units)
  s.final = (units < want) and '1' or '0'
  s.granted = fmt(granted)
  s.valid_until = fmt(valid_until)
  return finish(s, collect, math.max(0, held - collect))
end

-- end or close: give back the rest of the hold and retire the session.
reserve(-held)
s.state = (step == 'end') and 'ended' or 'timed_out'
s.reserved = '0'
s.runits = '0'
s.granted = '0'
s.ended = ARGV[1]
redis.call('ZREM', KEYS[6], member)
local reply = finish(s, collect, math.max(0, held - collect))
redis.call('EXPIRE', KEYS[5], ARGV[3])
return reply
