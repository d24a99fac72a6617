-- SetRechargePolicy for one account: set, disable or remove the account's own recharge
-- policy (see recharges in _lib.lua), which wins over the tenant's. Creates the account
-- if needed. Setting it never fires a recharge by itself: only a change of the balance
-- that crosses the threshold does.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] what: 'set', 'off' (no recharges, even with the tenant's) or 'remove' (the
-- tenant's applies again)   ARGV[9] threshold (set)   ARGV[10] pack id (set; '' = none)
-- returns {'OK', the R field afterwards ('' when none)} or {'ERR', 'IDEMPOTENCY_KEY_REUSED', ...}
-- Its `recharge_policy` event is how the ledger keeps the policy (a rebuild restores it):
-- amount = threshold ('0' unless set), reference = "set:<pack>", "off" or "" (removed)
-- (creditmeter.storage.recharge.policy_event).
local replay = idem_lookup()
if replay then
  return replay
end
local what = ARGV[8]
local reference = ''
if what == 'set' then
  acct_set('R', ARGV[9] .. ':' .. ARGV[10])
  reference = 'set:' .. ARGV[10]
elseif what == 'off' then
  acct_set('R', 'off')
  reference = 'off'
else
  acct_del('R')
end
if acct_get('unlimited') == nil then
  acct_set('unlimited', '0')
end
emit(TXN, 'recharge_policy', {'amount', what == 'set' and ARGV[9] or '0',
                              'reference', reference})
local reply = {'OK', acct_get('R') or ''}
idem_store(reply)
return reply
