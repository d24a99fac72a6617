-- Ack: acknowledge flushed outbox entries and count them, in one step.
-- KEYS[1] the bucket's outbox STREAM   KEYS[2] its flushed counter STRING (same slot)
-- ARGV[1] the consumer group   ARGV[2..] entry ids now in the ledger
-- returns the number of entries acknowledged now (a repeat acknowledges, and counts, none)
-- The backlog of a bucket is the stream's entries-added less this counter: exact, unlike
-- XINFO GROUPS' lag, which Redis 7.0 can leave behind the group's real position.
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
if acked > 0 then
  redis.call('INCRBY', KEYS[2], acked)
end
return acked
