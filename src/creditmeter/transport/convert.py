"""Protobuf <-> domain conversions shared by the servicers and the CLI."""

from __future__ import annotations

from google.protobuf import duration_pb2, timestamp_pb2

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.alerts import Alert, AlertKind
from creditmeter.domain.limits import LimitPeriod, LimitStatus, LimitUnit, UsageLimit
from creditmeter.domain.lots import Lot, LotSource
from creditmeter.domain.metering import CheckItem, CheckResult, ConsumeItem, ConsumeResult
from creditmeter.domain.model import Transaction
from creditmeter.domain.rates import Rate, RateUnit
from creditmeter.domain.recharge import Applying, recharge_pack
from creditmeter.domain.sessions import SessionView, TimeoutPolicy
from creditmeter.domain.validation import Violations
from creditmeter.errors import CreditError
from creditmeter.transport.enums import enum_name, enum_pb
from creditmeter.transport.interceptors import describe

_MAX_TIMESTAMP_S = 253_402_300_799  # 9999-12-31T23:59:59Z, the Timestamp spec's limit
_MAX_DURATION_S = 315_576_000_000  # 10,000 years, the Duration spec's limit


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def timestamp_ms(ts: timestamp_pb2.Timestamp, field: str, v: Violations) -> int | None:
    """The timestamp in ms; None (and a violation) when it is not a valid one."""
    if not 0 <= ts.seconds <= _MAX_TIMESTAMP_S or not 0 <= ts.nanos <= 999_999_999:
        v.add(field, "not a valid timestamp (1970 to 9999, nanos 0-999999999)")
        return None
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def duration_ms(d: duration_pb2.Duration, field: str, v: Violations) -> int | None:
    """The duration in ms; None (and a violation) when it is not a valid one."""
    same_sign = d.seconds == 0 or d.nanos == 0 or (d.seconds > 0) == (d.nanos > 0)
    if abs(d.seconds) > _MAX_DURATION_S or abs(d.nanos) > 999_999_999 or not same_sign:
        v.add(field, "not a valid duration")
        return None
    return d.seconds * 1000 + int(d.nanos / 1_000_000)


def lot_source(value: int, v: Violations, field: str = "source") -> LotSource:
    name = enum_name(pb.LotSource, value, field, v)
    return LotSource.MANUAL if name is None else LotSource(name)


def lot_source_pb(source: LotSource) -> pb.LotSource.ValueType:
    return enum_pb(pb.LotSource, source)


def rate_unit(value: int, v: Violations, field: str = "rate.unit") -> RateUnit | None:
    name = enum_name(pb.RateUnit, value, field, v)
    return None if name is None else RateUnit(name)


def limit_period(value: int, v: Violations, field: str = "limit.period") -> LimitPeriod | None:
    name = enum_name(pb.UsageLimitPeriod, value, field, v)
    return None if name is None else LimitPeriod(name)


def limit_unit(value: int, v: Violations, field: str = "limit.unit") -> LimitUnit | None:
    name = enum_name(pb.UsageLimitUnit, value, field, v)
    return None if name is None else LimitUnit(name)


def usage_limit_pb(limit: UsageLimit) -> pb.UsageLimit:
    msg = pb.UsageLimit(
        feature=limit.feature,
        period=enum_pb(pb.UsageLimitPeriod, limit.period),
        limit=limit.limit,
        unit=enum_pb(pb.UsageLimitUnit, limit.unit),
    )
    if limit.updated_ms is not None:
        msg.update_time.CopyFrom(timestamp(limit.updated_ms))
    return msg


def recharge_applying_pb(
    a: Applying, into: pb.SetRechargePolicyResponse | pb.GetRechargePolicyResponse
) -> None:
    """What applies of a recharge policy, into either response (the same fields)."""
    if a.policy is not None:
        into.policy.threshold = a.policy.threshold
        into.policy.pack_id = a.policy.pack_id
        if a.policy.updated_ms is not None:
            into.policy.update_time.CopyFrom(timestamp(a.policy.updated_ms))
    into.account_override = a.account_override
    into.disabled = a.disabled


def limit_status_pb(s: LimitStatus) -> pb.UsageLimitStatus:
    return pb.UsageLimitStatus(
        limit=usage_limit_pb(s.limit),
        account_override=s.own,
        used=s.used,
        reserved=s.reserved,
        remaining=max(0, s.limit.limit - s.used - s.reserved),
        period_start=timestamp(s.period_start_ms),
        period_end=timestamp(s.period_end_ms),
    )


def lot_pb(lot: Lot) -> pb.Lot:
    msg = pb.Lot(
        lot_id=lot.lot_id,
        amount=lot.amount,
        remaining=lot.remaining,
        priority=lot.priority,
        source=lot_source_pb(lot.source),
        create_time=timestamp(lot.created_ms),
        reference=lot.reference,
    )
    if lot.expires_at_ms is not None:
        msg.expires_at.CopyFrom(timestamp(lot.expires_at_ms))
    return msg


def rate_pb(rate: Rate) -> pb.Rate:
    msg = pb.Rate(
        feature=rate.feature,
        credits_per_unit=rate.credits_per_unit,
        unit=enum_pb(pb.RateUnit, rate.unit),
        builtin=rate.builtin,
    )
    if rate.unit is RateUnit.TIME:
        msg.billing_increment.FromSeconds(rate.billing_increment_s)
    if rate.updated_ms is not None:
        msg.update_time.CopyFrom(timestamp(rate.updated_ms))
    return msg


def transaction_kind(value: int, field: str, v: Violations) -> str | None:
    if value == pb.TRANSACTION_KIND_UNSPECIFIED:
        v.add(field, "must name a kind")
        return None
    return enum_name(pb.TransactionKind, value, field, v)


def transaction_pb(t: Transaction) -> pb.Transaction:
    return pb.Transaction(
        transaction_id=t.txn,
        kind=enum_pb(pb.TransactionKind, t.kind),
        account_id=t.account,
        create_time=timestamp(t.ts_ms),
        request_id=t.request_id,
        feature=t.feature,
        units=t.units,
        amount=t.amount,
        balance=-1 if t.balance is None else t.balance,
        lots=[pb.LotCharge(lot_id=lot, amount=amount) for lot, amount in t.lines],
        debt_incurred=t.debt_incurred,
        debt_repaid=t.debt_repaid,
        pack_id=recharge_pack(t.kind, t.reference),
    )


def timeout_policy(value: int, v: Violations, field: str = "timeout_policy") -> TimeoutPolicy:
    name = enum_name(pb.SessionTimeoutPolicy, value, field, v)
    return TimeoutPolicy.CHARGE_QUOTA if name is None else TimeoutPolicy(name)


def session_pb(s: SessionView) -> pb.Session:
    message = pb.Session(
        session_id=s.session_id,
        account_id=s.account_id,
        feature=s.feature,
        state=enum_pb(pb.SessionState, s.state),
        sequence=s.sequence,
        used_seconds=s.used_seconds,
        charged_units=s.charged_units,
        charged_amount=s.charged_amount,
        reserved_amount=s.reserved_amount,
        granted_seconds=s.granted_seconds,
        final_unit=s.final_unit,
        billing_increment_seconds=s.billing_increment_s,
        credits_per_unit=s.credits_per_unit,
        timeout_policy=pb.SessionTimeoutPolicy.Value(
            f"SESSION_TIMEOUT_POLICY_{s.timeout_policy.upper()}"
        ),
        start_time=timestamp(s.start_ms),
        valid_until=timestamp(s.valid_until_ms),
        uncollected_amount=s.uncollected_amount,
    )
    if s.end_ms is not None:
        message.end_time.CopyFrom(timestamp(s.end_ms))
    return message


_ALERT_KINDS = {
    AlertKind.LOW: pb.BALANCE_ALERT_KIND_LOW,
    AlertKind.DEPLETED: pb.BALANCE_ALERT_KIND_DEPLETED,
    AlertKind.TOPPED_UP: pb.BALANCE_ALERT_KIND_TOPPED_UP,
    AlertKind.OVERDRAFT_LIMIT_REACHED: pb.BALANCE_ALERT_KIND_OVERDRAFT_LIMIT_REACHED,
    AlertKind.RECHARGE_DUE: pb.BALANCE_ALERT_KIND_RECHARGE_DUE,
}


def alert_pb(alert: Alert) -> pb.WatchBalanceResponse:
    return pb.WatchBalanceResponse(
        kind=_ALERT_KINDS[alert.kind],
        account_id=alert.account,
        threshold=alert.threshold,
        previous_balance=alert.previous_balance,
        balance=alert.balance,
        transaction_id=alert.transaction_id,
        event_time=timestamp(alert.time_ms),
        resume_token=alert.resume_token,
        pack_id=alert.pack_id,
    )


def how_much(request: pb.ConsumeRequest | pb.CheckRequest) -> tuple[int | None, int | None]:
    """The quantity and the amount of a charge (None for the one it does not give)."""
    return (
        request.quantity if request.HasField("quantity") else None,
        request.amount if request.HasField("amount") else None,
    )


def consume_item(request: pb.ConsumeRequest) -> ConsumeItem:
    quantity, amount = how_much(request)
    return ConsumeItem(
        account_id=request.account_id, feature=request.feature, request_id=request.request_id,
        quantity=quantity, amount=amount,
    )  # fmt: skip


def consume_response_pb(result: ConsumeResult) -> pb.ConsumeResponse:
    # Submessages filled in place: the same message, built faster than from LotCharge
    # and Timestamp objects (a Timestamp's construction is the slow part).
    msg = pb.ConsumeResponse(
        transaction_id=result.transaction_id,
        amount=result.amount,
        units=result.units,
        feature=result.feature,
        balance=result.balance,
    )
    add = msg.charges.add
    for lot, amount in result.charges:
        add(lot_id=lot, amount=amount)
    ms = result.time_ms
    msg.consume_time.seconds, msg.consume_time.nanos = ms // 1000, (ms % 1000) * 1_000_000
    return msg


def consume_error_pb(error: CreditError) -> pb.ConsumeError:
    """What a failed call's status would carry, as one item's error (same mapping)."""
    parts = describe(error)
    violations: dict[str, str] = {}
    for field, why in parts.violations:
        # The proto's map holds one description per field: join a field's several.
        violations[field] = f"{violations[field]}; {why}" if field in violations else why
    return pb.ConsumeError(
        code=parts.rpc_code,
        reason=parts.reason,
        message=parts.message,
        metadata=parts.metadata,
        field_violations=violations,
    )


def consume_result_pb(request_id: str, outcome: ConsumeResult | CreditError) -> pb.ConsumeResult:
    if isinstance(outcome, CreditError):
        return pb.ConsumeResult(request_id=request_id, error=consume_error_pb(outcome))
    return pb.ConsumeResult(request_id=request_id, response=consume_response_pb(outcome))


def check_item(request: pb.CheckRequest) -> CheckItem:
    quantity, amount = how_much(request)
    return CheckItem(
        account_id=request.account_id, feature=request.feature, quantity=quantity, amount=amount
    )


def check_response_pb(result: CheckResult) -> pb.CheckResponse:
    msg = pb.CheckResponse(
        allowed=result.allowed,
        amount=result.amount,
        units=result.units,
        feature=result.feature,
        balance=result.balance,
    )
    if result.denial is not None:
        msg.denial.CopyFrom(consume_error_pb(result.denial))
    return msg


def check_result_pb(outcome: CheckResult | CreditError) -> pb.CheckResult:
    if isinstance(outcome, CreditError):
        return pb.CheckResult(error=consume_error_pb(outcome))
    return pb.CheckResult(response=check_response_pb(outcome))
