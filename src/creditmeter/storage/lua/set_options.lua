-- SetAccountOptions: change per-account options, creating the account if needed.
-- KEYS and ARGV[1..7]: see _lib.lua.
-- ARGV[8] unlimited: '1', '0', or '' to leave it unchanged
-- ARGV[9] time zone of the usage limits' periods (an IANA name, '' for UTC), or '-' to
--         leave it unchanged
-- ARGV[10] exempt from usage limits: '1', '0', or '' to leave it unchanged
-- ARGV[11] overdraft limit (credits, '0' for none), or '' to leave it unchanged
-- returns {'OK', unlimited ('1' or '0'), time zone ('' = UTC), exempt ('1' or '0'),
--          overdraft limit, debt}
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
if ARGV[11] == '0' then
  acct_del('od')
elseif ARGV[11] ~= nil and ARGV[11] ~= '' then
  acct_set('od', ARGV[11])
end
local unlimited = acct_get('unlimited')
local tz = acct_get('tz') or ''
local exempt = acct_get('nolimits') or '0'
local od = acct_get('od')
-- The other options ride in the event's reference, as JSON (storage.limits
-- .options_event); the overdraft limit only when the account has one.
local options = {tz = tz, nolimits = exempt}
if od ~= nil then
  options.overdraft = od
end
emit(TXN, 'options', {'unlimited', unlimited, 'reference', cjson.encode(options)})
local reply = {'OK', unlimited, tz, exempt, od or '0', acct_get('debt') or '0'}
idem_store(reply)
return reply
