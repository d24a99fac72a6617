-- The bench's reference deduction: the least a script can do to meter one charge with an
-- outbox, a check-and-decrement of one balance plus one XADD of one field. `creditmeter
-- bench` runs it under redis-benchmark in the server's own Redis and reads its
-- usec_per_call from INFO commandstats: the yardstick of the Redis time per deduction of
-- the real scripts (issue 10 asks for at most 2x it unary, 1.2x inside batches).
-- Not a creditmeter script: no idempotency, lots, expiry, totals or event fields.
-- KEYS[1] = balance HASH (field b, credits)   KEYS[2] = its outbox STREAM (same slot)
-- ARGV[1] = amount (credits, integer string)   ARGV[2] = the stream's MAXLEN ~ (entries)
-- returns 1 when charged, 0 when the balance does not cover the amount
local b = tonumber(redis.call('HGET', KEYS[1], 'b') or '0')
if b < tonumber(ARGV[1]) then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'b', -ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'a', ARGV[1])
return 1
