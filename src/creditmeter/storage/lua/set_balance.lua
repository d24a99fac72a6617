-- SetBalance: add credits, or with reset remove every lot first (one `reset` event per
-- lot with credit left) and then add the new amount.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] reset ('1' or '0')   ARGV[9..15] the new lot as in grant.lua ARGV[8..14];
-- an amount of '0' (allowed only with reset) adds no lot.
-- returns {'OK', credit in lots, reserved, unlimited ('1'/'0'), removed,
--          [lot id, amount, priority, expires_at, source, reference, created]}
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED' | 'BALANCE_LIMIT_EXCEEDED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
sweep()
local reset = ARGV[8] == '1'
local lot = lot_from_argv(9)
local amount = tonumber(lot.amount)
if not reset then
  local refused = check_room(amount)
  if refused then
    return refused
  end
elseif acct_int('granted') + amount > MAX_CREDITS then
  return {'ERR', 'BALANCE_LIMIT_EXCEEDED', 'balance', fmt(acct_int('balance')), 'amount', lot.amount}
end

local removed = 0
if reset then
  local lot_ids = {}
  for field in pairs(acct()) do
    if string.sub(field, 1, 2) == 'm:' then
      lot_ids[#lot_ids + 1] = string.sub(field, 3)
    end
  end
  table.sort(lot_ids)
  for _, lot_id in ipairs(lot_ids) do
    removed = removed + remove_lot(lot_id, TXN .. 'r', 'reset', 'removed')
  end
end
local lot_fields = {}
if amount > 0 then
  add_lot(lot)
  lot_fields = lot_reply(lot)
elseif not acct_exists() or acct_get('balance') == nil then
  -- A reset to zero of an unknown account still brings the account into being.
  acct_set('balance', '0')
end
local reply = add_holdings({'OK'})
reply[#reply + 1] = fmt(removed)
for _, v in ipairs(lot_fields) do
  reply[#reply + 1] = v
end
idem_store(reply)
return reply
