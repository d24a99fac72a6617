-- Sweep: record the expiry of every lot whose time has come (run by the expiry sweeper
-- for accounts due in the bucket's expiry index, so expiries reach the ledger even when
-- no request touches the account).
-- KEYS and ARGV[1..7]: see _lib.lua (ARGV[2] is '': sweeps are not idempotent requests,
-- and need not be: a lot expires once, because it is gone afterwards).
-- ARGV[8] the tenant's default recharge policy (see recharges in _lib.lua; '' = none):
-- an expiry can take the balance below its threshold
-- returns {'OK', lots expired}
RECHARGE = ARGV[8]
local n = sweep()
due_changed = true -- the sweeper found it in the index: re-point or drop its entry
return {'OK', fmt(n)}
