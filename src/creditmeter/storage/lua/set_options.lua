-- SetAccountOptions: change per-account options, creating the account if needed.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] unlimited: '1', '0', or '' to leave it unchanged
-- returns {'OK', unlimited ('1' or '0')} or {'ERR', 'IDEMPOTENCY_KEY_REUSED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
if ARGV[8] ~= '' then
  acct_set('unlimited', ARGV[8])
elseif acct_get('unlimited') == nil then
  acct_set('unlimited', '0')
end
local unlimited = acct_get('unlimited')
emit(TXN, 'options', {'unlimited', unlimited})
local reply = {'OK', unlimited}
idem_store(reply)
return reply
