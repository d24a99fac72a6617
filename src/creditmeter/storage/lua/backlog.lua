-- Backlog: the entries of one bucket's outbox not yet acknowledged into the ledger, the
-- entries ever added (XINFO STREAM's entries-added, kept by Redis with the stream) less
-- those acknowledged (ack.lua's counter). Standalone: no prelude. One bucket per call, so
-- its keys are in one slot; answered as one integer rather than XINFO's whole reply.
-- KEYS[1] the bucket's outbox STREAM   KEYS[2] its flushed counter STRING
-- returns the backlog (0 when the outbox does not exist yet)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
for i = 1, #info, 2 do
  if info[i] == 'entries-added' then
    return math.max(0, info[i + 1] - tonumber(redis.call('GET', KEYS[2]) or '0'))
  end
end
return redis.error_reply('creditmeter: XINFO STREAM gave no entries-added')
