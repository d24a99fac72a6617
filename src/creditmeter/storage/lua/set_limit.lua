-- SetUsageLimit for one account: set or remove the account's own limit on a feature for
-- a period, which wins over the tenant's (see usage limits in _lib.lua). Creates the
-- account if needed. The usage counted so far in the period stays: a limit changed
-- mid-period applies to what was already used.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] feature   ARGV[9] period (d, w, m)   ARGV[10] max (units or credits; '' removes
-- the account's limit: the tenant's applies again)   ARGV[11] measure (u, c)
-- returns {'OK'} or {'ERR', 'IDEMPOTENCY_KEY_REUSED', ...}
-- Its `usage_limit` event is how the ledger keeps the account's limits (a rebuild restores
-- them): feature, amount = max ('0' when removed), reference = "<period>:<measure>", or
-- "<period>:" when removed (creditmeter.storage.ledger.base.limit_of).
local replay = idem_lookup()
if replay then
  return replay
end
local field = 'L:' .. ARGV[8] .. ':' .. ARGV[9]
local had = acct_get(field) ~= nil
if ARGV[10] == '' then
  if had then
    acct_del(field)
    local left = acct_int('limits') - 1
    if left > 0 then
      acct_set('limits', fmt(left))
    else
      acct_del('limits')
    end
  end
else
  acct_set(field, ARGV[10] .. ':' .. ARGV[11])
  if not had then
    acct_incr('limits', 1)
  end
end
if acct_get('unlimited') == nil then
  acct_set('unlimited', '0')
end
local removed = ARGV[10] == ''
emit(TXN, 'usage_limit', {'feature', ARGV[8], 'amount', removed and '0' or ARGV[10],
                          'reference', ARGV[9] .. ':' .. (removed and '' or ARGV[11])})
local reply = {'OK'}
idem_store(reply)
return reply
