-- Restore: write an account's state, derived from the ledger, into empty Redis keys
-- (`creditmeter rebuild` after Redis data loss).
-- KEYS and ARGV[1..7]: see _lib.lua (ARGV[2] '': not an idempotent request).
-- ARGV[8] '1' to replace an account that already has state, '0' to refuse
-- ARGV[9] acct fields: cjson object of strings (balance, granted, used, ..., seq)
-- ARGV[10] lots: cjson array of {id, remaining, meta (the m:<lot> JSON), burn_key, expires_at}
-- returns {'OK', lots restored} or {'ERR', 'ACCOUNT_HAS_STATE', 'seq', s}
-- Writes no events: the ledger already holds them.
local live_seq = acct_get('seq')
if live_seq and ARGV[8] ~= '1' then
  return {'ERR', 'ACCOUNT_HAS_STATE', 'seq', live_seq}
end
redis.call('DEL', KEYS[1])
account = {}
numbers = {}
changed = {}
deleted = {}
local fields = cjson.decode(ARGV[9])
for name, value in pairs(fields) do
  acct_set(name, value)
end
local lots = cjson.decode(ARGV[10])
for _, lot in ipairs(lots) do
  acct_set('m:' .. lot.id, lot.meta)
  acct_set('q:' .. lot.burn_key, lot.remaining)
end
expiry_stale = true
due_changed = true
return {'OK', fmt(#lots)}
