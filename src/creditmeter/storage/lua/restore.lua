-- Restore: write an account's state, derived from the ledger, into empty Redis keys
-- (`creditmeter rebuild` after Redis data loss).
-- KEYS and ARGV[1..7]: see _lib.lua (ARGV[2] '': not an idempotent request).
-- ARGV[8] '1' to replace an account that already has state, '0' to refuse
-- ARGV[9] acct fields: cjson object of strings (balance, granted, used, ..., seq)
-- ARGV[10] lots: cjson array of {id, remaining, meta (the lots-hash JSON), burn_key, expires_at}
-- returns {'OK', lots restored} or {'ERR', 'ACCOUNT_HAS_STATE', 'seq', s}
-- Writes no events: the ledger already holds them.
local live_seq = redis.call('HGET', KEYS[5], 'seq')
if live_seq and ARGV[8] ~= '1' then
  return {'ERR', 'ACCOUNT_HAS_STATE', 'seq', live_seq}
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local fields = cjson.decode(ARGV[9])
for name, value in pairs(fields) do
  redis.call('HSET', KEYS[5], name, value)
end
local lots = cjson.decode(ARGV[10])
for _, lot in ipairs(lots) do
  redis.call('HSET', KEYS[1], lot.id, lot.meta)
  redis.call('HSET', KEYS[2], lot.id, lot.remaining)
  redis.call('ZADD', KEYS[3], 0, lot.burn_key)
  if lot.expires_at ~= '0' then
    redis.call('ZADD', KEYS[4], lot.expires_at, lot.id)
  end
end
due_changed = true
update_due()
return {'OK', fmt(#lots)}
