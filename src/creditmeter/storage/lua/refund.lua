-- Refund: remove whatever is left of the given lots (a refunded purchase, a voided grant),
-- one `refund` event per lot with credit left. Lots no longer on the account (spent out,
-- expired, refunded before) are reported with -1 and change nothing.
-- A lot whose grant repaid debt (rp:<lot>, see the credit line in _lib.lua) brings that
-- debt back: one `debt` event (amount = the debt restored, whatever the limit), and the
-- lot's removed credits count that debt too (the refund took back both).
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] reason (kept on the events)   ARGV[9..] lot ids
-- returns {'OK', credit in lots after, reserved, unlimited ('1'/'0'), credits removed,
--          lot1, removed1, granted1, ...}
--   (removed and granted -1 for a lot not on the account)
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
sweep()
local total = 0
local parts = {}
for i = 9, #ARGV do
  local lot = ARGV[i]
  local removed, granted = -1, -1
  local meta = lot_meta(lot)
  if meta then
    granted = tonumber(meta.amount)
    removed = remove_lot(lot, TXN, 'refund', 'refunded', ARGV[8])
    total = total + removed
  end
  local repaid = acct_get('rp:' .. lot)
  if repaid then
    local r, amount = string.match(repaid, '^(%d+) (%d+)$')
    acct_del('rp:' .. lot)
    acct_incr('debt', tonumber(r))
    emit(TXN, 'debt', {'lot', lot, 'amount', r, 'reference', ARGV[8]},
         balance_fields(acct_int('balance')))
    if not meta then
      removed, granted = 0, tonumber(amount)
    end
    -- Taken back from the account as much as the credit removed.
    removed = removed + tonumber(r)
    total = total + tonumber(r)
  end
  parts[#parts + 1] = lot
  parts[#parts + 1] = fmt(removed)
  parts[#parts + 1] = fmt(granted)
end
local reply = add_holdings({'OK'})
reply[#reply + 1] = fmt(total)
for _, v in ipairs(parts) do
  reply[#reply + 1] = v
end
idem_store(reply)
return reply
