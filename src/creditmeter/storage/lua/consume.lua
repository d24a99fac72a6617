-- Consume: charge an account, all or nothing, burning lots in burn-down order.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] amount (credits, > 0)   ARGV[9] feature   ARGV[10] units charged
-- ARGV[11..14] the limit args (rules, zone, windows: see usage limits in _lib.lua; and
--              the tenant's recharge policy: see recharges)
-- Credit reserved by open call sessions is not spendable.
-- returns, JSON-encoded: ['OK2', txn, amount, units, feature, credit in lots after,
--          reserved, unlimited ('1'/'0'), time (ms), lot1, amount1, ...]
--      or, when the account is in debt afterwards (see the credit line in _lib.lua):
--         ['OK3', the same up to time, debt incurred, debt after, overdraft limit,
--          lot1, amount1, ...]
--      or {'ERR', 'INSUFFICIENT_CREDITS', 'balance', spendable, 'required', a}
--      or {'ERR', 'USAGE_LIMIT_EXCEEDED', 'feature', f, 'period', p, 'limit', n, ...}
--      or {'ERR', 'TIME_ZONE', 'time_zone', tz} (the limit args assumed another zone)
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED' | 'BALANCE_LIMIT_EXCEEDED', ...}
-- Refusals are not stored under the request id: nothing changed, so a retry is judged afresh.
-- Its events (one `consume` per lot touched, then one with no lot and source 'debt' for
-- the part that became debt; or one with no lot on an unlimited account) are not
-- written one by one: the outbox entry carries this reply (`c`, see
-- creditmeter.storage.entries), which says all of them.
local replay = idem_lookup()
if replay then
  return replay
end
RECHARGE = ARGV[14]
local units = tonumber(ARGV[10])
local limits, wrong_zone = limit_state(ARGV[9], ARGV[11], ARGV[12], ARGV[13])
if wrong_zone then
  return wrong_zone
end
sweep()
local amount = tonumber(ARGV[8])
local unlimited = acct_unlimited()

-- Checks, before any write of the charge (the decision check.lua reports too): a limit
-- first (more credit would not help), then the balance.
local refusal = limits and limit_refusal(limits, ARGV[9], units, amount)
  or charge_refusal(amount, ARGV[8], 0)
if refusal then
  return refusal
end

-- Writes.
local reply = {'OK2', TXN, ARGV[8], ARGV[10], ARGV[9], '', '', '', ARGV[1]}
local events = 1
if unlimited then
  reply[8] = '1'
else
  reply[8] = '0'
  -- split_charge(), inlined (the hot path): the lots first, the rest debt.
  local owed = 0
  local balance = acct_int('balance')
  if amount > balance and has_credit_line() then
    owed = amount - balance
  end
  local charges = NO_CHARGES
  if owed < amount then
    charges = take(amount - owed)
  end
  if charges == nil then
    return redis.error_reply(LOTS_DISAGREE)
  end
  local at = 9
  if owed > 0 then
    acct_incr('debt', owed)
  end
  if account.debt ~= nil then
    -- In debt: the reply (and so its events) says how much, for the balance and watchers.
    reply[1] = 'OK3'
    reply[10] = fmt(owed)
    reply[11] = fmt(acct_int('debt'))
    reply[12] = fmt(acct_int('od'))
    at = 12
  end
  for i = 1, #charges do
    reply[at + i] = charges[i]
  end
  events = #charges / 2 + (owed > 0 and 1 or 0)
end
count_usage(amount, ARGV[9], units)
if limits then
  count_limits(limits, units, amount, 0, 0)
end
acct_incr('seq', events)
reply[6] = acct_get('balance') or '0'
reply[7] = acct_get('reserved') or '0'
consumed = idem_store(reply)
return consumed
