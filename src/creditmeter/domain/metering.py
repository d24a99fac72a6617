"""The metering service: validates requests, applies the rules, and drives the store.

Every mutating operation validates first (nothing reaches Redis on bad input), derives a
fingerprint of its parameters for idempotency, and makes exactly one script call.

The ledger half of each change is not here: the script appends it to its bucket's outbox,
and the flusher (storage/ledger/flusher.py) writes it to the ledger afterwards; the map of
both paths is in the package docstring (creditmeter/__init__.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from creditmeter import metrics
from creditmeter.constants import (
    DEFAULT_BILLING_INCREMENT_S,
    DEFAULT_PRIORITY,
    MAX_BILLING_INCREMENT_S,
    MAX_CONSUME_BATCH,
    MAX_CREDITS,
    MAX_EXPIRY_MS,
    MAX_PRIORITY,
    METER_MAX_BATCH,
)
from creditmeter.domain import balances
from creditmeter.domain.backpressure import Backpressure
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint, new_id
from creditmeter.domain.limits import (
    LimitPeriod,
    Limits,
    LimitStatus,
    LimitUnit,
    UsageLimit,
    applying,
    check_limit,
    check_time_zone,
    period_bounds,
    status,
)
from creditmeter.domain.lots import Lot, LotSource, burn_key
from creditmeter.domain.rates import Rate, RateBook, RateUnit, is_builtin
from creditmeter.domain.staging import (
    Operation,
    OperationKind,
    apply_staged,
    staged_grant,
)
from creditmeter.domain.validation import Violations
from creditmeter.errors import (
    CreditError,
    InsufficientCredits,
    InvalidRequest,
    Rejected,
    applied,
    from_rejection,
)
from creditmeter.storage.coalescer import Coalescer
from creditmeter.storage.config_store import ConfigStore, LimitRow, RateRow
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import Staging
from creditmeter.storage.redis_store import (
    Call,
    CheckCall,
    CheckRecord,
    ConsumeCall,
    ConsumeRecord,
    GrantRecord,
    NewLot,
    RedisStore,
    SetBalanceRecord,
)

T = TypeVar("T")
#: A consume or a check: what `_again` gives new limit args.
Charge = TypeVar("Charge", ConsumeCall, CheckCall)


@dataclass(frozen=True)
class GrantResult:
    lot: Lot
    #: Spendable afterwards (see creditmeter.domain.balances), as every balance below.
    balance: int


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    transaction_id: str
    amount: int
    units: int
    feature: str
    charges: list[tuple[str, int]]
    balance: int
    time_ms: int


@dataclass(frozen=True, slots=True)
class ConsumeItem:
    """One consumption of a batch or stream: the parameters of `Metering.consume`."""

    account_id: str
    feature: str
    request_id: str
    quantity: int | None = None
    amount: int | None = None


def _counted(c: ConsumeCall, record: ConsumeRecord) -> ConsumeResult:
    """The result of a charge, counted in the metrics unless it is a replay (a replay
    answers with the first call's transaction: its credits were counted then)."""
    if record.txn == c.call.txn:
        metrics.record_consume(record.feature, record.amount, record.units)
    return ConsumeResult(
        transaction_id=record.txn,
        amount=record.amount,
        units=record.units,
        feature=record.feature,
        charges=record.charges,
        balance=balances.after(record.holdings),
        time_ms=record.time_ms,
    )


@dataclass(frozen=True, slots=True)
class CheckItem:
    """One check of a batch: the parameters of `Metering.check`."""

    account_id: str
    feature: str
    quantity: int | None = None
    amount: int | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a Consume of the same item would decide now, nothing changed."""

    allowed: bool
    #: Credits it would cost at the tenant's rate (or the explicit amount).
    amount: int
    #: Units it would charge (messages, or billing increments of a time feature).
    units: int
    feature: str
    #: Spendable now (see creditmeter.domain.balances), expired credit left out.
    balance: int
    #: The error Consume would fail with (None when allowed).
    denial: CreditError | None = None


def _checked(c: CheckCall, feature: str, units: int, record: CheckRecord) -> CheckResult:
    denial = None if record.refusal is None else from_rejection(record.refusal)
    return CheckResult(
        allowed=denial is None,
        amount=c.amount,
        units=units,
        feature=feature,
        balance=balances.after(record.holdings),
        denial=denial,
    )


@dataclass(frozen=True)
class SetBalanceResult:
    balance: int
    removed: int
    lot: Lot | None


@dataclass(frozen=True)
class BalanceView:
    #: Spendable: the live lots' remaining credit less what open sessions hold.
    balance: int
    lots: list[Lot]
    unlimited: bool
    #: Credit held by open call sessions.
    reserved: int = 0
    #: Credits charged past the lots on the credit line, not yet repaid.
    debt: int = 0
    #: How far past its lots the account may be charged (0: no credit line).
    overdraft_limit: int = 0


@dataclass(frozen=True)
class FeatureUsage:
    feature: str
    credits: int
    units: int


@dataclass(frozen=True)
class UsageView:
    total: int
    used: int
    remaining: int
    expired: int
    removed: int
    refunded: int
    unlimited: bool
    features: list[FeatureUsage]
    #: The usage limits that apply to the account, with what it used of each.
    limits: list[LimitStatus] = field(default_factory=list)
    #: The credit line: its debt and overdraft limit, as in BalanceView.
    debt: int = 0
    overdraft_limit: int = 0


@dataclass(frozen=True)
class AccountOptions:
    unlimited: bool
    #: The time zone of its usage limits' periods ('' = UTC).
    time_zone: str
    ignore_usage_limits: bool
    #: How far past its lots the account may be charged (0: no credit line).
    overdraft_limit: int = 0
    #: Its debt on the credit line now.
    debt: int = 0


def _limit_statuses(
    limits: Limits, tenant: str, account: balances.AccountRead, now_ms: int
) -> list[LimitStatus]:
    """The limits that apply to an account now (its own win over the tenant's), each with
    its usage in the current period of the account's time zone."""
    snap = account.snap
    found = applying(limits.book.of(tenant), snap.own_limits, snap.exempt)
    bounds = period_bounds(snap.time_zone, now_ms)
    counters = snap.counters
    return [
        status(limit, own, counters.get((limit.feature, str(limit.period))), bounds)
        for limit, own in found
    ]


class Metering:
    """The Credits service's rules, independent of gRPC."""

    def __init__(
        self,
        store: RedisStore,
        config: ConfigStore,
        rates: RateBook,
        clock: Clock,
        ledger: Staging | None = None,
        gate: Backpressure | None = None,
        limits: Limits | None = None,
    ):
        self.idempotency_ttl_s = store.idempotency_ttl_s
        #: The tenants' usage limits, and the limit args of each script call.
        self.limits = limits or Limits()
        self.store = store
        #: Money-in is staged here before it reaches Redis (None: no ledger, unit tests).
        self.ledger = ledger
        self.gate = gate or Backpressure()
        self.config = config
        self.rates = rates
        self.clock = clock

    def make_call(self, prefix: str, request_id: str, operation: str, **params: object) -> Call:
        """A script call: now, a new transaction id, the request id and its fingerprint."""
        return self._call(prefix, request_id, operation, **params)

    def _call(self, prefix: str, request_id: str, operation: str, **params: object) -> Call:
        now = self.clock.now_ms()
        return Call(
            now_ms=now,
            txn=new_id(prefix, now),
            request_id=request_id,
            fingerprint=fingerprint(operation, params),
        )

    @staticmethod
    def _new_lot(
        now_ms: int,
        amount: int,
        priority: int,
        expires_at_ms: int | None,
        source: LotSource,
        reference: str,
    ) -> NewLot:
        lot_id = new_id("lot", now_ms)
        return NewLot(
            lot_id=lot_id,
            amount=amount,
            priority=priority,
            expires_at_ms=expires_at_ms,
            source=str(source),
            reference=reference,
            burn_key=burn_key(priority, expires_at_ms, source, now_ms, lot_id),
        )

    # --- Grant -----------------------------------------------------------------------
    async def grant(
        self,
        tenant: str,
        account_id: str,
        amount: int,
        *,
        request_id: str,
        expires_at_ms: int | None = None,
        valid_for_ms: int | None = None,
        priority: int | None = None,
        source: LotSource = LotSource.MANUAL,
        reference: str = "",
        violations: Violations | None = None,
    ) -> GrantResult:
        """Add a lot of credits to an account (`violations`: what the caller already found
        wrong with the request, reported with the rest)."""
        v = Violations(violations)
        v.account_id(account_id)
        v.credits(amount, "amount")
        v.request_id(request_id)
        v.reference(reference)
        if priority is not None and not 0 <= priority <= MAX_PRIORITY:
            v.add("priority", f"must be between 0 and {MAX_PRIORITY}")
        now = self.clock.now_ms()
        if expires_at_ms is not None:
            if expires_at_ms <= now:
                v.add("expires_at", "must be in the future")
            elif expires_at_ms > MAX_EXPIRY_MS:
                v.add("expires_at", "must be before the year 2286")
        if valid_for_ms is not None:
            if valid_for_ms <= 0:
                v.add("valid_for", "must be at least 1 ms")
            elif now + valid_for_ms > MAX_EXPIRY_MS:
                v.add("valid_for", "must end before the year 2286")
        v.raise_if_any()
        self.gate.check()

        call = self._call(
            "txn",
            request_id,
            "Grant",
            account_id=account_id,
            amount=amount,
            expires_at_ms=expires_at_ms,
            valid_for_ms=valid_for_ms,
            priority=priority,
            source=str(source),
            reference=reference,
        )
        if valid_for_ms is not None:
            expires_at_ms = call.now_ms + valid_for_ms
        lot = self._new_lot(
            call.now_ms,
            amount,
            DEFAULT_PRIORITY if priority is None else priority,
            expires_at_ms,
            source,
            reference,
        )
        keys = AccountKeys(tenant, account_id)
        if self.ledger is None:
            record = await applied(self.store.grant(keys, call, lot))
        else:
            grant = staged_grant(keys, call, lot, Operation.grant())
            staged = await applied(self.ledger.stage_grant(grant))
            made = await apply_staged(self.store, self.ledger, staged, call.now_ms)
            assert isinstance(made, GrantRecord)
            record = made
        return GrantResult(lot=Lot.from_record(record.lot), balance=balances.after(record.holdings))

    # --- Consume ---------------------------------------------------------------------
    def price(
        self, tenant: str, feature: str, quantity: int | None, amount: int | None, v: Violations
    ) -> tuple[int, int]:
        """The (credits, units) a consumption costs at the tenant's rate; adds violations."""
        v.feature(feature)
        units = 0
        qty = 1 if quantity is None else quantity
        if qty < 1:
            v.add("quantity", "must be positive")
        elif qty > MAX_CREDITS:
            v.add("quantity", "must be at most 2^53-1")
        if amount is not None:
            v.credits(amount, "amount")
        rate = self.rates.get(tenant, feature) if not v.items else None
        if rate is None:
            if not v.items:
                v.add("feature", f"unknown feature {feature!r}: set a rate for it first")
            return 0, 0
        units = rate.units(qty)
        credits = amount if amount is not None else units * rate.credits_per_unit
        if credits > MAX_CREDITS:
            v.add("quantity", "the charge would exceed 2^53-1 credits")
        return credits, units

    def _consume_call(
        self,
        tenant: str,
        account_id: str,
        feature: str,
        request_id: str,
        quantity: int | None,
        amount: int | None,
    ) -> ConsumeCall:
        """Validate and price one consumption; raises InvalidRequest."""
        v = Violations()
        v.account_id(account_id)
        v.request_id(request_id)
        credits, units = self.price(tenant, feature, quantity, amount, v)
        v.raise_if_any()
        call = self._call(
            "txn",
            request_id,
            "Consume",
            account_id=account_id,
            feature=feature,
            quantity=quantity,
            amount=amount,
        )
        limits = self.limits.args(tenant, account_id, feature, call.now_ms)
        return ConsumeCall(AccountKeys(tenant, account_id), call, credits, feature, units, limits)

    def _refused(self, c: ConsumeCall, rejected: Rejected) -> CreditError:
        error = from_rejection(rejected)
        if isinstance(error, InsufficientCredits):
            metrics.record_insufficient(c.feature)
        return error

    def _again(self, c: Charge, now_ms: int) -> Charge:
        """The consume or check with limit args in the account's time zone, just learned
        (nothing of it ran: the script refused before any write)."""
        keys = c.keys
        return replace(c, limits=self.limits.args(keys.tenant, keys.account, c.feature, now_ms))

    async def consume(
        self,
        tenant: str,
        account_id: str,
        feature: str,
        *,
        request_id: str,
        quantity: int | None = None,
        amount: int | None = None,
    ) -> ConsumeResult:
        """Charge an account, all or nothing."""
        # The unary hot path: the store is awaited directly (no `_applied` wrapper, no
        # ConsumeItem), the refusal turned into its domain error here.
        c = self._consume_call(tenant, account_id, feature, request_id, quantity, amount)
        self.gate.check()
        store = self.store
        try:
            try:
                record = await store.consume(c.keys, c.call, c.amount, c.feature, c.units, c.limits)
            except Rejected as rejected:
                if not self.limits.learned(tenant, account_id, rejected):
                    raise
                c = self._again(c, c.call.now_ms)
                record = await store.consume(c.keys, c.call, c.amount, c.feature, c.units, c.limits)
        except Rejected as rejected:
            raise self._refused(c, rejected) from None
        return _counted(c, record)

    async def consume_many(
        self, tenant: str, items: Sequence[ConsumeItem]
    ) -> list[ConsumeResult | CreditError]:
        """Charge each item as `consume` would, in order; each its own result or error.

        The batch as a whole is refused (raises) only when it is empty or too large, when
        the ledger backlog gate is closed, or when Redis is unreachable. Valid items go
        to Redis in one pipeline, in order, so a repeated request id later in the batch
        replays the earlier item as a retried `consume` would.
        """
        if not 1 <= len(items) <= MAX_CONSUME_BATCH:
            raise InvalidRequest([("items", f"must hold 1 to {MAX_CONSUME_BATCH} items")])
        self.gate.check()
        outcomes: list[ConsumeResult | CreditError | None] = []
        calls: list[ConsumeCall] = []
        for item in items:
            try:
                call = self._consume_call(
                    tenant, item.account_id, item.feature, item.request_id, item.quantity,
                    item.amount,
                )  # fmt: skip
                calls.append(call)
                outcomes.append(None)  # filled in from the store's reply below
            except InvalidRequest as invalid:
                outcomes.append(invalid)
        records = await self.store.consume_many(calls) if calls else []
        # Charges of accounts found in another time zone than assumed: made again, in
        # their order, with limit args in the account's zone (nothing of them ran).
        again = [
            i
            for i, (c, r) in enumerate(zip(calls, records, strict=True))
            if isinstance(r, Rejected) and self.limits.learned(c.keys.tenant, c.keys.account, r)
        ]
        if again:
            retried = [self._again(calls[i], calls[i].call.now_ms) for i in again]
            for i, c, r in zip(again, retried, await self.store.consume_many(retried), strict=True):
                calls[i], records[i] = c, r
        replies = zip(calls, records, strict=True)
        results: list[ConsumeResult | CreditError] = []
        for outcome in outcomes:
            if outcome is not None:
                results.append(outcome)
                continue
            c, reply = next(replies)
            if isinstance(reply, Rejected):
                results.append(self._refused(c, reply))
            elif isinstance(reply, Exception):
                raise reply  # a script failure, not a refusal: a bug, as for `consume`
            else:
                results.append(_counted(c, reply))
        return results

    # --- Check -----------------------------------------------------------------------
    def _check_call(
        self, tenant: str, account_id: str, feature: str, quantity: int | None,
        amount: int | None,
    ) -> tuple[CheckCall, int]:  # fmt: skip
        """Validate and price one check as `_consume_call` does a consumption (the same
        violations, but no request id: a check changes nothing); raises InvalidRequest."""
        v = Violations()
        v.account_id(account_id)
        credits, units = self.price(tenant, feature, quantity, amount, v)
        v.raise_if_any()
        now = self.clock.now_ms()
        limits = self.limits.args(tenant, account_id, feature, now)
        keys = AccountKeys(tenant, account_id)
        return CheckCall(keys, credits, now, feature, units, limits), units

    def _wrong_zone(self, c: CheckCall, record: CheckRecord | Exception) -> bool:
        return (
            not isinstance(record, Exception)
            and record.refusal is not None
            and self.limits.learned(c.keys.tenant, c.keys.account, record.refusal)
        )

    async def check(
        self,
        tenant: str,
        account_id: str,
        feature: str,
        *,
        quantity: int | None = None,
        amount: int | None = None,
    ) -> CheckResult:
        """What `consume` of the same item would decide now: allowed, its price, the
        spendable balance, and the refusal it would answer. Changes nothing; the ledger
        backlog gate is not consulted (it refuses changes, and a check is none)."""
        c, units = self._check_call(tenant, account_id, feature, quantity, amount)
        record = await self.store.check(c)
        if self._wrong_zone(c, record):
            c = self._again(c, c.now_ms)
            record = await self.store.check(c)
        return _checked(c, feature, units, record)

    async def check_many(
        self, tenant: str, items: Sequence[CheckItem]
    ) -> list[CheckResult | CreditError]:
        """Check each item as `check` would; an invalid item gets its InvalidRequest.

        The batch as a whole is refused (raises) only when it is empty or too large (the
        limits of ConsumeBatch), or when Redis is unreachable. Valid items go to Redis in
        one round trip; each is judged on its own against the current state (none is
        spent, so two items of one account do not add up).
        """
        if not 1 <= len(items) <= MAX_CONSUME_BATCH:
            raise InvalidRequest([("items", f"must hold 1 to {MAX_CONSUME_BATCH} items")])
        outcomes: list[CreditError | None] = []
        calls: list[tuple[CheckCall, str, int]] = []
        for item in items:
            try:
                call, units = self._check_call(
                    tenant, item.account_id, item.feature, item.quantity, item.amount
                )
                calls.append((call, item.feature, units))
                outcomes.append(None)  # filled in from the store's reply below
            except InvalidRequest as invalid:
                outcomes.append(invalid)
        checks = [c for c, _, _ in calls]
        records = await self.store.check_many(checks) if calls else []
        again = [i for i, c in enumerate(checks) if self._wrong_zone(c, records[i])]
        if again:
            retried = [self._again(checks[i], checks[i].now_ms) for i in again]
            for i, r in zip(again, await self.store.check_many(retried), strict=True):
                records[i] = r
        replies = zip(calls, records, strict=True)
        results: list[CheckResult | CreditError] = []
        for outcome in outcomes:
            if outcome is not None:
                results.append(outcome)
                continue
            (c, feature, units), record = next(replies)
            if isinstance(record, Exception):
                raise record  # a script failure: a bug, as for `check`
            results.append(_checked(c, feature, units, record))
        return results

    # --- SetBalance ------------------------------------------------------------------
    async def set_balance(
        self,
        tenant: str,
        account_id: str,
        amount: int,
        *,
        reset: bool,
        request_id: str,
        reference: str = "",
    ) -> SetBalanceResult:
        """Add credits, or with reset remove all credit first and set the balance."""
        v = Violations()
        v.account_id(account_id)
        v.credits(amount, "amount", allow_zero=reset)
        v.request_id(request_id)
        v.reference(reference)
        v.raise_if_any()
        self.gate.check()
        call = self._call(
            "txn",
            request_id,
            "SetBalance",
            account_id=account_id,
            amount=amount,
            reset=reset,
            reference=reference,
        )
        lot = self._new_lot(
            call.now_ms, amount, DEFAULT_PRIORITY, None, LotSource.MANUAL, reference
        )
        keys = AccountKeys(tenant, account_id)
        if self.ledger is not None and amount > 0:  # money in: ledger first
            operation = Operation(OperationKind.RESET if reset else OperationKind.ADD)
            staged = await applied(
                self.ledger.stage_grant(staged_grant(keys, call, lot, operation))
            )
            record = await apply_staged(self.store, self.ledger, staged, call.now_ms)
        else:
            record = await applied(self.store.set_balance(keys, call, reset, lot))
        assert isinstance(record, SetBalanceRecord)
        return SetBalanceResult(
            balance=balances.after(record.holdings),
            removed=record.removed,
            lot=Lot.from_record(record.lot) if record.lot else None,
        )

    # --- SetAccountOptions -----------------------------------------------------------
    async def set_account_options(
        self,
        tenant: str,
        account_id: str,
        *,
        request_id: str,
        unlimited: bool | None,
        time_zone: str | None = None,
        ignore_usage_limits: bool | None = None,
        overdraft_limit: int | None = None,
    ) -> AccountOptions:
        """Change account options (None leaves one as it is); returns them afterwards.
        `time_zone` (an IANA name, '' for UTC) places the periods of its usage limits;
        `overdraft_limit` (credits, 0 for none) is how far past its lots Consume and call
        sessions may charge the account (see creditmeter.domain.balances)."""
        v = Violations()
        v.account_id(account_id)
        v.request_id(request_id)
        if time_zone is not None:
            time_zone = check_time_zone(time_zone, v)
        if overdraft_limit is not None:
            v.credits(overdraft_limit, "overdraft_limit", allow_zero=True)
        v.raise_if_any()
        self.gate.check()
        params: dict[str, object] = {"account_id": account_id, "unlimited": unlimited}
        if time_zone is not None or ignore_usage_limits is not None:
            # Only then: the fingerprint of a call without them stays that of 0.2.0.
            params.update(time_zone=time_zone, ignore_usage_limits=ignore_usage_limits)
        if overdraft_limit is not None:
            # Likewise: a call without it keeps the fingerprint of the release before.
            params.update(overdraft_limit=overdraft_limit)
        call = self._call("txn", request_id, "SetAccountOptions", **params)
        keys = AccountKeys(tenant, account_id)
        record = await applied(
            self.store.set_options(
                keys, call, unlimited, time_zone, ignore_usage_limits, overdraft_limit
            )
        )
        self.limits.learn(tenant, account_id, record.time_zone)
        return AccountOptions(
            record.unlimited, record.time_zone, record.exempt, record.overdraft_limit, record.debt
        )

    # --- usage limits ------------------------------------------------------------------
    async def set_usage_limit(
        self,
        tenant: str,
        account_id: str,
        feature: str,
        period: LimitPeriod | None,
        limit: int | None,
        unit: LimitUnit | None,
        *,
        request_id: str,
        violations: Violations | None = None,
    ) -> UsageLimit | None:
        """Set the tenant's limit on (feature, period) -- or with an account id the
        account's own, which wins over the tenant's -- or with `limit` None remove it.
        Returns the limit as stored (None once removed). `unit` defaults to units."""
        v = Violations(violations)
        if account_id:
            v.account_id(account_id)
        v.request_id(request_id)
        check_limit(feature, period, limit, v, "limit")
        if feature and not v.items and self.rates.get(tenant, feature) is None:
            v.add("limit.feature", f"unknown feature {feature!r}: set a rate for it first")
        v.raise_if_any()
        assert period is not None
        unit = unit or LimitUnit.UNITS
        params = {"account_id": account_id, "feature": feature, "period": str(period),
                  "limit": limit, "unit": str(unit)}  # fmt: skip
        if account_id:
            self.gate.check()
            call = self._call("txn", request_id, "SetUsageLimit", **params)
            keys = AccountKeys(tenant, account_id)
            await applied(self.store.set_limit(keys, call, feature, str(period), limit, str(unit)))
            return None if limit is None else UsageLimit(feature, period, limit, unit)
        now = self.clock.now_ms()
        row = None
        if limit is not None:
            row = LimitRow(tenant, feature, str(period), limit, str(unit), now)
        fp = fingerprint("SetUsageLimit", params)
        req = ConfigStore.Request(tenant, request_id, fp, now, self.idempotency_ttl_s * 1000)
        stored, replayed = await applied(
            asyncio.to_thread(self.config.set_usage_limit, tenant, feature, str(period), row, req)
        )
        if limit is None:
            if not replayed:
                self.limits.book.remove(tenant, feature, period)
            return None
        result = UsageLimit(feature, period, limit, unit, int(stored))
        if not replayed:
            self.limits.book.put(tenant, result)
        return result

    async def usage_limits(self, tenant: str, account_id: str) -> list[LimitStatus]:
        """The tenant's limits (account id empty: nothing counted) or those that apply to
        an account now, its own winning over the tenant's, with what it used of each in
        the current period; none for an exempt account."""
        if not account_id:
            now = self.clock.now_ms()
            bounds = period_bounds("", now)
            return [status(limit, False, None, bounds) for limit in self.limits.book.of(tenant)]
        return _limit_statuses(
            self.limits, tenant, await self._read(tenant, account_id), self.clock.now_ms()
        )

    # --- reads -------------------------------------------------------------------------
    async def _read(self, tenant: str, account_id: str) -> balances.AccountRead:
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        return await balances.read(
            self.store, AccountKeys(tenant, account_id), self.clock.now_ms()
        )

    async def get_balance(self, tenant: str, account_id: str) -> BalanceView:
        """The spendable balance and the live lots in burn-down order."""
        account = await self._read(tenant, account_id)
        return BalanceView(
            balance=account.balance,
            lots=account.lots,
            unlimited=account.unlimited,
            reserved=account.reserved,
            debt=account.debt,
            overdraft_limit=account.overdraft_limit,
        )

    async def get_usage(self, tenant: str, account_id: str) -> UsageView:
        """Totals granted, used and remaining (spendable, as GetBalance's balance), overall
        and per feature."""
        account = await self._read(tenant, account_id)
        t, unlimited = account.snap.totals, account.unlimited
        return UsageView(
            limits=_limit_statuses(self.limits, tenant, account, self.clock.now_ms()),
            total=balances.UNLIMITED if unlimited else t.granted,
            used=t.used,
            remaining=account.balance,
            expired=t.expired,
            removed=t.removed,
            refunded=t.refunded,
            unlimited=unlimited,
            features=[FeatureUsage(f, used, units) for f, (used, units) in t.features.items()],
            debt=account.debt,
            overdraft_limit=account.overdraft_limit,
        )

    # --- rates -------------------------------------------------------------------------
    async def set_rate(
        self,
        tenant: str,
        feature: str,
        credits_per_unit: int,
        *,
        request_id: str,
        unit: RateUnit | None = None,
        billing_increment_s: int | None = None,
        violations: Violations | None = None,
    ) -> Rate:
        """Create or replace the price of a feature."""
        v = Violations(violations)
        v.feature(feature, "rate.feature")
        v.credits(credits_per_unit, "rate.credits_per_unit")
        v.request_id(request_id)
        current = self.rates.get(tenant, feature) if not v.items else None
        if unit is None:
            unit = current.unit if current else RateUnit.COUNT
        elif current and current.builtin and unit is not current.unit:
            v.add("rate.unit", f"built-in feature {feature!r} is counted by {current.unit}")
        if unit is RateUnit.TIME:
            if billing_increment_s is None:
                billing_increment_s = (
                    current.billing_increment_s
                    if current and current.unit is RateUnit.TIME
                    else DEFAULT_BILLING_INCREMENT_S
                )
            if not 1 <= billing_increment_s <= MAX_BILLING_INCREMENT_S:
                v.add("rate.billing_increment", "must be whole seconds from 1 s to 24 h")
        elif billing_increment_s is not None:
            v.add("rate.billing_increment", "only time features have a billing increment")
        v.raise_if_any()

        now = self.clock.now_ms()
        increment = billing_increment_s if unit is RateUnit.TIME else 0
        assert increment is not None
        rate = Rate(feature, credits_per_unit, unit, increment, is_builtin(feature), now)
        fp = fingerprint(
            "SetRate",
            {
                "feature": feature,
                "credits_per_unit": credits_per_unit,
                "unit": str(unit),
                "billing_increment_s": billing_increment_s,
            },
        )
        row = RateRow(tenant, feature, credits_per_unit, str(unit), increment, now)
        req = ConfigStore.Request(tenant, request_id, fp, now, self.idempotency_ttl_s * 1000)
        stored, replayed = await applied(asyncio.to_thread(self.config.set_rate, row, req))
        rate = Rate(feature, credits_per_unit, unit, increment, rate.builtin, int(stored))
        if not replayed:
            self.rates.put(tenant, rate)
        return rate

    def list_rates(self, tenant: str) -> list[Rate]:
        """The tenant's rate card, by feature name."""
        return sorted(self.rates.card(tenant).values(), key=lambda r: r.feature)

    # --- expiry sweeper --------------------------------------------------------------
    async def sweep_due(self) -> int:
        """Record the expiry of every lot whose time has come; returns lots expired."""
        now = self.clock.now_ms()
        expired = 0
        for keys in await self.store.due_accounts(now):
            call = Call(now_ms=now, txn=new_id("exp", now))
            expired += await self.store.sweep(keys, call, self.limits.recharges.arg(keys.tenant))
        return expired

    def meter_stream(self, tenant: str) -> MeterStream:
        """The charges of one Meter stream of the tenant."""
        return MeterStream(self, tenant)


class MeterStream:
    """The charges of one Meter stream: each item queued goes out with those queued while
    the stream's previous batch was in flight, as one `consume_many` (one round trip in
    flight at a time, at most METER_MAX_BATCH items: storage/coalescer.py).

    Each item's future gives its result or raises its CreditError. A refusal of a whole
    batch (ledger backlog, Redis away) is raised by each of its items' futures: the stream
    goes on, as separate Consume calls would each have failed and later ones may succeed.
    """

    def __init__(self, metering: Metering, tenant: str) -> None:
        self._charges: Coalescer[ConsumeItem, ConsumeResult] = Coalescer(
            lambda items: metering.consume_many(tenant, items), METER_MAX_BATCH
        )

    def enqueue(self, item: ConsumeItem) -> asyncio.Future[ConsumeResult]:
        """Queue a charge; the future of its outcome (cancelling it before its batch
        leaves drops the charge)."""
        return self._charges.enqueue(item)
