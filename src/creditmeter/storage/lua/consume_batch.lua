-- Consume batch: many charges of one bucket in one call, each exactly as consume.lua
-- alone (atomic and all or nothing on its own, its own reply, idempotency record and
-- outbox entry), in order: what a pipeline of consume calls would do, for one FCALL.
-- KEYS[1] outbox   KEYS[2] due (the bucket's, as in _lib.lua), then per charge i:
--   KEYS[1 + 2i] account   KEYS[2 + 2i] idem
-- ARGV: per charge i, ARGV[14(i-1) + 1 .. 14i]: consume.lua's ARGV[1..14]
-- returns one reply per charge, as consume.lua's
local function consume_batch(keys, args)
  local replies = {}
  local outbox, due = keys[1], keys[2]
  for i = 1, (#keys - 2) / 2 do
    local o = (i - 1) * 14
    replies[i] = run(body_consume, {keys[1 + 2 * i], keys[2 + 2 * i], outbox, due}, {
      args[o + 1], args[o + 2], args[o + 3], args[o + 4], args[o + 5], args[o + 6],
      args[o + 7], args[o + 8], args[o + 9], args[o + 10], args[o + 11], args[o + 12],
      args[o + 13], args[o + 14],
    })
  end
  return replies
end
