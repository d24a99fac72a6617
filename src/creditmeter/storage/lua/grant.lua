-- Grant: add one lot of credits.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] lot id   ARGV[9] amount (credits)   ARGV[10] priority   ARGV[11] expires_at (ms, '0' = never)
-- ARGV[12] source  ARGV[13] reference         ARGV[14] burn key
-- returns {'OK', lot id, amount, priority, expires_at, source, reference, created (ms),
--          credit in lots, reserved, unlimited ('1'/'0'), debt repaid first}
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED' | 'BALANCE_LIMIT_EXCEEDED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
sweep()
local lot = lot_from_argv(8)
local refused = check_room(tonumber(lot.amount))
if refused then
  return refused
end
add_lot(lot)
local reply = {'OK'}
for _, v in ipairs(lot_reply(lot)) do
  reply[#reply + 1] = v
end
add_holdings(reply)
reply[#reply + 1] = fmt(repaid_now)
idem_store(reply)
return reply
