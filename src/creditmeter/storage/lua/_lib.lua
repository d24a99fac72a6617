-- Shared prelude of the scripts' Functions library (creditmeter.storage.scripts): defined
-- once when the library is loaded; each script is a function of it, called with FCALL.
--
-- Every account script takes the same KEYS, all in one hash slot (the account's bucket):
--   KEYS[1] account HASH  the whole account (layout 3), read with one HGETALL on first use
--                         and written back with one HSET (and HDEL) when the script ends:
--     balance, granted, used, expired, removed, refunded, unlimited, seq,
--     reserved (credits held by open call sessions; in balance, not spendable),
--     used:<feature>, units:<feature>, carry:<subscription> (credits of its periods that
--     expired unused),
--     m:<lot id>     the lot's metadata (cjson object of strings, immutable): amount a,
--                    source s, reference r, created c, and o = '1' on a lot that rolls
--                    over (a subscription period's, see remove_lot; absent otherwise)
--                    (lot_meta reads it; 0.1.0's longer form too),
--     q:<burn key>   the lot's remaining credits; the burn key (creditmeter.domain.lots
--                    .burn_key, the lot id its last field) sorts lots in burn-down order,
--     next_expiry    the soonest expiry of any lot (ms), absent when none expires: a
--                    script sweeps only when it has come.
--     od, debt, rp:<lot>  the credit line (see "credit line" below); absent on an
--                    account without one.
--   KEYS[2] idem    STRING  "<fingerprint>\n<cjson reply>" for this request id, with a TTL
--   KEYS[3] outbox  STREAM  the bucket's event outbox drained into the ledger
--   KEYS[4] due     ZSET  the bucket's expiry index: "<tenant>:<account>" scored by next expiry
-- and the same leading ARGV:
--   ARGV[1] now (ms since epoch)   ARGV[2] request fingerprint ('' = not idempotent)
--   ARGV[3] idempotency TTL (s)    ARGV[4] transaction id (events are "<txn>:<n>")
--   ARGV[5] tenant   ARGV[6] account   ARGV[7] request id
-- Replies are arrays of strings, {'OK', ...} or {'ERR', reason, key, value, ...}, or such an
-- array JSON-encoded (a replayed reply, as stored; every reply of consume). A reply
-- that reports a balance carries the account's raw figures, `holdings` (credit in lots
-- less the credit line's debt, reserved, unlimited): what of it is spendable is said in
-- one place, the domain (creditmeter.domain.balances), not here.
--
-- Events: a call writes one outbox entry (flush_events; the format is in
-- creditmeter.storage.entries). Each event has an id "<txn>:<n>" (n counts within its
-- transaction, so the first event of a grant is always "<txn>:1"), the account's change
-- sequence number `seq` (1, 2, 3, ... over every change of the account; kept in the
-- account's seq), and one kind. A transaction holds events of one kind: the expiries a
-- script sweeps first form their own transaction "<txn>x", the lots a reset removes
-- "<txn>r". An idempotent request's entry also carries its fingerprint and reply, the
-- durable copy of the idempotency record (the `request` event of the ledger).
-- Every event that moves credit carries `balance` (the credit in lots after it; -1 on an
-- unlimited account) and `reserved` (what open sessions hold then), so a balance watcher
-- sees each transaction's spendable balance before and after it. A session step that
-- changes what it holds appends `hold` / `release` events (amount = credits held or
-- let go): reservations are hot state, so these go to watchers only, never to the ledger,
-- and take no seq.
--
-- Numbers: Lua numbers are doubles, exact for integers up to 2^53-1 (callers keep every
-- amount and balance below that). Never concatenate a number with `..` or cjson-encode it:
-- both format with %.14g and lose digits. Format with fmt().

-- Per-call state. The library is loaded once (FUNCTION LOAD) and its functions are
-- called many times: everything that belongs to one call is (re)set by begin(), never
-- left over from the call before.
local KEYS, ARGV
local NOW, FINGERPRINT, TXN, TENANT, ACCOUNT, REQUEST_ID
local MAX_CREDITS = 9007199254740991
-- burn key: 4+1+13+1+1+1+13+1 characters, then the lot id (storage.layout.BurnKey; the
-- offset and the expiry's place are pinned by tests/test_metering.py)
local BURN_KEY_LOT_OFFSET = 36

local due_changed
-- A lot with an expiry was dropped: next_expiry is recomputed once, at the end.
local expiry_stale
-- The account, as the call sees it (one HGETALL), and what it changed (one HSET and
-- one HDEL in flush_account, run after the body by the library's wrapper).
local account, changed, deleted
-- The numbers among the account's fields, parsed on first use (acct_int).
local numbers
-- The events of the call, written as one outbox entry when it ends (flush_events).
local events, request_fp, request_reply
-- The encoded reply of a consume: its outbox entry carries it instead of its events,
-- and the account's seq after them (before a recharge_due event the call may add).
local consumed, consumed_seq
-- The account's balance and reserved fields when the call loaded it (strings or nil),
-- and the tenant's default recharge policy for the call ('' or nil: none; see
-- recharge_watch).
local start_balance, start_reserved, start_debt, RECHARGE
-- Debt the call's money-in repaid (repay), for the replies of grants.
local repaid_now

local function begin(keys, args)
  KEYS, ARGV = keys, args
  NOW = tonumber(args[1])
  FINGERPRINT, TXN, TENANT, ACCOUNT, REQUEST_ID = args[2], args[4], args[5], args[6], args[7]
  due_changed = false
  expiry_stale = false
  account, changed, deleted, numbers = nil, {}, {}, {}
  events, request_fp, request_reply, consumed, consumed_seq = {}, nil, nil, nil, nil
  RECHARGE = nil
  repaid_now = 0
end

local function fmt(n)
  return string.format('%d', n)
end

local function acct()
  if account == nil then
    account = {}
    local flat = redis.call('HGETALL', KEYS[1])
    for i = 1, #flat, 2 do
      account[flat[i]] = flat[i + 1]
    end
    start_balance, start_reserved, start_debt = account.balance, account.reserved, account.debt
  end
  return account
end

local function acct_get(field)
  return acct()[field]
end

-- A field as a number (0 when absent), parsed once per call (tonumber is strtod: not free).
local function acct_int(field)
  local n = numbers[field]
  if n == nil then
    n = tonumber(acct()[field] or '0')
    numbers[field] = n
  end
  return n
end

local function acct_set(field, value)
  acct()[field] = value
  numbers[field] = nil
  changed[field] = true
  deleted[field] = nil
end

-- Add n to a numeric field; returns the new value (the field holds it formatted).
local function acct_incr(field, n)
  local v = acct_int(field) + n
  account[field] = fmt(v)
  numbers[field] = v
  changed[field] = true
  deleted[field] = nil
  return v
end

local function acct_del(field)
  acct()[field] = nil
  numbers[field] = nil
  changed[field] = nil
  deleted[field] = true
end

local function acct_exists()
  return next(acct()) ~= nil
end

local function acct_unlimited()
  return acct_get('unlimited') == '1'
end

-- Write `items` with `command` in chunks (unpack has a limit on its arguments).
local function call_chunked(command, items)
  for i = 1, #items, 1000 do
    redis.call(command, KEYS[1], unpack(items, i, math.min(i + 999, #items)))
  end
end

local function flush_account()
  if account == nil then
    return
  end
  local sets, dels = {}, {}
  for field in pairs(changed) do
    sets[#sets + 1] = field
    sets[#sets + 1] = account[field]
  end
  for field in pairs(deleted) do
    dels[#dels + 1] = field
  end
  call_chunked('HSET', sets)
  call_chunked('HDEL', dels)
end

-- Event kinds that record a call or a change of hot state, not a change of the ledger:
-- they take no seq of their own.
local NO_SEQ_KINDS = {hold = true, release = true}

-- ---- credit line (overdraft; creditmeter.domain.balances) ---------------------------
-- An account with an overdraft limit may be charged past its lots, down to -limit:
--   od          the overdraft limit (credits; absent: none), set by set_options.lua
--   debt        credits charged beyond the lots, not yet repaid (absent: none)
--   rp:<lot>    "<repaid> <granted>": debt the lot's grant repaid first, and the lot's
--               amount (a refund of the lot brings that debt back, see refund.lua)
-- A charge takes the lots first (every lot, held credit too: an open session's hold is
-- then collected into debt) and only the rest becomes debt. Every money-in (add_lot)
-- repays the debt first, out of its new lot. Accounts without a credit line have none of
-- these fields and pay two table lookups per charge for it.

-- Whether the account has a credit line or a debt (its fields need reading).
local function has_credit_line()
  local a = acct()
  return a.od ~= nil or a.debt ~= nil
end

-- The figures every credit-moving event carries, for `balance` credits in lots after it
-- (and the debt and overdraft limit, on an account with a credit line).
local function balance_fields(balance)
  local f = {
    'balance', acct_unlimited() and '-1' or fmt(balance),
    'reserved', fmt(acct_int('reserved')),
  }
  if has_credit_line() then
    f[5], f[6], f[7], f[8] = 'debt', fmt(acct_int('debt')), 'od', fmt(acct_int('od'))
  end
  return f
end

-- Append the account's raw figures to a reply: credit in lots (reservations included)
-- less the debt, credit held by open sessions, unlimited ('1' or '0').
local function add_holdings(reply)
  -- 'OK2': replies of this format. Records of 0.1.0 (status 'OK', one balance where these
  -- three figures are) are replayed for a day after an upgrade; storage reads both.
  reply[1] = 'OK2'
  reply[#reply + 1] = fmt(acct_int('balance') - acct_int('debt'))
  reply[#reply + 1] = fmt(acct_int('reserved'))
  reply[#reply + 1] = acct_unlimited() and '1' or '0'
  return reply
end

-- Record one event of transaction `txn` (TXN, or TXN and a suffix: 'x', 'r'). `fields`
-- is a flat list of name, value (strings), then `more` (optional, another such list).
-- The events of a call are written together, as one outbox entry, by flush_events.
local function emit(txn, kind, fields, more)
  local seq
  if NO_SEQ_KINDS[kind] then
    seq = acct_get('seq') or '0'
  else
    acct_incr('seq', 1)
    seq = acct_get('seq')
  end
  local e = {string.sub(txn, #TXN + 1), kind, seq}
  for i = 1, #fields do
    e[i + 3] = fields[i]
  end
  if more then
    local at = #e
    for i = 1, #more do
      e[at + i] = more[i]
    end
  end
  events[#events + 1] = e
end

-- Write the call's events and its request record as one outbox entry (see
-- creditmeter.storage.entries for the format): the header once, the events as one cjson
-- array of [txn suffix, kind, seq, name, value, ...], the request record (fingerprint and
-- the encoded reply, already made for the idempotency record) folded in.
local function flush_events()
  if consumed ~= nil then
    -- A consume: its reply says its events; the events array holds the expiries (and a
    -- recharge_due) only.
    -- With a fingerprint, `c` is also the request record's reply.
    local swept = #events == 0 and '[]' or cjson.encode(events)
    local seq = consumed_seq or account.seq
    if request_fp == nil then
      redis.call('XADD', KEYS[3], '*', 't', TENANT, 'a', ACCOUNT, 'x', TXN, 'r', REQUEST_ID,
                 'ts', ARGV[1], 'e', swept, 'c', consumed, 's', seq)
    else
      redis.call('XADD', KEYS[3], '*', 't', TENANT, 'a', ACCOUNT, 'x', TXN, 'r', REQUEST_ID,
                 'ts', ARGV[1], 'e', swept, 'c', consumed, 's', seq, 'fp', request_fp)
    end
    return
  end
  if #events == 0 and request_fp == nil then
    return
  end
  if request_fp == nil then
    redis.call('XADD', KEYS[3], '*', 't', TENANT, 'a', ACCOUNT, 'x', TXN, 'r', REQUEST_ID,
               'ts', ARGV[1], 'e', cjson.encode(events))
  else
    redis.call('XADD', KEYS[3], '*', 't', TENANT, 'a', ACCOUNT, 'x', TXN, 'r', REQUEST_ID,
               'ts', ARGV[1], 'e', #events == 0 and '[]' or cjson.encode(events),
               'fp', request_fp, 'reply', request_reply)
  end
end

-- The stored reply of an earlier call with this request id, an error reply if the id
-- was used with other parameters, or nil.
local function idem_lookup()
  if FINGERPRINT == '' then
    return nil
  end
  local stored = redis.call('GET', KEYS[2])
  if not stored then
    return nil
  end
  local sep = string.find(stored, '\n', 1, true)
  if string.sub(stored, 1, sep - 1) ~= FINGERPRINT then
    return {'ERR', 'IDEMPOTENCY_KEY_REUSED', 'request_id', REQUEST_ID}
  end
  -- The reply as it was encoded: returned as it is (the caller decodes JSON replies).
  return string.sub(stored, sep + 1)
end

-- Store the reply under the request id (an idempotent request) and return it encoded:
-- storage decodes a reply that is a JSON string as it decodes one that is an array.
local function idem_store(reply)
  local encoded = cjson.encode(reply)
  if FINGERPRINT ~= '' then
    redis.call('SET', KEYS[2], FINGERPRINT .. '\n' .. encoded, 'EX', ARGV[3])
    request_fp, request_reply = FINGERPRINT, encoded
  end
  return encoded
end

local NEVER = '9999999999999' -- the expiry field of a burn key that never expires
-- The bytes of 'q:', the prefix of a lot's `q:<burn key>` field (string.byte, like every
-- library but redis's, is not there while a Functions library is being loaded).
local Q, COLON = 113, 58

-- The expiry (ms string) in a burn key: `pppp|eeeeeeeeeeeee|...`.
local function burn_key_expiry(burn_key)
  return string.sub(burn_key, 6, 18)
end

-- The account's lots in burn-down order: their `q:<burn key>` field names.
local function lots_in_order()
  local names = {}
  for field in pairs(acct()) do
    if string.byte(field, 1) == Q and string.byte(field, 2) == COLON then
      names[#names + 1] = field
    end
  end
  if #names > 1 then
    table.sort(names)
  end
  return names
end

-- Point next_expiry (and, at the end, the bucket's expiry index) at the soonest expiry.
-- Run once per script, by update_due, when a drop made it stale (or by restore).
local function refresh_next_expiry()
  local soonest = nil
  for field in pairs(acct()) do
    if string.sub(field, 1, 2) == 'q:' then
      local e = burn_key_expiry(string.sub(field, 3))
      if e ~= NEVER and (soonest == nil or e < soonest) then
        soonest = e
      end
    end
  end
  if soonest ~= acct_get('next_expiry') then
    if soonest == nil then
      acct_del('next_expiry')
    else
      acct_set('next_expiry', soonest)
    end
    due_changed = true
  end
end

-- Remove a lot entirely (its remaining credit must already be accounted for).
local function drop_lot(lot, burn_key)
  acct_del('q:' .. burn_key)
  acct_del('m:' .. lot)
  if burn_key_expiry(burn_key) ~= NEVER then
    expiry_stale = true
  end
end

-- A lot's metadata by id, or nil when the lot is not on the account: amount, source,
-- reference, created, burn_key (strings), rolls_over (boolean). Stored in one of two
-- forms: the compact one this release writes ({a, s, r, c, o}: its priority and expiry are
-- in its burn key, found by its q: field), or the long one of 0.1.0, converted as it was
-- (with every field named).
local function lot_meta(lot)
  local raw = acct_get('m:' .. lot)
  if raw == nil then
    return nil
  end
  local m = cjson.decode(raw)
  if m.burn_key ~= nil then
    -- 0.1.0 wrote no flag: its lots that rolled over were those whose reference is a bare
    -- subscription id (a period's and its rollover's). Only for lots of 0.1.0.
    m.rolls_over = string.match(m.reference, '^sub_[%w]+$') ~= nil
    return m
  end
  local meta = {amount = m.a, source = m.s, reference = m.r, created = m.c,
                rolls_over = m.o == '1'}
  for _, field in ipairs(lots_in_order()) do
    if string.sub(field, BURN_KEY_LOT_OFFSET + 2) == lot then
      meta.burn_key = string.sub(field, 3)
      break
    end
  end
  return meta
end

-- Take a whole lot out of the balance, recording `kind` (expire, reset or refund) in
-- transaction `txn` and adding to the total field. `reference` (optional) goes on the
-- event. Returns the credits removed.
local function remove_lot(lot, txn, kind, total_field, reference)
  local meta = lot_meta(lot)
  local rem = tonumber(acct_get('q:' .. meta.burn_key))
  drop_lot(lot, meta.burn_key)
  if rem > 0 then
    local balance = acct_incr('balance', -rem)
    acct_incr(total_field, rem)
    if kind == 'expire' and meta.rolls_over then
      -- A subscription period's credits ran out unused: remember them for its rollover
      -- (the lot's reference is the subscription id).
      acct_incr('carry:' .. meta.reference, rem)
    end
    emit(txn, kind, {'lot', lot, 'amount', fmt(rem), 'reference', reference or ''},
         balance_fields(balance))
  end
  return rem
end

-- Expire every lot whose expiry is at or before now. Expired credit is never spendable,
-- so every script that reads or changes a balance calls this first. Costs nothing until
-- next_expiry has come.
local function sweep()
  local soonest = acct_get('next_expiry')
  if soonest == nil or tonumber(soonest) > NOW then
    return 0
  end
  local expired = {}
  for _, field in ipairs(lots_in_order()) do
    local burn_key = string.sub(field, 3)
    local e = burn_key_expiry(burn_key)
    if e ~= NEVER and tonumber(e) <= NOW then
      expired[#expired + 1] = {e, string.sub(burn_key, BURN_KEY_LOT_OFFSET)}
    end
  end
  -- In expiry order, then by lot id (the order of an expiry index).
  table.sort(expired, function(a, b)
    if a[1] ~= b[1] then
      return a[1] < b[1]
    end
    return a[2] < b[2]
  end)
  for i, item in ipairs(expired) do
    expired[i] = item[2]
  end
  for _, lot in ipairs(expired) do
    remove_lot(lot, TXN .. 'x', 'expire', 'expired')
  end
  return #expired
end

-- Keep next_expiry and the bucket's expiry index pointing at this account's next expiry.
-- scripts.py runs it after every script body, before flush_account.
local function update_due()
  if expiry_stale then
    expiry_stale = false
    refresh_next_expiry()
  end
  if not due_changed then
    return
  end
  due_changed = false
  local member = TENANT .. ':' .. ACCOUNT
  local soonest = acct_get('next_expiry')
  if soonest == nil then
    redis.call('ZREM', KEYS[4], member)
  else
    redis.call('ZADD', KEYS[4], soonest, member)
  end
end

-- Debt money-in repays first: take it out of the lot just added (id, burn key, amount),
-- recording a `repay` event and the lot's repayment (rp:<lot>). Returns the balance.
local function repay(lot_id, burn_key, amount)
  local owed = acct_int('debt')
  local balance = acct_int('balance')
  if owed <= 0 then
    return balance
  end
  local r = math.min(owed, amount)
  if r == owed then
    acct_del('debt')
  else
    acct_incr('debt', -r)
  end
  if r == amount then
    drop_lot(lot_id, burn_key)
  else
    acct_incr('q:' .. burn_key, -r)
  end
  balance = acct_incr('balance', -r)
  repaid_now = repaid_now + r
  acct_set('rp:' .. lot_id, fmt(r) .. ' ' .. fmt(amount))
  emit(TXN, 'repay', {'lot', lot_id, 'amount', fmt(r)}, balance_fields(balance))
  return balance
end

-- Add a lot. `lot` holds strings: id, amount, priority, expires_at ('0' = never),
-- source, reference, burn_key; and rolls_over (true on a subscription period's lots, set
-- by renew.lua; nil otherwise). Returns the balance afterwards.
local function add_lot(lot)
  local amount = tonumber(lot.amount)
  acct_set('m:' .. lot.id, cjson.encode({
    a = lot.amount, s = lot.source, r = lot.reference, c = ARGV[1],
    o = lot.rolls_over and '1' or nil,
  }))
  acct_set('q:' .. lot.burn_key, lot.amount)
  if lot.expires_at ~= '0' then
    local soonest = acct_get('next_expiry')
    if soonest == nil or tonumber(lot.expires_at) < tonumber(soonest) then
      acct_set('next_expiry', lot.expires_at)
      due_changed = true
    end
  end
  acct_incr('granted', amount)
  local balance = acct_incr('balance', amount)
  local fields = {
    'lot', lot.id, 'amount', lot.amount, 'priority', lot.priority,
    'expires_at', lot.expires_at, 'source', lot.source, 'reference', lot.reference,
  }
  if lot.rolls_over then
    fields[#fields + 1] = 'rolls_over'
    fields[#fields + 1] = '1'
  end
  emit(TXN, 'grant', fields, balance_fields(balance))
  if acct_get('debt') ~= nil then
    balance = repay(lot.id, lot.burn_key, amount)
  end
  return balance
end

-- The error reply when adding `amount` would take the balance or the granted total past
-- 2^53-1, or nil.
local function check_room(amount)
  local balance = acct_int('balance')
  if balance + amount > MAX_CREDITS or acct_int('granted') + amount > MAX_CREDITS then
    return {'ERR', 'BALANCE_LIMIT_EXCEEDED', 'balance', fmt(balance), 'amount', fmt(amount)}
  end
  return nil
end

local function lot_reply(lot)
  return {lot.id, lot.amount, lot.priority, lot.expires_at, lot.source, lot.reference, ARGV[1]}
end

local function lot_from_argv(first)
  return {
    id = ARGV[first], amount = ARGV[first + 1], priority = ARGV[first + 2],
    expires_at = ARGV[first + 3], source = ARGV[first + 4], reference = ARGV[first + 5],
    burn_key = ARGV[first + 6],
  }
end

-- Credit a charge or a new hold may take: the balance less what open call sessions hold,
-- less the debt, plus the overdraft limit. The rule of creditmeter.domain.balances
-- .spendable, enforced here because the check must be atomic with the change; replies
-- report the raw figures (add_holdings), not this.
local function available()
  local a = acct_int('balance') - acct_int('reserved')
  if account.od ~= nil or account.debt ~= nil then -- has_credit_line(), inlined: hot
    a = a - acct_int('debt') + acct_int('od')
  end
  return a
end

-- What a refusal reports as the balance: spendable credit without the credit line.
local function spendable_now(expired)
  local a = acct_int('balance') - acct_int('reserved') - expired
  if has_credit_line() then
    a = a - acct_int('debt')
  end
  return math.max(a, 0)
end

-- The refusal of a charge of `required` credits (a string) the account cannot take: its
-- spendable balance (`expired` credit not swept yet left out), and on an account with a
-- credit line its debt and overdraft limit.
local function insufficient(expired, required)
  if has_credit_line() then
    return {'ERR', 'INSUFFICIENT_CREDITS', 'balance', fmt(spendable_now(expired)),
            'required', required, 'debt', fmt(acct_int('debt')),
            'overdraft_limit', fmt(acct_int('od'))}
  end
  return {'ERR', 'INSUFFICIENT_CREDITS', 'balance', fmt(spendable_now(expired)),
          'required', required}
end

-- What a charge the lots do not touch took from them (shared, never written).
local NO_CHARGES = {}

-- Split a charge of `amount` credits into what the lots pay and what becomes debt.
local function split_charge(amount)
  local balance = acct_int('balance')
  if amount <= balance or not has_credit_line() then
    return amount, 0
  end
  return balance, amount - balance
end

-- Credit in lots whose expiry has come (at or before now) that no sweep has removed yet:
-- 0 once sweep() has run. A read-only script (check.lua) leaves it out, as a sweep would.
local function expired_unswept()
  local soonest = acct_get('next_expiry')
  if soonest == nil or tonumber(soonest) > NOW then
    return 0
  end
  local total = 0
  for field, value in pairs(acct()) do
    if string.byte(field, 1) == Q and string.byte(field, 2) == COLON then
      local e = burn_key_expiry(string.sub(field, 3))
      if e ~= NEVER and tonumber(e) <= NOW then
        total = total + tonumber(value)
      end
    end
  end
  return total
end

-- What consume decides for a charge of `amount` credits (`amount_s`: the same, as its
-- argument string), `expired` credit of the lots being expired but not swept yet (0 after
-- sweep()): nil when the charge goes ahead, else the refusal it answers. One decision for
-- consume.lua, which charges on nil, and check.lua, which only reports it.
local function charge_refusal(amount, amount_s, expired)
  local spendable = available() - expired
  if not acct_unlimited() and spendable < amount then
    return insufficient(expired, amount_s)
  end
  if acct_int('used') + amount > MAX_CREDITS then
    return {'ERR', 'BALANCE_LIMIT_EXCEEDED', 'balance', fmt(spendable), 'amount', amount_s}
  end
  return nil
end

-- Take `amount` credits out of the lots in burn-down order and out of the balance.
-- Returns the flat list lot1, amount1, ... of what it took from each lot, or nil (and
-- changes nothing) if the lots do not cover the amount. The caller has checked that the
-- balance covers it: nil means the lots and the recorded balance disagree.
local function take(amount)
  local names = lots_in_order()
  local need, last = amount, 0
  for i = 1, #names do
    last = i
    local rem = acct_int(names[i])
    if rem >= need then
      need = 0
      break
    end
    need = need - rem
  end
  if need > 0 then
    return nil
  end
  -- Writes, once the lots cover the amount.
  local charges = {}
  need = amount
  for i = 1, last do
    local field = names[i]
    local rem = acct_int(field)
    local t = math.min(rem, need)
    local burn_key = string.sub(field, 3)
    local lot = string.sub(burn_key, BURN_KEY_LOT_OFFSET)
    if t == rem then
      drop_lot(lot, burn_key)
    else
      acct_incr(field, -t)
    end
    need = need - t
    charges[#charges + 1] = lot
    charges[#charges + 1] = fmt(t)
  end
  acct_incr('balance', -amount)
  return charges
end

local LOTS_DISAGREE = 'creditmeter: lots do not cover the recorded balance'

-- take(), recording one `kind` event (session) per lot touched in transaction TXN; the
-- units go on the first event only, so summing units over events counts each
-- transaction once. Returns the flat list lot1, amount1, ... (or an error reply).
local function burn(amount, kind, feature, units, reference)
  local balance = acct_int('balance')
  local from_lots, owed = split_charge(amount)
  local charges = NO_CHARGES
  if from_lots > 0 then
    charges = take(from_lots)
  end
  if charges == nil then
    return redis.error_reply(LOTS_DISAGREE)
  end
  for i = 1, #charges, 2 do
    local taken = tonumber(charges[i + 1])
    balance = balance - taken
    local fields = {
      'lot', charges[i], 'amount', charges[i + 1], 'feature', feature,
      'units', i == 1 and units or '0',
    }
    if reference ~= '' then
      fields[#fields + 1] = 'reference'
      fields[#fields + 1] = reference
    end
    emit(TXN, kind, fields, balance_fields(balance))
  end
  if owed > 0 then
    -- The part past the lots: debt, one event with no lot (source 'debt').
    acct_incr('debt', owed)
    local fields = {
      'lot', '', 'amount', fmt(owed), 'feature', feature,
      'units', #charges == 0 and units or '0', 'source', 'debt',
    }
    if reference ~= '' then
      fields[#fields + 1] = 'reference'
      fields[#fields + 1] = reference
    end
    emit(TXN, kind, fields, balance_fields(balance))
  end
  return charges
end

-- Count a charge in the account's usage totals.
local function count_usage(amount, feature, units)
  acct_incr('used', amount)
  acct_incr('used:' .. feature, amount)
  acct_incr('units:' .. feature, units)
end

-- ---- usage limits (creditmeter.domain.limits) --------------------------------------
-- A limit caps a feature's usage in each calendar period of the account's time zone:
-- day (d), week from Monday (w) or month (m), counted in units (u) or credits (c). The
-- tenant's limits come from the server with each call, three arguments (`limit args`):
--   rules    "<feature>:<period>:<max>:<measure>,..." ('' = none), e.g. "text:d:100:u"
--   zone     the time zone the server assumed for the account ('' = UTC)
--   windows  "<day start>,<day end>,<week start>,<week end>,<month start>,<month end>"
--            (ms), the periods of now in that zone
-- The account's own, in its hash (creditmeter.storage.limit_fields), win over the
-- tenant's for their (feature, period):
--   L:<feature>:<period>  "<max>:<measure>"     limits  how many L: fields there are
--   tz                    the account's time zone (absent: UTC)
--   nolimits              '1': the account is exempt from every limit
--   U:<feature>:<period>  "<period start> <units> <credits> <held units> <held credits>":
--                         usage counted in the period that starts there (a later period
--                         reads as 0: usage resets at the boundary without a sweep), and
--                         what open call sessions hold against the limit (kept across a
--                         boundary: a hold is outstanding whatever the period).
-- A limit counts usage from when it applies to the account: a counter is kept only for
-- a (feature, period) with a limit.
local PERIOD_INDEX = {d = 1, w = 2, m = 3}
local PERIOD_NAMES = {d = 'day', w = 'week', m = 'month'}
local PERIODS = {'d', 'w', 'm'}

-- The limits on `feature` for this call, each {p, max, measure, counter field, period
-- start, period end, units, credits, held units, held credits}; nil when none applies,
-- or nil and a TIME_ZONE refusal when the server assumed another time zone (it asks
-- again with the account's: nothing was changed).
local function limit_state(feature, rules, zone, windows)
  if acct_get('nolimits') == '1' then
    return nil
  end
  local overrides = acct_get('limits') ~= nil
  if not overrides and (rules == '' or not string.find(rules, feature .. ':', 1, true)) then
    return nil
  end
  local list = {}
  for _, p in ipairs(PERIODS) do
    local max, measure
    if overrides then
      local own = acct_get('L:' .. feature .. ':' .. p)
      if own then
        max, measure = string.match(own, '^(%d+):(%a)$')
      end
    end
    if max == nil and rules ~= '' then
      max, measure = string.match(',' .. rules, ',' .. feature .. ':' .. p .. ':(%d+):(%a)')
    end
    if max then
      list[#list + 1] = {p = p, max = tonumber(max), measure = measure,
                         field = 'U:' .. feature .. ':' .. p}
    end
  end
  if #list == 0 then
    return nil
  end
  local tz = acct_get('tz') or ''
  if tz ~= zone then
    return nil, {'ERR', 'TIME_ZONE', 'time_zone', tz}
  end
  local bounds = {}
  for n in string.gmatch(windows, '%d+') do
    bounds[#bounds + 1] = n
  end
  for _, l in ipairs(list) do
    local i = PERIOD_INDEX[l.p]
    l.start, l.finish = bounds[2 * i - 1], bounds[2 * i]
    l.uu, l.uc, l.hu, l.hc = 0, 0, 0, 0
    local counted = acct_get(l.field)
    if counted then
      local s, uu, uc, hu, hc = string.match(counted, '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
      if s == l.start then
        l.uu, l.uc = tonumber(uu), tonumber(uc)
      end
      l.hu, l.hc = tonumber(hu), tonumber(hc)
    end
  end
  return list
end

-- The refusal of a charge of `units` and `amount` credits that would pass a limit, or nil.
-- Sessions' holds count as used: they are credit a call may still spend.
local function limit_refusal(limits, feature, units, amount)
  for _, l in ipairs(limits) do
    local used, held, need = l.uu, l.hu, units
    if l.measure == 'c' then
      used, held, need = l.uc, l.hc, amount
    end
    if used + held + need > l.max then
      return {'ERR', 'USAGE_LIMIT_EXCEEDED', 'feature', feature, 'period', PERIOD_NAMES[l.p],
              'limit', fmt(l.max), 'used', fmt(used), 'reserved', fmt(held),
              'required', fmt(need), 'unit', l.measure == 'c' and 'credits' or 'units',
              'period_end', l.finish}
    end
  end
  return nil
end

-- Count a charge (units, credits) and a change of what sessions hold (held units, held
-- credits; negative to release) against every limit of `limits`.
local function count_limits(limits, units, credits, held_units, held_credits)
  for _, l in ipairs(limits) do
    l.uu, l.uc = l.uu + units, l.uc + credits
    l.hu, l.hc = math.max(0, l.hu + held_units), math.max(0, l.hc + held_credits)
    acct_set(l.field, l.start .. ' ' .. fmt(l.uu) .. ' ' .. fmt(l.uc) .. ' ' .. fmt(l.hu)
             .. ' ' .. fmt(l.hc))
  end
end

-- How many increments of `rate` credits each the limits leave room for.
local function limit_room(limits, rate)
  local room = nil
  for _, l in ipairs(limits) do
    local r = l.max - l.uu - l.hu
    if l.measure == 'c' then
      r = math.floor((l.max - l.uc - l.hc) / rate)
    end
    r = math.max(r, 0)
    if room == nil or r < room then
      room = r
    end
  end
  return room
end

-- ---- recharges (creditmeter.domain.recharge) --------------------------------------
-- A recharge policy "<threshold>:<pack id>" (pack '' = none) says an account is due a
-- recharge when its spendable balance falls below the threshold. The account's own is
-- its `R` field ('off': none, even with the tenant's); without one, the tenant's default
-- applies, which the scripts that charge (consume, session: the fourth limit arg) and
-- the sweeper's (sweep.lua) are given with each call, kept in RECHARGE. Run by the library's wrapper after every
-- script body: a call whose changes took the spendable balance from at or above the
-- threshold to below it records one `recharge_due` event, in a transaction of its own
-- ("<txn>d"), amount the threshold, reference the pack. One per crossing, whatever
-- races: each call is atomic and sees the balance before and after it; a new crossing
-- needs the balance back at or above the threshold first.
local function recharge_watch()
  if consumed ~= nil then
    consumed_seq = account.seq
  end
  if account == nil or not (changed.balance or changed.reserved or changed.debt
                            or deleted.debt) then
    return
  end
  local policy = account.R or RECHARGE
  if policy == nil or policy == '' or policy == 'off' or acct_unlimited() then
    return
  end
  local threshold, pack = string.match(policy, '^(%d+):(.*)$')
  threshold = tonumber(threshold)
  -- Spendable: the credit line does not count (the debt does, see _lib's credit line).
  local before = tonumber(start_balance or '0') - tonumber(start_reserved or '0')
  local after = acct_int('balance') - acct_int('reserved')
  if start_debt ~= nil or account.debt ~= nil then
    before = before - tonumber(start_debt or '0')
    after = after - acct_int('debt')
  end
  if before >= threshold and after < threshold then
    emit(TXN .. 'd', 'recharge_due', {'amount', fmt(threshold), 'reference', pack,
                                      'before', fmt(before)},
         balance_fields(acct_int('balance')))
  end
end
