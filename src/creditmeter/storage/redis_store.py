"""The hot state of every account in Redis, changed only through the Lua scripts.

The key layout (which keys, and how ids become key names) is in `layout`. Each script call
also appends one entry to its bucket's outbox (format: `entries`), which the flusher
(`ledger.flusher`) writes to the ledger; nothing here waits for that (see the map of the
request and ledger paths in creditmeter/__init__.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import ResponseError

from creditmeter import metrics
from creditmeter.constants import (
    COALESCE_MAX_BATCH,
    EXPIRY_SWEEP_BATCH,
    IDEMPOTENCY_TTL_S,
    NEVER_EXPIRES_MS,
    REPLICA_ACK_TIMEOUT_MS,
    SCRIPT_LOAD_ATTEMPTS,
    SESSION_CLOSE_BATCH,
)
from creditmeter.errors import BackendUnavailable, Rejected
from creditmeter.storage import credit_line, limits, recharge, scripts
from creditmeter.storage import totals as totals_module
from creditmeter.storage.account import AccountImage
from creditmeter.storage.coalescer import Coalescer
from creditmeter.storage.functions import function_missing, load_library
from creditmeter.storage.layout import (
    ACCOUNT_KIND,
    ACCOUNT_SCAN_PATTERN,
    ALL_BUCKETS_PATTERN,
    KIND_TYPES,
    LAYOUT_KEY,
    LAYOUT_VERSION,
    LOT_META,
    LOT_REMAINING,
    NEXT_EXPIRY,
    RENAMED_VERSION,
    SESSION_KIND,
    V1_ROLLS_OVER,
    V2_ACCOUNT_SCAN_PATTERN,
    AccountKeys,
    BurnKey,
    ParsedKey,
    buckets,
    due_key,
    key_of,
    legacy,
    legacy_key,
    outbox_key,
    parse,
    session_request_id,
    sessions_key,
)
from creditmeter.storage.limits import Counter, LimitArgs, OwnLimit, own_limit_args
from creditmeter.storage.recharge import OwnPolicy
from creditmeter.storage.redis_client import UNREACHABLE, Client, reachable, unavailable
from creditmeter.storage.replicas import ReplicaAcks, Targets
from creditmeter.storage.totals import Totals
from creditmeter.storage.totals import totals as read_totals


@dataclass(frozen=True)
class Call:
    """What every mutating script needs besides its own arguments."""

    now_ms: int
    txn: str
    request_id: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class NewLot:
    lot_id: str
    amount: int
    priority: int
    expires_at_ms: int | None
    source: str
    reference: str
    burn_key: str


@dataclass(frozen=True)
class LotRecord:
    lot_id: str
    amount: int
    remaining: int
    priority: int
    expires_at_ms: int | None
    source: str
    reference: str
    created_ms: int
    burn_key: str = ""
    #: A subscription period's lot (or its rollover's): what of it expires unused carries
    #: into the next period (renew.lua).
    rolls_over: bool = False


@dataclass(frozen=True)
class Holdings:
    """An account's raw figures as a script left them (the `add_holdings` of _lib.lua).

    What of it is spendable is the domain's rule (creditmeter.domain.balances), not
    storage's: these are only the facts it is computed from.
    """

    #: Credit in the account's lots, reservations included (acct.balance), less its
    #: debt (the credit line's, acct.debt): negative while the debt is larger.
    balance: int
    #: Credit held by open call sessions (acct.reserved).
    reserved: int
    unlimited: bool


def _holdings(values: Sequence[str]) -> Holdings:
    """The three reply values of add_holdings: balance, reserved, unlimited."""
    balance, reserved, unlimited = values
    return Holdings(int(balance), int(reserved), unlimited == "1")


@dataclass(frozen=True)
class GrantRecord:
    lot: LotRecord
    holdings: Holdings
    #: Credits of the grant that repaid debt first (the credit line); 0 in replies of
    #: releases before it.
    repaid: int = 0


def _repaid(values: Sequence[str], at: int) -> int:
    return int(values[at]) if len(values) > at else 0


@dataclass(frozen=True)
class ConsumeRecord:
    txn: str
    amount: int
    units: int
    feature: str
    holdings: Holdings
    time_ms: int
    charges: list[tuple[str, int]]
    #: Credits of the charge that became debt (past the lots, on the credit line).
    debt_incurred: int = 0


@dataclass(frozen=True)
class ConsumeCall:
    """One charge for `RedisStore.consume_many`: the arguments of `RedisStore.consume`."""

    keys: AccountKeys
    call: Call
    amount: int
    feature: str
    units: int
    limits: LimitArgs


@dataclass(frozen=True, slots=True)
class CheckCall:
    """One check for `RedisStore.check_many`: an account, a charge, and the time of it."""

    keys: AccountKeys
    amount: int
    now_ms: int
    feature: str
    units: int
    limits: LimitArgs


@dataclass(frozen=True, slots=True)
class CheckRecord:
    """What consume would decide for a charge now: the account's raw figures (expired
    credit not swept yet left out) and the refusal consume would answer (None: it would
    charge)."""

    holdings: Holdings
    refusal: Rejected | None


def _check_record(values: Sequence[str]) -> CheckRecord:
    """check.lua's reply for one charge: 'OK2', holdings, then a refusal's reason and
    metadata when consume would refuse."""
    refusal = None
    if len(values) > 4:
        pairs = values[5:]
        refusal = Rejected(values[4], dict(zip(pairs[::2], pairs[1::2], strict=True)))
    return CheckRecord(_holdings(values[1:4]), refusal)


@dataclass(frozen=True)
class OptionsRecord:
    """An account's options after SetAccountOptions."""

    unlimited: bool
    #: The time zone of its usage limits' periods ('' = UTC).
    time_zone: str
    #: Exempt from usage limits.
    exempt: bool
    #: The credit line: how far past its lots the account may be charged (0: none).
    overdraft_limit: int = 0
    #: Its debt now.
    debt: int = 0


@dataclass(frozen=True)
class SetBalanceRecord:
    holdings: Holdings
    removed: int
    lot: LotRecord | None


@dataclass(frozen=True)
class RefundRecord:
    holdings: Holdings
    removed: int
    #: (lot id, credits removed, credits the lot was granted); -1, -1 for a lot no longer
    #: on the account.
    lots: list[tuple[str, int, int]]


@dataclass(frozen=True)
class SessionFields:
    """A call session's hash, as session.lua writes it, typed: its feature, state (open,
    ended, timed_out), last sequence, seconds used over the call, increments and credits
    charged, credits held, seconds granted from the last report, whether that was the
    final unit, billing increment (s), credits per increment, timeout policy, grace (ms),
    start, validity and end times (ms; end 0 while open), and credits used but not
    collectable."""

    feature: str
    state: str
    sequence: int
    used_s: int
    units: int
    charged: int
    reserved: int
    granted_s: int
    final_unit: bool
    increment_s: int
    rate: int
    policy: str
    started_ms: int
    valid_until_ms: int
    ended_ms: int
    uncollected: int

    @classmethod
    def parse(cls, f: dict[str, str]) -> SessionFields:
        return cls(
            f["feature"], f["state"], int(f["seq"]), int(f["used"]), int(f["units"]),
            int(f["charged"]), int(f["reserved"]), int(f["granted"]), f["final"] == "1",
            int(f["inc"]), int(f["rate"]), f["policy"], int(f["started"]),
            int(f["valid_until"]), int(f["ended"]), int(f["uncollected"]),
        )  # fmt: skip


@dataclass(frozen=True)
class StartStep:
    """session.lua's start: open the session on a time feature at its rate and billing
    increment, with a first quota of `requested_s` seconds (0: `default_units`
    increments), the timeout policy and the grace before a silent session is closed."""

    feature: str
    rate: int
    increment_s: int
    requested_s: int
    default_units: int
    policy: str
    grace_ms: int

    def argv(self) -> list[str]:
        return [
            "start", self.feature, str(self.rate), str(self.increment_s), str(self.requested_s),
            str(self.default_units), self.policy, str(self.grace_ms),
        ]  # fmt: skip


@dataclass(frozen=True)
class ReportStep:
    """session.lua's update (charge and reserve the next quota: `requested_s` seconds,
    0 for `default_units` increments) or end (charge and release)."""

    end: bool
    sequence: int
    used_s: int
    requested_s: int = 0
    default_units: int = 0

    def argv(self) -> list[str]:
        if self.end:
            return ["end", str(self.sequence), str(self.used_s)]
        return ["update", str(self.sequence), str(self.used_s), str(self.requested_s),
                str(self.default_units)]  # fmt: skip


@dataclass(frozen=True)
class CloseStep:
    """session.lua's close: the server closes a session past its validity and grace."""

    def argv(self) -> list[str]:
        return ["close"]


SessionStepArgs = StartStep | ReportStep | CloseStep


@dataclass(frozen=True)
class SessionRecord:
    """A session step's outcome: credits charged and released by it, the account's
    figures afterwards, and the session afterwards."""

    charged: int
    released: int
    holdings: Holdings
    session: SessionFields


@dataclass(frozen=True)
class AccountSnapshot:
    """A consistent read of an account (one MULTI): its fields and lots in burn order."""

    exists: bool
    fields: dict[str, str]
    lots: list[LotRecord] = field(default_factory=list)

    @property
    def balance(self) -> int:
        """Credit in the account's lots."""
        return int(self.fields.get("balance", "0"))

    @property
    def seq(self) -> int:
        """The account's change sequence number (its last event's seq)."""
        return int(self.fields.get("seq", "0"))

    @property
    def totals(self) -> Totals:
        return read_totals(self.fields)

    # What the domain reads of an account, named here (the fields' names are storage's).
    @property
    def unlimited(self) -> bool:
        return totals_module.unlimited(self.fields)

    @property
    def reserved(self) -> int:
        """Credit held by open call sessions."""
        return totals_module.reserved(self.fields)

    @property
    def debt(self) -> int:
        """Credits charged past the lots on the credit line, not yet repaid."""
        return credit_line.debt(self.fields)

    @property
    def overdraft_limit(self) -> int:
        """How far past its lots the account may be charged (0: no credit line)."""
        return credit_line.overdraft_limit(self.fields)

    @property
    def credit_line(self) -> credit_line.CreditLine:
        """The credit line: overdraft limit, debt, repayments (audit)."""
        return credit_line.CreditLine.of(self.fields)

    @property
    def time_zone(self) -> str:
        """The time zone of its usage limits' periods ('' = UTC)."""
        return limits.time_zone(self.fields)

    @property
    def exempt(self) -> bool:
        """Exempt from usage limits."""
        return limits.exempt(self.fields)

    @property
    def own_limits(self) -> list[OwnLimit]:
        return limits.own_limits(self.fields)

    @property
    def counters(self) -> dict[tuple[str, str], Counter]:
        """The usage limits' counters: (feature, period) -> Counter."""
        return limits.counters(self.fields)

    @property
    def own_policy(self) -> OwnPolicy | None:
        """The account's own recharge policy, if it has one."""
        return recharge.own_policy(self.fields)


def _expiry_arg(expires_at_ms: int | None) -> str:
    return "0" if expires_at_ms is None else str(expires_at_ms)


def _lot_args(lot: NewLot) -> list[str]:
    return [
        lot.lot_id,
        str(lot.amount),
        str(lot.priority),
        _expiry_arg(lot.expires_at_ms),
        lot.source,
        lot.reference,
        lot.burn_key,
    ]


def _lot_from_reply(values: Sequence[str]) -> LotRecord:
    lot_id, amount, priority, expires_at, source, reference, created = values[:7]
    return LotRecord(
        lot_id=lot_id,
        amount=int(amount),
        remaining=int(amount),
        priority=int(priority),
        expires_at_ms=None if expires_at == "0" else int(expires_at),
        source=source,
        reference=reference,
        created_ms=int(created),
    )


#: The status of consume's replies on an account with a credit line (debt incurred, debt
#: after it and the overdraft limit follow the time).
CONSUME_WITH_DEBT = "OK3"


def _consume_record(reply: list[str] | str) -> ConsumeRecord:
    """consume.lua's reply (raises Rejected for a refusal)."""
    if isinstance(reply, str):
        reply = cast(list[str], json.loads(reply))
    with_debt = reply[0] == CONSUME_WITH_DEBT
    values = _checked(reply, "consume")
    txn, charged, units_s, feature_s = values[:4]
    time_ms, *parts = values[7:]
    incurred, debt = 0, 0
    if with_debt:
        incurred, debt = int(parts[0]), int(parts[1])
        parts = parts[3:]  # and the overdraft limit, for balance watchers
    charges = [(lot, int(amt)) for lot, amt in zip(parts[::2], parts[1::2], strict=True)]
    balance, reserved, unlimited = values[4:7]
    return ConsumeRecord(
        txn=txn,
        amount=int(charged),
        units=int(units_s),
        feature=feature_s,
        holdings=Holdings(int(balance) - debt, int(reserved), unlimited == "1"),
        time_ms=int(time_ms),
        charges=charges,
        debt_incurred=incurred,
    )


#: Replies that report a balance carry holdings (three figures) since 0.2 and say "OK2";
#: a request record of 0.1.0 replayed after an upgrade says "OK" and has one balance (the
#: balance it answered) at this place of its values.
_V1_BALANCE_AT = {"consume": 4, "grant": 7, "renew": 7, "set_balance": 0, "refund": 0,
                  "session": 2}  # fmt: skip


def lot_meta(
    amount: int, source: str, reference: str, created_ms: int, rolls_over: bool = False
) -> str:
    """A lot's `m:<lot id>` field as add_lot in _lib.lua writes it: its priority and expiry
    are in its burn key, not repeated here; `o` only on a lot that rolls over."""
    meta = {"a": str(amount), "s": source, "r": reference, "c": str(created_ms)}
    if rolls_over:
        meta["o"] = "1"
    return json.dumps(meta, separators=(",", ":"))


def _lot_record(burn_key: str, remaining: int, metas: dict[str, str]) -> LotRecord:
    """A lot from its burn key, remaining credits and metadata (either form: see
    lot_meta in _lib.lua)."""
    key = BurnKey.parse(burn_key)
    lot_id = key.lot_id
    meta = json.loads(metas[lot_id])
    if "burn_key" in meta:  # the long form of 0.1.0, converted as it was
        amount, source, reference, created = (
            meta["amount"], meta["source"], meta["reference"], meta["created"]
        )  # fmt: skip
        rolls_over = V1_ROLLS_OVER.fullmatch(reference) is not None
    else:
        amount, source, reference, created = meta["a"], meta["s"], meta["r"], meta["c"]
        rolls_over = meta.get("o") == "1"
    expires = key.expires_at_ms
    return LotRecord(
        lot_id=lot_id,
        amount=int(amount),
        remaining=remaining,
        priority=key.priority,
        expires_at_ms=None if expires == NEVER_EXPIRES_MS else expires,
        source=source,
        reference=reference,
        created_ms=int(created),
        burn_key=burn_key,
        rolls_over=rolls_over,
    )


def _checked(reply: list[str] | str, script: str) -> list[str]:
    """A script's reply values; raises Rejected for a refusal. A reply is an array, or
    the same array JSON-encoded (what a script stored for its request id, and consume's
    every reply: encoding it once serves both)."""
    if isinstance(reply, str):
        reply = cast(list[str], json.loads(reply))
    if reply[0] == "ERR":
        pairs = reply[2:]
        raise Rejected(reply[1], dict(zip(pairs[::2], pairs[1::2], strict=True)))
    values = reply[1:]
    at = _V1_BALANCE_AT.get(script)
    if reply[0] == "OK" and at is not None and len(values) > at:
        # The answer it gave then, as holdings: that balance, nothing held.
        balance = int(values[at])
        holdings = [str(max(balance, 0)), "0", "1" if balance == -1 else "0"]
        values = [*values[:at], *holdings, *values[at + 1 :]]
    return values


def _session_step(session_id: str, request_id: str) -> str:
    """The step part of a session step's request id (see `session_request_id`)."""
    step = request_id.rpartition("#")[2]
    assert session_request_id(session_id, step) == request_id, request_id
    return step


log = logging.getLogger(__name__)


class RedisStore:
    """Account state in Redis. Every change goes through one Lua script call."""

    def __init__(
        self,
        client: Client,
        idempotency_ttl_s: int = IDEMPOTENCY_TTL_S,
        replica_acks: int = 0,
    ) -> None:
        self.client = client
        self.idempotency_ttl_s = idempotency_ttl_s
        #: Replicas every change must reach before it is answered (`WAIT`); 0: none.
        self.replica_acks = replica_acks
        self._acks = ReplicaAcks(client, replica_acks)
        self._functions = {
            name: scripts.function_name(name)
            for name in (*scripts.SCRIPT_NAMES, scripts.CONSUME_BATCH, scripts.CHECK)
        }
        #: Concurrent single consumptions share pipelines through this (see coalescer).
        self.consume_coalescer: Coalescer[ConsumeCall, ConsumeRecord] = Coalescer(
            self.consume_many, COALESCE_MAX_BATCH
        )
        #: Concurrent single checks share pipelines the same way.
        self.check_coalescer: Coalescer[CheckCall, CheckRecord] = Coalescer(
            self.check_many, COALESCE_MAX_BATCH
        )
        #: Script pipelines sent to Redis (round trips of `consume_many`), for tests.
        self.pipelines = 0

    def _args(self, call: Call, keys: AccountKeys, extra: Sequence[str]) -> list[Any]:
        return [
            str(call.now_ms),
            call.fingerprint,
            str(self.idempotency_ttl_s),
            call.txn,
            keys.tenant,
            keys.account,
            call.request_id,
            *extra,
        ]

    async def load_library(self) -> None:
        """Load the scripts' library into Redis -- into every primary of a cluster (a
        no-op where it is there already)."""
        async with reachable():
            await load_library(self.client)

    async def _run(
        self,
        name: str,
        keys: AccountKeys,
        call: Call,
        extra: Sequence[str],
        script_keys: list[str] | None = None,
    ) -> list[str]:
        args = self._args(call, keys, extra)
        names = script_keys or keys.script_keys(call.request_id)
        if self.replica_acks:  # the call and its WAIT go in one pipeline
            [reply] = await self._run_many(name, [(names, args)])
        else:
            start = time.perf_counter()
            function = self._functions[name]
            try:
                async with reachable():
                    reply = await self.client.fcall(function, len(names), *names, *args)
            except ResponseError as exc:
                if not function_missing(exc):
                    raise
                # The library was flushed (or Redis lost it): loaded again, then run.
                [reply] = await self._run_many(name, [(names, args)], load_first=True)
            finally:
                # Failures too: a timeout is the latency worth seeing.
                metrics.redis_duration(name).observe(time.perf_counter() - start)
        if isinstance(reply, Exception):
            raise reply
        return _checked(cast(list[str] | str, reply), name)

    async def _run_many(
        self,
        name: str,
        calls: Sequence[tuple[list[str], list[Any]]],
        load_first: bool = False,
        operation: str | None = None,
        read_only: bool = False,
    ) -> list[Any]:
        """Run function `name` once per (keys, args), in order, in one pipeline (one batch
        per node of a cluster, sent in parallel); each reply or the ResponseError of that
        call. Each call's keys are in one slot (the first is its bucket's).

        Not a transaction: each call is atomic on its own, as if sent alone. Calls refused
        because the library is missing (after a FUNCTION FLUSH, a failover to a replica
        that lacks it, or a Redis that lost its data) are sent again, in order, once the
        library is loaded again. The round trip's latency is recorded under `operation`
        (default: `name`). A `read_only` function (registered no-writes) goes by FCALL_RO
        and waits for no replica: it changed nothing.
        """
        function = self._functions[name]
        replies: list[Any] = [None] * len(calls)
        pending = list(range(len(calls)))
        for _ in range(SCRIPT_LOAD_ATTEMPTS):
            if load_first:
                await self.load_library()
            start = time.perf_counter()
            try:
                async with reachable(), self.client.pipeline(transaction=False) as pipe:
                    send = pipe.fcall_ro if read_only else pipe.fcall
                    for i in pending:
                        keys, args = calls[i]
                        send(function, len(keys), *keys, *args)
                    first_keys = [calls[i][0][0] for i in pending]
                    waits = self.replica_acks and not read_only
                    targets = self._acks.targets(first_keys) if waits else {}
                    acks = self._acks.request(pipe, targets)
                    self.pipelines += 1
                    results = await pipe.execute(raise_on_error=False)
                    if acks:
                        await self._check_acks(first_keys, targets, results[-acks:])
                        results = results[:-acks]
            finally:
                # One round trip, however many calls it carried.
                metrics.redis_duration(operation or name).observe(time.perf_counter() - start)
            missing = []
            for i, result in zip(pending, results, strict=True):
                if isinstance(result, ResponseError) and function_missing(result):
                    missing.append(i)
                elif isinstance(result, UNREACHABLE):
                    # A cluster pipeline leaves a node's timeout or lost connection in its
                    # commands' results rather than raising it. One node of a cluster lost
                    # (the others' calls stand): this call fails UNAVAILABLE, as a lost
                    # single Redis fails them all.
                    replies[i] = unavailable(result)
                else:
                    replies[i] = result
            if not missing:
                return replies
            load_first = True
            pending = missing
        raise ResponseError(f"the library of {name} was flushed {SCRIPT_LOAD_ATTEMPTS} times")

    # --- replica acknowledgements (--replica-acks N: storage/replicas.py) --------------
    async def _check_acks(
        self, first_keys: Sequence[str], targets: Targets, results: Sequence[Any]
    ) -> None:
        """Raise BackendUnavailable unless the replicas acknowledged; a retry with the same
        request ids replays the calls and waits again. A call redirected (MOVED, ASK) ran
        on a node its batch's WAIT did not cover: then every node is asked again."""
        acked = self._acks.all_acked(targets, results)
        now = self._acks.targets(first_keys)
        if acked and now.keys() != targets.keys():
            async with self.client.pipeline(transaction=False) as pipe:
                self._acks.request(pipe, now)
                acked = self._acks.all_acked(now, await pipe.execute(raise_on_error=False))
        if not acked:
            raise BackendUnavailable(
                f"the change is not yet on {self.replica_acks} replica(s) after "
                f"{REPLICA_ACK_TIMEOUT_MS} ms; retry with the same request id",
                {"backend": "redis", "replica_acks": str(self.replica_acks)},
            )

    async def grant(self, keys: AccountKeys, call: Call, lot: NewLot) -> GrantRecord:
        values = await self._run("grant", keys, call, _lot_args(lot))
        return GrantRecord(
            lot=_lot_from_reply(values), holdings=_holdings(values[7:10]),
            repaid=_repaid(values, 10),
        )  # fmt: skip

    async def consume(
        self,
        keys: AccountKeys,
        call: Call,
        amount: int,
        feature: str,
        units: int,
        limits: LimitArgs,
    ) -> ConsumeRecord:
        """Charge an account (all or nothing); raises Rejected when the script refuses
        (reason WRONG_TIME_ZONE: the limit args assumed another time zone than the
        account's; nothing changed, ask again with the zone in its metadata).

        Goes through the coalescer: alone when Redis is idle, in one pipeline with the
        other charges that queued meanwhile when it is busy.
        """
        return await self.consume_coalescer.submit(
            ConsumeCall(keys, call, amount, feature, units, limits)
        )

    async def consume_many(self, calls: Sequence[ConsumeCall]) -> list[ConsumeRecord | Exception]:
        """Run the consume script for each call, in order, in one round trip: one call of
        the consume_batch function per bucket, carrying that bucket's charges.

        Each outcome is the call's record, or the Rejected (or ResponseError) that call
        alone would have raised. A lost Redis raises BackendUnavailable for the whole batch:
        some calls may have run, and a retry with the same request ids replays them.
        Charges of one account are in one bucket, so they run in the order given; charges
        of different buckets touch different accounts, so their relative order is moot.
        """
        by_bucket: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            by_bucket.setdefault(c.keys.bucket, []).append(i)
        batches: list[tuple[list[str], list[Any]]] = []
        for indexes in by_bucket.values():
            bucket = calls[indexes[0]].keys.bucket
            keys = [outbox_key(bucket), due_key(bucket)]
            args: list[Any] = []
            for i in indexes:
                c = calls[i]
                keys.append(c.keys.account_key)
                keys.append(c.keys.idempotency_key(c.call.request_id))
                args.extend(
                    self._args(
                        c.call, c.keys, [str(c.amount), c.feature, str(c.units), *c.limits.argv()]
                    )
                )
            batches.append((keys, args))
        replies = await self._run_many(scripts.CONSUME_BATCH, batches, operation="consume")
        outcomes: list[ConsumeRecord | Exception] = [ResponseError("not run")] * len(calls)
        for indexes, reply in zip(by_bucket.values(), replies, strict=True):
            # A reply that is one error (not a list) failed the bucket's every charge.
            items = reply if isinstance(reply, list) else [reply] * len(indexes)
            for i, item in zip(indexes, items, strict=True):
                if isinstance(item, Exception):
                    outcomes[i] = item
                    continue
                try:
                    outcomes[i] = _consume_record(item)
                except Rejected as rejected:
                    outcomes[i] = rejected
        return outcomes

    async def check(self, call: CheckCall) -> CheckRecord:
        """What consume would decide for the charge now; changes nothing. A refusal
        WRONG_TIME_ZONE means what it means for `consume`.

        Goes through a coalescer, as consume does: concurrent checks share round trips.
        """
        return await self.check_coalescer.submit(call)

    async def check_many(self, calls: Sequence[CheckCall]) -> list[CheckRecord | Exception]:
        """Run check.lua for each call in one round trip: one FCALL_RO per bucket, carrying
        that bucket's checks (as consume_many does: one script call per bucket, not one
        per item). Each outcome is the call's record, or the ResponseError of its bucket."""
        by_bucket: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            by_bucket.setdefault(c.keys.bucket, []).append(i)
        batches: list[tuple[list[str], list[Any]]] = []
        for indexes in by_bucket.values():
            keys = [calls[i].keys.account_key for i in indexes]
            args: list[Any] = []
            for i in indexes:
                c = calls[i]
                args.extend((str(c.now_ms), str(c.amount), c.feature, str(c.units)))
                args.extend(c.limits.argv())
            batches.append((keys, args))
        replies = await self._run_many(scripts.CHECK, batches, read_only=True)
        outcomes: list[CheckRecord | Exception] = [ResponseError("not run")] * len(calls)
        for indexes, reply in zip(by_bucket.values(), replies, strict=True):
            items = reply if isinstance(reply, list) else [reply] * len(indexes)
            for i, item in zip(indexes, items, strict=True):
                outcomes[i] = item if isinstance(item, Exception) else _check_record(item)
        return outcomes

    async def set_balance(
        self, keys: AccountKeys, call: Call, reset: bool, lot: NewLot
    ) -> SetBalanceRecord:
        values = await self._run(
            "set_balance", keys, call, ["1" if reset else "0", *_lot_args(lot)]
        )
        new_lot = _lot_from_reply(values[4:]) if len(values) > 4 else None
        return SetBalanceRecord(
            holdings=_holdings(values[:3]), removed=int(values[3]), lot=new_lot
        )

    async def set_options(
        self,
        keys: AccountKeys,
        call: Call,
        unlimited: bool | None,
        time_zone: str | None = None,
        exempt: bool | None = None,
        overdraft_limit: int | None = None,
    ) -> OptionsRecord:
        """Change the options given (None leaves one as it is; time zone '' is UTC,
        overdraft limit 0 none)."""

        def flag(value: bool | None) -> str:
            return "" if value is None else ("1" if value else "0")

        zone = "-" if time_zone is None else time_zone
        overdraft = "" if overdraft_limit is None else str(overdraft_limit)
        values = await self._run(
            "set_options", keys, call, [flag(unlimited), zone, flag(exempt), overdraft]
        )
        if len(values) < 3:  # a record of 0.2.0 replayed: only the unlimited flag
            return OptionsRecord(values[0] == "1", "", False)
        if len(values) < 5:  # a record from before the credit line
            return OptionsRecord(values[0] == "1", values[1], values[2] == "1")
        return OptionsRecord(
            values[0] == "1", values[1], values[2] == "1", int(values[3]), int(values[4])
        )

    async def set_limit(
        self,
        keys: AccountKeys,
        call: Call,
        feature: str,
        period: str,
        limit: int | None,
        measure: str,
    ) -> None:
        """Set (or with `limit` None remove) the account's own limit on `feature` for
        `period` (a name of limits.PERIOD_CODES), counted in `measure` (units, credits)."""
        await self._run("set_limit", keys, call, [feature, *own_limit_args(period, limit, measure)])

    async def set_recharge(self, keys: AccountKeys, call: Call, own: OwnPolicy | None) -> None:
        """Set the account's own recharge policy, turn recharges off for it (a policy
        of None in `own`), or with `own` None remove its own (the tenant's applies)."""
        await self._run("set_recharge", keys, call, recharge.script_args(own))

    async def sweep(self, keys: AccountKeys, call: Call, recharge: str = "") -> int:
        """Record the expiry of the account's lots whose time has come; returns how many."""
        values = await self._run("sweep", keys, call, [recharge])
        return int(values[0])

    async def renew(
        self, keys: AccountKeys, call: Call, lot: NewLot, cap: int, rollover: NewLot
    ) -> GrantRecord:
        """Grant a subscription period, with a rollover lot of at most `cap` carried
        credits (the rollover lot's id and burn key come from `rollover`)."""
        values = await self._run(
            "renew", keys, call, [*_lot_args(lot), str(cap), rollover.lot_id, rollover.burn_key]
        )
        return GrantRecord(
            lot=_lot_from_reply(values), holdings=_holdings(values[7:10]),
            repaid=_repaid(values, 11),  # after the carried credits
        )  # fmt: skip

    async def refund(
        self, keys: AccountKeys, call: Call, reason: str, lot_ids: Sequence[str]
    ) -> RefundRecord:
        """Remove what is left of the lots; lots not on the account report -1."""
        values = await self._run("refund", keys, call, [reason, *lot_ids])
        removed, *parts = values[3:]
        lots = [
            (lot, int(n), int(granted))
            for lot, n, granted in zip(parts[::3], parts[1::3], parts[2::3], strict=True)
        ]
        return RefundRecord(holdings=_holdings(values[:3]), removed=int(removed), lots=lots)

    async def session_step(
        self,
        keys: AccountKeys,
        call: Call,
        step: SessionStepArgs,
        session_id: str,
        limits: LimitArgs,
    ) -> SessionRecord | None:
        """Run one step of a call session (start, update, end, close); None when a close
        finds the session not yet due. `limits` carries the tenant's rules for every
        feature (a step after the start takes its feature from the session)."""
        name, *args = step.argv()
        values = await self._run(
            "session",
            keys,
            call,
            [name, session_id, *limits.argv(), *args],
            keys.session_keys(session_id, _session_step(session_id, call.request_id)),
        )
        if values == ["not_due"]:
            return None
        charged, released = values[:2]
        flat = values[5:]
        return SessionRecord(
            charged=int(charged),
            released=int(released),
            holdings=_holdings(values[2:5]),
            session=SessionFields.parse(dict(zip(flat[::2], flat[1::2], strict=True))),
        )

    async def account_exists(self, keys: AccountKeys) -> bool:
        """Whether the account has state in Redis (its hash, as `snapshot` reads it)."""
        async with reachable():
            return bool(await self.client.exists(keys.account_key))

    async def session(self, keys: AccountKeys, session_id: str) -> SessionFields | None:
        """A session, or None when there is no such session."""
        async with reachable():
            fields = await self.client.hgetall(keys.session_key(session_id))
        if not fields:
            return None
        return SessionFields.parse({str(k): str(v) for k, v in fields.items()})

    async def due_sessions(
        self, now_ms: int, limit: int = SESSION_CLOSE_BATCH
    ) -> list[tuple[AccountKeys, str]]:
        """Open sessions past their validity time and grace, from every bucket's index."""
        async with reachable(), self.client.pipeline(transaction=False) as pipe:
            for bucket in range(buckets()):
                pipe.zrangebyscore(sessions_key(bucket), "-inf", now_ms, start=0, num=limit)
            results: list[list[str]] = await pipe.execute()
        due = []
        for members in results:
            for member in members:
                owner, _, session_id = member.rpartition("|")
                tenant, _, account = owner.partition(":")
                due.append((AccountKeys(tenant, account), session_id))
        return due

    async def open_sessions(self) -> int:
        """How many call sessions are open, over every bucket's index."""
        async with reachable(), self.client.pipeline(transaction=False) as pipe:
            for bucket in range(buckets()):
                pipe.zcard(sessions_key(bucket))
            counts: list[int] = await pipe.execute()
        return sum(counts)

    async def restore(
        self,
        keys: AccountKeys,
        call: Call,
        image: AccountImage,
        lots: Sequence[LotRecord],
        replace: bool,
    ) -> int:
        """Write an account's state derived from the ledger (its lots: their remaining
        credits and burn keys); returns lots restored. Refuses (Rejected
        ACCOUNT_HAS_STATE) an account that has state, unless `replace`."""
        restored = [
            {
                "id": lot.lot_id,
                "remaining": str(lot.remaining),
                "expires_at": _expiry_arg(lot.expires_at_ms),
                "burn_key": lot.burn_key,
                "meta": lot_meta(
                    lot.amount, lot.source, lot.reference, lot.created_ms, lot.rolls_over
                ),
            }
            for lot in lots
        ]
        values = await self._run(
            "restore", keys, call,
            ["1" if replace else "0", json.dumps(image.fields()), json.dumps(restored)],
        )  # fmt: skip
        return int(values[0])

    async def restore_request(
        self,
        keys: AccountKeys,
        request_id: str,
        fingerprint: str,
        reply: str,
        ttl_s: int,
        session_id: str | None = None,
    ) -> None:
        """Put back an idempotency record from its durable copy in the ledger (a call
        session's step when `session_id` is given)."""
        key = (
            keys.idempotency_key(request_id)
            if session_id is None
            else keys.session_step_key(session_id, _session_step(session_id, request_id))
        )
        async with reachable():
            await self.client.set(key, f"{fingerprint}\n{reply}", ex=ttl_s)

    async def upgrade_layout(self) -> int:
        """Bring the keys of older releases to this layout, once (marker `cm:layout`):
        rename the keys 0.1.0 named differently (ids holding ':' or '%'), then convert
        every account of layout 2 (five keys) into its one hash. Returns the keys renamed
        plus the accounts converted. Safe to run again: a key of this layout is never
        touched."""
        async with reachable():
            version = await self.client.get(LAYOUT_KEY)
            if version == LAYOUT_VERSION:
                return 0
            done = 0
            if version != RENAMED_VERSION:
                done += await self._rename_legacy()
                await self.client.set(LAYOUT_KEY, RENAMED_VERSION)
            done += await self._convert_v2()
            await self.client.set(LAYOUT_KEY, LAYOUT_VERSION)
        return done

    async def _convert_v2(self) -> int:
        """Every layout-2 account into its one hash (convert.lua, atomic per account)."""
        script = scripts.standalone("convert")
        converted = 0
        async for key in self.client.scan_iter(match=V2_ACCOUNT_SCAN_PATTERN, count=1000):
            parsed = parse(key)
            if parsed is None or parsed.kind != "acct":
                continue  # a request's record whose id ends in ":acct"
            keys = parsed.keys
            converted += int(await self.client.eval(script, 6, *keys.v2_keys(), keys.account_key))
        if converted:
            log.info("layout upgrade: %d accounts moved into one hash each", converted)
        return converted

    async def _rename_legacy(self) -> int:
        renamed = 0
        async for key in self.client.scan_iter(match=ALL_BUCKETS_PATTERN, count=1000):
            if key.count(":") < 4 or await self._current(key):
                continue  # a bucket's own key, or one of this layout
            kind = str(await self.client.type(key))
            readings = [r for r in legacy(key) if KIND_TYPES[r.kind] == kind]
            steps = [r for r in readings if r.session_step]
            if steps:
                # A request id `<x>#<y>`: a session step's record if session <x> is
                # there (its record lives as long), else a client's request.
                is_step = await self._has_session(steps[0])
                readings = [
                    r for r in readings
                    if r.session_step == is_step or r.keys != steps[0].keys
                ]  # fmt: skip
            if len(readings) != 1:
                if readings or kind != "none":
                    log.warning("layout upgrade: %d readings of a %s key; left as it is",
                                len(readings), kind)  # fmt: skip
                continue
            if await self.client.renamenx(key, key_of(readings[0])):
                renamed += 1
            else:
                log.warning("layout upgrade: a key's new name is taken; left as it is")
        if renamed:
            log.info("layout upgrade: renamed %d keys of ids holding ':' or '%%'", renamed)
        return renamed

    async def _current(self, key: str) -> bool:
        """Whether `key` is named as this layout names it (or the same in both). A session
        step's record name is this layout's only while its session is there: without it,
        it is a 0.1.0 client's request id holding a '#'."""
        parsed = parse(key)
        if parsed is None or key_of(parsed) != key:
            return False
        return not parsed.session_step or await self._has_session(parsed)

    async def _has_session(self, step: ParsedKey) -> bool:
        """Whether the session of a step's record is there, under its name in this layout
        or in 0.1.0's (the upgrade may not have renamed it yet)."""
        session = ParsedKey(step.keys, SESSION_KIND, step.id.rpartition("#")[0])
        return bool(await self.client.exists(key_of(session), legacy_key(session)))

    async def account_seqs(self) -> dict[tuple[str, str], int]:
        """Every account in Redis and its event sequence number (SCAN, for audits)."""
        found: dict[tuple[str, str], int] = {}
        async with reachable():
            async for key in self.client.scan_iter(match=ACCOUNT_SCAN_PATTERN, count=1000):
                # The pattern also matches a request's record whose id ends in ":a":
                # only the layout can tell the two apart.
                parsed = parse(key)
                if parsed is None or parsed.kind != ACCOUNT_KIND:
                    continue
                seq = await self.client.hget(key, "seq")
                found[(parsed.keys.tenant, parsed.keys.account)] = int(seq or 0)
        return found

    async def due_accounts(self, now_ms: int, limit: int = EXPIRY_SWEEP_BATCH) -> list[AccountKeys]:
        """Accounts with a lot expiring at or before `now_ms`, from every bucket's index."""
        async with reachable(), self.client.pipeline(transaction=False) as pipe:
            for bucket in range(buckets()):
                pipe.zrangebyscore(due_key(bucket), "-inf", now_ms, start=0, num=limit)
            results: list[list[str]] = await pipe.execute()
        due: list[AccountKeys] = []
        for members in results:
            for member in members:
                tenant, _, account = member.partition(":")
                due.append(AccountKeys(tenant, account))
        return due

    async def snapshot(self, keys: AccountKeys) -> AccountSnapshot:
        """Read an account's figures and lots (one HGETALL of its hash: atomic)."""
        start = time.perf_counter()
        try:
            async with reachable():
                stored = cast(dict[str, str], await self.client.hgetall(keys.account_key))
        finally:
            metrics.redis_duration("snapshot").observe(time.perf_counter() - start)
        fields: dict[str, str] = {}
        remaining: dict[str, str] = {}  # burn key -> remaining
        metas: dict[str, str] = {}
        for name, value in stored.items():
            prefix = name[:2]
            if prefix == LOT_REMAINING:
                remaining[name[2:]] = value
            elif prefix == LOT_META:
                metas[name[2:]] = value
            elif name != NEXT_EXPIRY:
                fields[name] = value
        lots = [
            _lot_record(burn_key, int(remaining[burn_key]), metas)
            for burn_key in sorted(remaining)
        ]
        return AccountSnapshot(exists=bool(fields), fields=fields, lots=lots)
