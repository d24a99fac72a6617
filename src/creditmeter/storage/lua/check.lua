-- Check: what consume.lua would decide for charges now, changing nothing. Registered with
-- the no-writes flag and called with FCALL_RO (so a replica may serve it): it writes no
-- account field, outbox entry, idempotency record or seq. Expired lots not swept yet are
-- left out of the balance, as consume's sweep would remove them first.
-- KEYS[i] account hash of charge i (as KEYS[1] of _lib.lua; all of one bucket)
-- ARGV[8i - 7 .. 8i]: charge i's now (ms since epoch), amount (credits, > 0), feature,
--   units, and limit args (rules, zone, windows: see usage limits in _lib.lua; then the
--   recharge policy, which a check does not use)
-- returns one reply per charge: {'OK2', credit in live lots less the debt, reserved,
-- unlimited ('1'/'0')},
-- followed, when consume would refuse the charge, by its refusal: reason, key, value, ...
-- (USAGE_LIMIT_EXCEEDED, INSUFFICIENT_CREDITS or BALANCE_LIMIT_EXCEEDED, with consume's
-- metadata; or TIME_ZONE when the limit args assumed another zone).
-- Charges of one account are each judged against the same state: none is spent.
local function check(keys, args)
  local replies = {}
  for i = 1, #keys do
    local o = 8 * (i - 1)
    begin({keys[i]}, {args[o + 1]})
    local amount_s = args[o + 2]
    local expired = expired_unswept()
    local reply = {
      'OK2', fmt(acct_int('balance') - expired - acct_int('debt')), fmt(acct_int('reserved')),
      acct_unlimited() and '1' or '0',
    }
    local limits, refusal = limit_state(args[o + 3], args[o + 5], args[o + 6], args[o + 7])
    if limits then
      refusal = limit_refusal(limits, args[o + 3], tonumber(args[o + 4]), tonumber(amount_s))
    end
    refusal = refusal or charge_refusal(tonumber(amount_s), amount_s, expired)
    if refusal then
      for j = 2, #refusal do
        reply[#reply + 1] = refusal[j]
      end
    end
    replies[i] = reply
  end
  return replies
end
