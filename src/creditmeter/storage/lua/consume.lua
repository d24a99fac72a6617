-- Consume: charge an account, all or nothing, burning lots in burn-key order.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] amount (credits, > 0)   ARGV[9] feature   ARGV[10] units charged
-- Credit reserved by open call sessions is not spendable. Each lot touched appends one
-- `consume` event (lot, amount, balance after); the transaction's units are recorded on
-- its first event only, so summing units over events counts each transaction once.
-- Unlimited accounts append one event with no lot and balance -1.
-- returns {'OK', txn, amount, units, feature, credit in lots after, reserved, unlimited ('1'/'0'),
--          time (ms), lot1, amount1, ...}
--      or {'ERR', 'INSUFFICIENT_CREDITS', 'balance', spendable, 'required', a}
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
local unlimited = acct_unlimited()
local spendable = available()

-- Checks, before any write of the charge.
if not unlimited and spendable < amount then
  return {'ERR', 'INSUFFICIENT_CREDITS', 'balance', fmt(math.max(spendable, 0)), 'required', fmt(amount)}
end
if acct_int('used') + amount > MAX_CREDITS then
  return {'ERR', 'BALANCE_LIMIT_EXCEEDED', 'balance', fmt(spendable), 'amount', fmt(amount)}
end

-- Writes.
local reply = {'OK', TXN, ARGV[8], units, feature}
local charges = {}
if unlimited then
  emit(TXN, 'consume', {'lot', '', 'amount', ARGV[8], 'feature', feature, 'units', units},
       balance_fields(acct_int('balance')))
else
  local _
  _, charges = burn(amount, 'consume', feature, units, '')
end
count_usage(amount, feature, tonumber(units))
add_holdings(reply)
reply[#reply + 1] = ARGV[1]
for _, v in ipairs(charges) do
  reply[#reply + 1] = v
end
idem_store(reply)
return reply
