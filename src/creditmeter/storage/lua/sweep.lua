-- Sweep: record the expiry of every lot whose time has come (run by the expiry sweeper
-- for accounts due in the bucket's expiry index, so expiries reach the ledger even when
-- no request touches the account).
-- KEYS and ARGV[1..7]: see _lib.lua (ARGV[2] is '': sweeps are not idempotent requests,
-- and need not be: a lot expires once, because it is gone afterwards).
-- returns {'OK', lots expired}
local n = sweep()
due_changed = true -- the sweeper found it in the index: re-point or drop its entry
return {'OK', fmt(n)}
