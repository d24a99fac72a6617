-- Consume: charge an account, all or nothing, burning lots in burn-key order.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] amount (credits, > 0)   ARGV[9] feature   ARGV[10] units charged
-- Each lot touched appends one `consume` event (lot, amount, balance after); the
-- transaction's units are recorded on its first event only, so summing units over
-- events counts each transaction once. Unlimited accounts append one event with no lot
-- and balance -1.
-- returns {'OK', txn, amount, units, feature, balance after (-1 unlimited), time (ms), lot1, amount1, ...}
--      or {'ERR', 'INSUFFICIENT_CREDITS', 'balance', b, 'required', a}
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED' | 'BALANCE_LIMIT_EXCEEDED', ...}
-- Refusals are not stored under the request id: nothing changed, so a retry is judged afresh.
local replay = idem_lookup()
if replay then
  return replay
end
sweep()
local amount = tonumber(ARGV[8])
local feature = ARGV[9]
local units = ARGV[10]
local unlimited = redis.call('HGET', KEYS[5], 'unlimited') == '1'
local balance = acct_int('balance')

-- Checks, before any write of the charge.
if not unlimited and balance < amount then
  update_due()
  return {'ERR', 'INSUFFICIENT_CREDITS', 'balance', fmt(balance), 'required', fmt(amount)}
end
if acct_int('used') + amount > MAX_CREDITS then
  update_due()
  return {'ERR', 'BALANCE_LIMIT_EXCEEDED', 'balance', fmt(balance), 'amount', fmt(amount)}
end

-- Plan: walk lots in burn-down order until the amount is covered.
local plan = {}
if not unlimited then
  local need = amount
  local start = 0
  local page_size = 16
  while need > 0 do
    local page = redis.call('ZRANGE', KEYS[3], start, start + page_size - 1)
    if #page == 0 then
      return redis.error_reply('creditmeter: lots do not cover the recorded balance')
    end
    for _, burn_key in ipairs(page) do
      local lot = string.sub(burn_key, BURN_KEY_LOT_OFFSET)
      local rem = tonumber(redis.call('HGET', KEYS[2], lot))
      local take = math.min(rem, need)
      plan[#plan + 1] = {burn_key = burn_key, lot = lot, take = take, rem = rem}
      need = need - take
      if need == 0 then
        break
      end
    end
    start = start + page_size
  end
end

-- Writes.
local reply = {'OK', TXN, ARGV[8], units, feature}
local charges = {}
if unlimited then
  emit(TXN, 'consume', {'lot', '', 'amount', ARGV[8], 'balance', '-1', 'feature', feature, 'units', units})
  balance = -1
else
  for i, p in ipairs(plan) do
    if p.take == p.rem then
      drop_lot(p.lot, p.burn_key)
    else
      redis.call('HINCRBY', KEYS[2], p.lot, -p.take)
    end
    balance = redis.call('HINCRBY', KEYS[5], 'balance', -p.take)
    emit(TXN, 'consume', {
      'lot', p.lot, 'amount', fmt(p.take), 'balance', fmt(balance), 'feature', feature,
      'units', i == 1 and units or '0',
    })
    charges[#charges + 1] = p.lot
    charges[#charges + 1] = fmt(p.take)
  end
end
redis.call('HINCRBY', KEYS[5], 'used', amount)
redis.call('HINCRBY', KEYS[5], 'used:' .. feature, amount)
redis.call('HINCRBY', KEYS[5], 'units:' .. feature, tonumber(units))
update_due()
reply[#reply + 1] = fmt(balance)
reply[#reply + 1] = ARGV[1]
for _, v in ipairs(charges) do
  reply[#reply + 1] = v
end
idem_store(reply)
return reply
