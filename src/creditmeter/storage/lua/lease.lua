-- Lease: keep or give up a process's lease on one bucket's work (storage/leases.py).
-- Standalone: no prelude. Taking a free lease is a plain SET NX PX.
-- KEYS[1] the bucket's lease STRING
-- ARGV[1] 'renew' or 'release'   ARGV[2] the owner   ARGV[3] the lease's length (ms)
-- returns 1 if the owner held the lease (renewed, or released), else 0 (another holds it,
-- or it lapsed: the owner must stop working on the bucket)
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
