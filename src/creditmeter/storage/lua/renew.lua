-- Renew: grant one period of a subscription (a staged grant whose reference is the
-- subscription id), carrying over at most `cap` credits of the previous periods that
-- expired unused as a separate rollover lot with the same expiry. Both lots roll over
-- (their lot metadata and grant events say so: rolls_over): what of them expires unused
-- is added to carry:<subscription> (remove_lot in _lib.lua), the next renewal's base.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8..14] the period's lot as in grant.lua ARGV[8..14]
-- ARGV[15] rollover cap (credits)   ARGV[16] rollover lot id   ARGV[17] its burn key
-- returns {'OK', lot id, amount, priority, expires_at, source, reference, created,
--          credit in lots, reserved, unlimited ('1'/'0'), carried, debt repaid first}
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED' | 'BALANCE_LIMIT_EXCEEDED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
sweep() -- expires the previous period, recording its unused credits in carry:<subscription>
local lot = lot_from_argv(8)
lot.rolls_over = true
local carry_field = 'carry:' .. lot.reference
local carried = math.min(acct_int(carry_field), tonumber(ARGV[15]))
local refused = check_room(tonumber(lot.amount) + carried)
if refused then
  return refused
end
acct_del(carry_field)
add_lot(lot)
if carried > 0 then
  add_lot({
    id = ARGV[16], amount = fmt(carried), priority = lot.priority, expires_at = lot.expires_at,
    source = 'rollover', reference = lot.reference, burn_key = ARGV[17], rolls_over = true,
  })
end
local reply = {'OK'}
for _, v in ipairs(lot_reply(lot)) do
  reply[#reply + 1] = v
end
add_holdings(reply)
reply[#reply + 1] = fmt(carried)
reply[#reply + 1] = fmt(repaid_now)
idem_store(reply)
return reply
