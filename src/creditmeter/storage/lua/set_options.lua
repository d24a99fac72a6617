-- SetAccountOptions: change per-account options, creating the account if needed.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] unlimited: '1', '0', or '' to leave it unchanged
-- ARGV[9] time zone of the usage limits' periods (an IANA name, '' for UTC), or '-' to
--         leave it unchanged
-- ARGV[10] exempt from usage limits: '1', '0', or '' to leave it unchanged
-- returns {'OK', unlimited ('1' or '0'), time zone ('' = UTC), exempt ('1' or '0')}
--      or {'ERR', 'IDEMPOTENCY_KEY_REUSED', ...}
local replay = idem_lookup()
if replay then
  return replay
end
if ARGV[8] ~= '' then
  acct_set('unlimited', ARGV[8])
elseif acct_get('unlimited') == nil then
  acct_set('unlimited', '0')
end
if ARGV[9] == '' then
  acct_del('tz')
elseif ARGV[9] ~= '-' then
  acct_set('tz', ARGV[9])
end
if ARGV[10] == '1' then
  acct_set('nolimits', '1')
elseif ARGV[10] == '0' then
  acct_del('nolimits')
end
local unlimited = acct_get('unlimited')
local tz = acct_get('tz') or ''
local exempt = acct_get('nolimits') or '0'
-- The limits' options ride in the event's reference, as JSON (ledger.base.limit_options).
emit(TXN, 'options', {'unlimited', unlimited,
                      'reference', cjson.encode({tz = tz, nolimits = exempt})})
local reply = {'OK', unlimited, tz, exempt}
idem_store(reply)
return reply
