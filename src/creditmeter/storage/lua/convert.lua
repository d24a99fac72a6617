-- Convert: move one account of layout 2 (five keys) into its one hash of layout 3, at
-- the upgrade (RedisStore.upgrade_layout). Standalone: no prelude.
-- KEYS[1] lots (HASH lot id -> metadata JSON)   KEYS[2] rem (HASH lot id -> remaining)
-- KEYS[3] order (ZSET of burn keys)   KEYS[4] exp (ZSET lot id by expiry)
-- KEYS[5] acct (HASH of the figures)  KEYS[6] the account's hash of layout 3
-- returns 1 when converted, 0 when there was nothing to convert (or it was already done)
if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('EXISTS', KEYS[6]) == 1 then
  return 0
end
local fields = redis.call('HGETALL', KEYS[5])
local metas = redis.call('HGETALL', KEYS[1])
for i = 1, #metas, 2 do
  local lot, meta = metas[i], metas[i + 1]
  local remaining = redis.call('HGET', KEYS[2], lot) or '0'
  fields[#fields + 1] = 'm:' .. lot
  fields[#fields + 1] = meta
  fields[#fields + 1] = 'q:' .. cjson.decode(meta).burn_key
  fields[#fields + 1] = remaining
end
local soonest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
if #soonest > 0 then
  fields[#fields + 1] = 'next_expiry'
  fields[#fields + 1] = string.format('%d', tonumber(soonest[2]))
end
for i = 1, #fields, 1000 do
  redis.call('HSET', KEYS[6], unpack(fields, i, math.min(i + 999, #fields)))
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 1
