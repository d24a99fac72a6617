-- Peers: a process says it is alive, and learns how many peers are (storage/leases.py).
-- Standalone: no prelude. Times are Redis's own clock, so peers' clocks need not agree.
-- KEYS[1] the role's peers ZSET (member: a process, score: when its word lapses, ms)
-- ARGV[1] the process   ARGV[2] how long its word holds (ms); 0 leaves (a clean stop)
-- returns the number of live peers, this process included unless it left
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
