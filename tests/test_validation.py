"""Invalid requests are refused with INVALID_ARGUMENT, name the offending field, and change
nothing; reused request ids are refused per account (per tenant for SetRate)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.storage.entries import header as entry_header
from creditmeter.storage.layout import bucket_of, outbox_key
from tests.conftest import Tenant, rid
from tests.helpers import Failure, fails

MAX = 2**53 - 1
ACCOUNT = "acct-1"
OTHER_ACCOUNT = "acct-2"
SEED = 1_000
SEED_USED = 3
YEAR_3000_S = 32_503_680_000
AFTER_9999_S = 253_402_300_800  # 10000-01-01T00:00:00Z


# --- request builders ---------------------------------------------------------------------
def grant(**fields: Any) -> pb.GrantRequest:
    return pb.GrantRequest(**{"account_id": ACCOUNT, "amount": 10, "request_id": rid(), **fields})


def consume(**fields: Any) -> pb.ConsumeRequest:
    return pb.ConsumeRequest(
        **{"account_id": ACCOUNT, "feature": "text", "request_id": rid(), **fields}
    )


def set_balance(**fields: Any) -> pb.SetBalanceRequest:
    return pb.SetBalanceRequest(
        **{"account_id": ACCOUNT, "amount": 10, "request_id": rid(), **fields}
    )


def set_options(**fields: Any) -> pb.SetAccountOptionsRequest:
    return pb.SetAccountOptionsRequest(
        **{"account_id": ACCOUNT, "unlimited": True, "request_id": rid(), **fields}
    )


def set_limit(
    account_id: str = ACCOUNT, request_id: str | None = None, **limit: Any
) -> pb.SetUsageLimitRequest:
    fields = {"feature": "text", "period": pb.USAGE_LIMIT_PERIOD_DAY, "limit": 5, **limit}
    return pb.SetUsageLimitRequest(
        account_id=account_id,
        limit=pb.UsageLimit(**fields),
        request_id=rid() if request_id is None else request_id,
    )


def set_rate(request_id: str | None = None, **rate: Any) -> pb.SetRateRequest:
    return pb.SetRateRequest(
        rate=pb.Rate(**{"feature": "sms", "credits_per_unit": 2, **rate}),
        request_id=rid() if request_id is None else request_id,
    )


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def dur(seconds: int, nanos: int = 0) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


async def set_price(tenant: Tenant, feature: str, credits_per_unit: int) -> None:
    r = await tenant.admin.SetRate(set_rate(feature=feature, credits_per_unit=credits_per_unit))
    assert r.rate.credits_per_unit == credits_per_unit


@dataclass(frozen=True)
class Bad:
    method: str
    #: Builds the request from the server clock's now (ms).
    build: Callable[[int], Message]
    #: The field the BadRequest must name.
    field: str
    #: Runs after seeding and before the "before" snapshot.
    setup: Callable[[Tenant], Awaitable[None]] | None = None


def set_recharge(threshold: int = 10, pack_id: str = "", **fields: Any) -> Message:
    return pb.SetRechargePolicyRequest(
        **{"account_id": ACCOUNT, "request_id": "r-recharge", **fields},
        policy=pb.RechargePolicy(threshold=threshold, pack_id=pack_id),
    )


def case(id: str, method: str, build: Callable[[int], Message], field: str,
         setup: Callable[[Tenant], Awaitable[None]] | None = None) -> Any:
    return pytest.param(Bad(method, build, field, setup), id=id)


LONG = "a" * 129
SESSION = "call-1"


def start_session(**fields: Any) -> pb.StartSessionRequest:
    return pb.StartSessionRequest(
        **{"account_id": ACCOUNT, "feature": "voice", "session_id": SESSION, **fields}
    )


async def open_session(tenant: Tenant) -> None:
    """A session to report on (it holds 3 credits before the "before" snapshot)."""
    await tenant.meter.StartSession(start_session())


CASES = [
    # account_id
    case("grant-account-empty", "Grant", lambda now: grant(account_id=""), "account_id"),
    case("grant-account-129", "Grant", lambda now: grant(account_id=LONG), "account_id"),
    case("grant-account-brace", "Grant", lambda now: grant(account_id="{b01}x"), "account_id"),
    case("grant-account-space", "Grant", lambda now: grant(account_id="a b"), "account_id"),
    case("grant-account-slash", "Grant", lambda now: grant(account_id="a/b"), "account_id"),
    case("grant-account-non-ascii", "Grant", lambda now: grant(account_id="usér"), "account_id"),
    case("consume-account-brace", "Consume", lambda now: consume(account_id="a}"), "account_id"),
    case("consume-account-129", "Consume", lambda now: consume(account_id=LONG), "account_id"),
    case("get-balance-account-space", "GetBalance",
         lambda now: pb.GetBalanceRequest(account_id="a b"), "account_id"),
    case("get-balance-account-empty", "GetBalance",
         lambda now: pb.GetBalanceRequest(account_id=""), "account_id"),
    case("get-usage-account-129", "GetUsage",
         lambda now: pb.GetUsageRequest(account_id=LONG), "account_id"),
    case("set-balance-account-brace", "SetBalance",
         lambda now: set_balance(account_id="{x}"), "account_id"),
    case("set-options-account-empty", "SetAccountOptions",
         lambda now: set_options(account_id=""), "account_id"),
    case("set-options-time-zone-unknown", "SetAccountOptions",
         lambda now: set_options(time_zone="Mars/Olympus_Mons"), "time_zone"),
    case("set-options-time-zone-path", "SetAccountOptions",
         lambda now: set_options(time_zone="../../etc/passwd"), "time_zone"),
    case("set-options-overdraft-negative", "SetAccountOptions",
         lambda now: set_options(overdraft_limit=-1), "overdraft_limit"),
    case("set-options-overdraft-2^53", "SetAccountOptions",
         lambda now: set_options(overdraft_limit=2**53), "overdraft_limit"),
    case("set-usage-limit-account-brace", "SetUsageLimit",
         lambda now: set_limit(account_id="{x}"), "account_id"),
    case("set-usage-limit-feature-unknown", "SetUsageLimit",
         lambda now: set_limit(feature="nope"), "limit.feature"),
    case("set-usage-limit-feature-bad", "SetUsageLimit",
         lambda now: set_limit(feature="Bad-Name"), "limit.feature"),
    case("set-usage-limit-period-unset", "SetUsageLimit",
         lambda now: set_limit(period=0), "limit.period"),
    case("set-usage-limit-period-unknown", "SetUsageLimit",
         lambda now: set_limit(period=9), "limit.period"),
    case("set-usage-limit-negative", "SetUsageLimit",
         lambda now: set_limit(limit=-1), "limit.limit"),
    case("set-usage-limit-2^53", "SetUsageLimit",
         lambda now: set_limit(limit=2**53), "limit.limit"),
    case("set-usage-limit-unit-unknown", "SetUsageLimit",
         lambda now: set_limit(unit=7), "limit.unit"),
    case("set-usage-limit-request-id-empty", "SetUsageLimit",
         lambda now: set_limit(request_id=""), "request_id"),
    case("list-usage-limits-account-space", "ListUsageLimits",
         lambda now: pb.ListUsageLimitsRequest(account_id="a b"), "account_id"),
    case("set-recharge-threshold-0", "SetRechargePolicy",
         lambda now: set_recharge(threshold=0), "policy.threshold"),
    case("set-recharge-threshold-2^53", "SetRechargePolicy",
         lambda now: set_recharge(threshold=2**53), "policy.threshold"),
    case("set-recharge-pack-unknown", "SetRechargePolicy",
         lambda now: set_recharge(pack_id="pack_nope"), "policy.pack_id"),
    case("set-recharge-account-brace", "SetRechargePolicy",
         lambda now: set_recharge(account_id="{x}"), "account_id"),
    case("set-recharge-request-id-empty", "SetRechargePolicy",
         lambda now: set_recharge(request_id=""), "request_id"),
    case("get-recharge-account-space", "GetRechargePolicy",
         lambda now: pb.GetRechargePolicyRequest(account_id="a b"), "account_id"),
    # request_id
    case("grant-request-id-empty", "Grant", lambda now: grant(request_id=""), "request_id"),
    case("grant-request-id-129", "Grant", lambda now: grant(request_id="r" * 129), "request_id"),
    case("grant-request-id-space", "Grant", lambda now: grant(request_id="r 1"), "request_id"),
    case("grant-request-id-tab", "Grant", lambda now: grant(request_id="r\t1"), "request_id"),
    case("grant-request-id-non-ascii", "Grant",
         lambda now: grant(request_id="r-é"), "request_id"),
    case("consume-request-id-empty", "Consume", lambda now: consume(request_id=""), "request_id"),
    case("consume-request-id-space", "Consume",
         lambda now: consume(request_id=" r1"), "request_id"),
    case("consume-request-id-non-ascii", "Consume",
         lambda now: consume(request_id="ключ"), "request_id"),
    case("set-balance-request-id-empty", "SetBalance",
         lambda now: set_balance(request_id=""), "request_id"),
    case("set-balance-request-id-129", "SetBalance",
         lambda now: set_balance(request_id="r" * 129), "request_id"),
    case("set-options-request-id-empty", "SetAccountOptions",
         lambda now: set_options(request_id=""), "request_id"),
    case("set-rate-request-id-empty", "SetRate", lambda now: set_rate(request_id=""),
         "request_id"),
    case("set-rate-request-id-space", "SetRate", lambda now: set_rate(request_id="a b"),
         "request_id"),
    # Grant amount, priority, reference, source
    case("grant-amount-zero", "Grant", lambda now: grant(amount=0), "amount"),
    case("grant-amount-negative", "Grant", lambda now: grant(amount=-5), "amount"),
    case("grant-amount-2^53", "Grant", lambda now: grant(amount=2**53), "amount"),
    case("grant-amount-int64-max", "Grant", lambda now: grant(amount=2**63 - 1), "amount"),
    case("grant-priority-negative", "Grant", lambda now: grant(priority=-1), "priority"),
    case("grant-priority-10000", "Grant", lambda now: grant(priority=10_000), "priority"),
    case("grant-reference-257", "Grant", lambda now: grant(reference="x" * 257), "reference"),
    case("grant-source-unknown", "Grant", lambda now: grant(source=99), "source"),
    # Grant expiry
    case("grant-expires-past", "Grant",
         lambda now: grant(expires_at=ts(now // 1000 - 60)), "expires_at"),
    case("grant-expires-now", "Grant",
         lambda now: grant(expires_at=ts(now // 1000, now % 1000 * 1_000_000)), "expires_at"),
    case("grant-expires-before-epoch", "Grant",
         lambda now: grant(expires_at=ts(-1)), "expires_at"),
    case("grant-expires-nanos-negative", "Grant",
         lambda now: grant(expires_at=ts(now // 1000 + 3600, -1)), "expires_at"),
    case("grant-expires-nanos-1e9", "Grant",
         lambda now: grant(expires_at=ts(now // 1000 + 3600, 10**9)), "expires_at"),
    case("grant-expires-after-9999", "Grant",
         lambda now: grant(expires_at=ts(AFTER_9999_S)), "expires_at"),
    case("grant-expires-int64-max", "Grant",
         lambda now: grant(expires_at=ts(2**63 - 1)), "expires_at"),
    case("grant-expires-year-3000", "Grant",
         lambda now: grant(expires_at=ts(YEAR_3000_S)), "expires_at"),
    case("grant-valid-for-negative", "Grant", lambda now: grant(valid_for=dur(-60)), "valid_for"),
    case("grant-valid-for-zero", "Grant", lambda now: grant(valid_for=dur(0)), "valid_for"),
    case("grant-valid-for-negative-nanos", "Grant",
         lambda now: grant(valid_for=dur(0, -5_000_000)), "valid_for"),
    case("grant-valid-for-mixed-signs", "Grant",
         lambda now: grant(valid_for=dur(60, -1)), "valid_for"),
    case("grant-valid-for-nanos-1e9", "Grant",
         lambda now: grant(valid_for=dur(60, 10**9)), "valid_for"),
    case("grant-valid-for-past-year-2286", "Grant",
         lambda now: grant(valid_for=dur(YEAR_3000_S)), "valid_for"),
    case("grant-valid-for-beyond-duration-range", "Grant",
         lambda now: grant(valid_for=dur(315_576_000_001)), "valid_for"),
    # Consume
    # ConsumeBatch: the batch itself (its items' own errors are per item: test_batch.py)
    case("batch-empty", "ConsumeBatch", lambda now: pb.ConsumeBatchRequest(), "items"),
    case("batch-1001", "ConsumeBatch",
         lambda now: pb.ConsumeBatchRequest(items=[consume() for _ in range(1001)]), "items"),
    case("consume-feature-unknown", "Consume", lambda now: consume(feature="fax"), "feature"),
    case("consume-feature-uppercase", "Consume", lambda now: consume(feature="Text"), "feature"),
    case("consume-feature-empty", "Consume", lambda now: consume(feature=""), "feature"),
    case("consume-feature-33-chars", "Consume",
         lambda now: consume(feature="f" * 33), "feature"),
    case("consume-quantity-zero", "Consume", lambda now: consume(quantity=0), "quantity"),
    case("consume-quantity-negative", "Consume", lambda now: consume(quantity=-3), "quantity"),
    case("consume-quantity-2^53", "Consume", lambda now: consume(quantity=2**53), "quantity"),
    case("consume-quantity-times-rate-overflows", "Consume",
         lambda now: consume(feature="premium", quantity=2**14), "quantity",
         setup=lambda t: set_price(t, "premium", 2**40)),
    case("consume-seconds-times-rate-overflows", "Consume",
         lambda now: consume(feature="voice", quantity=60 * 2**14), "quantity",
         setup=lambda t: set_price(t, "voice", 2**40)),
    case("consume-amount-zero", "Consume", lambda now: consume(amount=0), "amount"),
    case("consume-amount-negative", "Consume", lambda now: consume(amount=-1), "amount"),
    case("consume-amount-2^53", "Consume", lambda now: consume(amount=2**53), "amount"),
    # SetBalance
    case("set-balance-negative", "SetBalance", lambda now: set_balance(amount=-5), "amount"),
    case("set-balance-zero-without-reset", "SetBalance",
         lambda now: set_balance(amount=0), "amount"),
    case("set-balance-negative-with-reset", "SetBalance",
         lambda now: set_balance(amount=-1, reset=True), "amount"),
    case("set-balance-2^53-with-reset", "SetBalance",
         lambda now: set_balance(amount=2**53, reset=True), "amount"),
    case("set-balance-reference-257", "SetBalance",
         lambda now: set_balance(reference="x" * 257), "reference"),
    # SetRate
    case("set-rate-missing", "SetRate", lambda now: pb.SetRateRequest(request_id=rid()), "rate"),
    case("set-rate-credits-zero", "SetRate",
         lambda now: set_rate(credits_per_unit=0), "rate.credits_per_unit"),
    case("set-rate-credits-negative", "SetRate",
         lambda now: set_rate(credits_per_unit=-2), "rate.credits_per_unit"),
    case("set-rate-credits-2^53", "SetRate",
         lambda now: set_rate(credits_per_unit=2**53), "rate.credits_per_unit"),
    case("set-rate-feature-empty", "SetRate", lambda now: set_rate(feature=""), "rate.feature"),
    case("set-rate-feature-uppercase", "SetRate",
         lambda now: set_rate(feature="SMS"), "rate.feature"),
    case("set-rate-feature-leading-digit", "SetRate",
         lambda now: set_rate(feature="1sms"), "rate.feature"),
    case("set-rate-feature-33-chars", "SetRate",
         lambda now: set_rate(feature="f" * 33), "rate.feature"),
    case("set-rate-increment-on-builtin-count", "SetRate",
         lambda now: set_rate(feature="text", billing_increment=dur(60)),
         "rate.billing_increment"),
    case("set-rate-increment-on-new-count-feature", "SetRate",
         lambda now: set_rate(unit=pb.RATE_UNIT_COUNT, billing_increment=dur(60)),
         "rate.billing_increment"),
    case("set-rate-builtin-text-to-time", "SetRate",
         lambda now: set_rate(feature="text", unit=pb.RATE_UNIT_TIME), "rate.unit"),
    case("set-rate-builtin-voice-to-count", "SetRate",
         lambda now: set_rate(feature="voice", unit=pb.RATE_UNIT_COUNT), "rate.unit"),
    case("set-rate-unit-unknown", "SetRate", lambda now: set_rate(unit=7), "rate.unit"),
    case("set-rate-increment-half-second", "SetRate",
         lambda now: set_rate(feature="voice", billing_increment=dur(0, 500_000_000)),
         "rate.billing_increment"),
    case("set-rate-increment-1.5-seconds", "SetRate",
         lambda now: set_rate(feature="voice", billing_increment=dur(1, 500_000_000)),
         "rate.billing_increment"),
    case("set-rate-increment-zero", "SetRate",
         lambda now: set_rate(feature="voice", billing_increment=dur(0)),
         "rate.billing_increment"),
    case("set-rate-increment-negative", "SetRate",
         lambda now: set_rate(feature="voice", billing_increment=dur(-60)),
         "rate.billing_increment"),
    case("set-rate-increment-over-24h", "SetRate",
         lambda now: set_rate(feature="voice", billing_increment=dur(86_401)),
         "rate.billing_increment"),
    # ListTransactions
    case("history-page-size-negative", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(account_id=ACCOUNT, page_size=-1), "page_size"),
    case("history-page-token-garbage", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(account_id=ACCOUNT, page_token="nope"),
         "page_token"),
    case("history-account-brace", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(account_id="a{b"), "account_id"),
    case("history-kind-unspecified", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(
             account_id=ACCOUNT, filter=pb.TransactionFilter(kinds=[0])), "filter.kinds[0]"),
    case("history-kind-unknown", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(
             account_id=ACCOUNT, filter=pb.TransactionFilter(kinds=[99])), "filter.kinds[0]"),
    case("history-feature-upper", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(
             account_id=ACCOUNT, filter=pb.TransactionFilter(features=["Text"])),
         "filter.features[0]"),
    case("history-end-before-start", "ListTransactions",
         lambda now: pb.ListTransactionsRequest(
             account_id=ACCOUNT,
             filter=pb.TransactionFilter(start_time=ts(now // 1000), end_time=ts(1))),
         "filter.end_time"),
    # VoidGrant
    case("void-lot-empty", "VoidGrant",
         lambda now: pb.VoidGrantRequest(account_id=ACCOUNT, lot_id="", request_id=rid()),
         "lot_id"),
    case("void-account-brace", "VoidGrant",
         lambda now: pb.VoidGrantRequest(account_id="{x}", lot_id="lot_x", request_id=rid()),
         "account_id"),
    case("void-reason-257", "VoidGrant",
         lambda now: pb.VoidGrantRequest(account_id=ACCOUNT, lot_id="lot_x", reason="r" * 257,
                                         request_id=rid()), "reason"),
    case("void-request-id-empty", "VoidGrant",
         lambda now: pb.VoidGrantRequest(account_id=ACCOUNT, lot_id="lot_x"), "request_id"),
    # GetUsageReport
    case("report-start-missing", "GetUsageReport",
         lambda now: pb.GetUsageReportRequest(account_id=ACCOUNT, end_time=ts(now // 1000)),
         "start_time"),
    case("report-end-before-start", "GetUsageReport",
         lambda now: pb.GetUsageReportRequest(
             account_id=ACCOUNT, start_time=ts(now // 1000), end_time=ts(1)), "end_time"),
    case("report-span-too-long", "GetUsageReport",
         lambda now: pb.GetUsageReportRequest(
             account_id=ACCOUNT, start_time=ts(0), end_time=ts(now // 1000)), "end_time"),
    case("report-feature-bad", "GetUsageReport",
         lambda now: pb.GetUsageReportRequest(
             start_time=ts(0), end_time=ts(86_400), feature="no way"), "feature"),
    case("report-period-unknown", "GetUsageReport",
         lambda now: pb.GetUsageReportRequest(
             start_time=ts(0), end_time=ts(86_400), group_by=7), "group_by"),
    # call sessions
    case("start-session-count-feature", "StartSession",
         lambda now: start_session(feature="text"), "feature"),
    case("start-session-unknown-feature", "StartSession",
         lambda now: start_session(feature="fax"), "feature"),
    case("start-session-id-empty", "StartSession",
         lambda now: start_session(session_id=""), "session_id"),
    case("start-session-id-pipe", "StartSession",
         lambda now: start_session(session_id="a|b"), "session_id"),
    case("start-session-account-brace", "StartSession",
         lambda now: start_session(account_id="{b1}"), "account_id"),
    case("start-session-quota-zero", "StartSession",
         lambda now: start_session(requested_seconds=0), "requested_seconds"),
    case("start-session-policy-unknown", "StartSession",
         lambda now: start_session(timeout_policy=9), "timeout_policy"),
    case("update-session-sequence-zero", "UpdateSession",
         lambda now: pb.UpdateSessionRequest(account_id=ACCOUNT, session_id=SESSION, sequence=0,
                                             used_seconds=5), "sequence", open_session),
    case("update-session-used-negative", "UpdateSession",
         lambda now: pb.UpdateSessionRequest(account_id=ACCOUNT, session_id=SESSION, sequence=1,
                                             used_seconds=-5), "used_seconds", open_session),
    case("update-session-quota-too-long", "UpdateSession",
         lambda now: pb.UpdateSessionRequest(account_id=ACCOUNT, session_id=SESSION, sequence=1,
                                             used_seconds=5, requested_seconds=86_401),
         "requested_seconds", open_session),
    case("end-session-used-too-many", "EndSession",
         lambda now: pb.EndSessionRequest(account_id=ACCOUNT, session_id=SESSION, sequence=1,
                                          used_seconds=86_401), "used_seconds", open_session),
    case("end-session-id-129", "EndSession",
         lambda now: pb.EndSessionRequest(account_id=ACCOUNT, session_id=LONG, sequence=1,
                                          used_seconds=5), "session_id", open_session),
    case("get-session-id-bad", "GetSession",
         lambda now: pb.GetSessionRequest(account_id=ACCOUNT, session_id="a b"), "session_id"),
]


def as_check(request: Message) -> pb.CheckRequest:
    """The Check of a Consume request: the same item without its request id."""
    assert isinstance(request, pb.ConsumeRequest)
    check = pb.CheckRequest(account_id=request.account_id, feature=request.feature)
    if request.HasField("quantity"):
        check.quantity = request.quantity
    if request.HasField("amount"):
        check.amount = request.amount
    return check


def _check_case(param: Any) -> Any:
    bad, id = param.values[0], param.id
    build = bad.build
    return case(f"check-{id.removeprefix('consume-')}", "Check",
                lambda now: as_check(build(now)), bad.field, bad.setup)


# Check validates as Consume does (every Consume case but the request id, which it has not).
CASES += [
    _check_case(p) for p in CASES
    if p.values[0].method == "Consume" and p.values[0].field != "request_id"
]
CASES += [
    case("check-batch-empty", "CheckBatch", lambda now: pb.CheckBatchRequest(), "items"),
    case("check-batch-1001", "CheckBatch",
         lambda now: pb.CheckBatchRequest(items=[as_check(consume()) for _ in range(1001)]),
         "items"),
]


# --- state ------------------------------------------------------------------------------------
@dataclass
class State:
    balance: pb.GetBalanceResponse
    usage: pb.GetUsageResponse
    rates: pb.ListRatesResponse
    #: The tenant's Redis keys (lots, balances, idempotency records, ...).
    keys: set[str]
    #: Per outbox stream watched: its length and last entry id.
    outboxes: dict[str, tuple[int, str]]


def watched_outboxes(tenant: Tenant, *accounts: str) -> list[str]:
    return sorted({outbox_key(bucket_of(tenant.name, a)) for a in (ACCOUNT, *accounts)})


async def state(tenant: Tenant, r: redis.Redis, streams: list[str]) -> State:
    outboxes: dict[str, tuple[int, str]] = {}
    for stream in streams:
        last = r.xrevrange(stream, count=1)
        outboxes[stream] = (int(r.xlen(stream)), str(last[0][0]) if last else "0-0")
    return State(
        balance=await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT)),
        usage=await tenant.read.GetUsage(pb.GetUsageRequest(account_id=ACCOUNT)),
        rates=await tenant.read.ListRates(pb.ListRatesRequest()),
        keys={str(k) for k in r.keys(f"cm:*:{tenant.name}:*")},
        outboxes=outboxes,
    )


async def assert_unchanged(tenant: Tenant, r: redis.Redis, before: State) -> None:
    after = await state(tenant, r, list(before.outboxes))
    assert after.balance == before.balance
    assert after.usage == before.usage
    assert after.rates == before.rates
    assert after.keys == before.keys
    for stream, (length, last_id) in before.outboxes.items():
        new = r.xrange(stream, min=f"({last_id}", max="+") or []
        mine = [f for _id, f in new if f is not None and entry_header(f)[1] == tenant.name]
        assert mine == [], f"the refused call appended to {stream}: {mine}"
        # The length is unchanged (up to other tenants' expiry sweeps in the shared Redis).
        assert after.outboxes[stream][0] == length + len(new)


async def seed(tenant: Tenant, account: str = ACCOUNT) -> None:
    g = await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=SEED,
                                                 request_id=rid()))
    assert g.balance == SEED
    c = await tenant.meter.Consume(pb.ConsumeRequest(account_id=account, feature="text",
                                                     quantity=SEED_USED, request_id=rid()))
    assert c.balance == SEED - SEED_USED


def assert_invalid(f: Failure, field: str) -> None:
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert f.reason == "INVALID_REQUEST", f
    assert f.domain == "creditmeter", f
    assert set(f.violations) == {field}, f
    assert f.violations[field], "a violation explains itself"
    assert f.metadata["fields"].split(",") == [field], f


async def call(tenant: Tenant, method: str, request: Message) -> Any:
    return await getattr(tenant.admin, method)(request)


# --- the table --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", CASES)
async def test_invalid_request(
    tenant: Tenant, redis_client: redis.Redis, clock: ManualClock, bad: Bad
) -> None:
    await seed(tenant)
    if bad.setup is not None:
        await bad.setup(tenant)
    request = bad.build(clock.now_ms())
    account = getattr(request, "account_id", ACCOUNT)
    before = await state(tenant, redis_client, watched_outboxes(tenant, account))
    f = await fails(call(tenant, bad.method, request))
    assert_invalid(f, bad.field)
    await assert_unchanged(tenant, redis_client, before)


def test_table_covers_every_mutating_and_reading_rpc() -> None:
    methods = {p.values[0].method for p in CASES}
    assert methods == {m.name for m in pb.DESCRIPTOR.services_by_name["Credits"].methods} - {
        "ListRates",  # takes no fields
        "GetLedgerStatus",  # takes no fields
        "WatchBalance",  # a server stream: its invalid requests are in test_watch.py
        "Meter",  # invalid items are per-item errors of the stream: see test_meter.py
    }


async def test_state_check_sees_a_real_change(tenant: Tenant, redis_client: redis.Redis) -> None:
    """The unchanged-state check is not vacuous: a valid call of each kind trips it."""
    await seed(tenant)
    streams = watched_outboxes(tenant)
    for method, request in [
        ("Grant", grant()),
        ("Consume", consume()),
        ("SetBalance", set_balance()),
        ("SetAccountOptions", set_options()),
        ("SetRate", set_rate()),
    ]:
        before = await state(tenant, redis_client, streams)
        await call(tenant, method, request)
        with pytest.raises(AssertionError):
            await assert_unchanged(tenant, redis_client, before)


async def test_all_violations_are_reported_together(
    tenant: Tenant, redis_client: redis.Redis
) -> None:
    await seed(tenant)
    before = await state(tenant, redis_client, watched_outboxes(tenant))
    f = await fails(tenant.admin.Grant(pb.GrantRequest(
        account_id="", amount=0, request_id="", priority=-1, reference="x" * 257,
    )))
    fields = {"account_id", "amount", "request_id", "priority", "reference"}
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f.reason == "INVALID_REQUEST"
    assert set(f.violations) == fields
    assert set(f.metadata["fields"].split(",")) == fields
    await assert_unchanged(tenant, redis_client, before)


async def test_boundaries_are_accepted(tenant: Tenant, clock: ManualClock) -> None:
    """The counterparts of the refusals: the largest valid values pass."""
    now = clock.now_ms()
    ok = [
        grant(account_id="A" * 128, request_id="r" * 128, priority=0),
        grant(account_id="a.b_c:d@e+f=g-h", request_id="!~{}[]#", priority=9999,
              reference="x" * 256),
        grant(account_id="exp", expires_at=ts(now // 1000 + 1)),
        grant(account_id="exp", valid_for=dur(0, 1_000_000)),
    ]
    for request in ok:
        assert (await tenant.admin.Grant(request)).lot.lot_id
    assert (await tenant.admin.Grant(grant(account_id="max", amount=MAX))).balance == MAX
    r = await tenant.admin.SetRate(set_rate(feature="f" * 32, credits_per_unit=MAX))
    assert r.rate.credits_per_unit == MAX
    r = await tenant.admin.SetRate(set_rate(feature="voice", billing_increment=dur(86_400)))
    assert r.rate.billing_increment.seconds == 86_400
    s = await tenant.admin.SetBalance(set_balance(account_id="zero", amount=0, reset=True))
    assert s.balance == 0


# --- balance limit ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["Grant", "SetBalance", "SetBalance-reset"])
async def test_balance_limit_exceeded(
    tenant: Tenant, redis_client: redis.Redis, method: str
) -> None:
    await seed(tenant)
    before = await state(tenant, redis_client, watched_outboxes(tenant))
    if method == "Grant":
        request: Message = grant(amount=MAX)
    else:
        request = set_balance(amount=MAX, reset=method.endswith("reset"))
    f = await fails(call(tenant, method.split("-")[0], request))
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert f.reason == "BALANCE_LIMIT_EXCEEDED", f
    assert f.metadata == {"balance": str(SEED - SEED_USED), "amount": str(MAX)}
    await assert_unchanged(tenant, redis_client, before)
    # The refusal did not store the request id: a valid retry under it is judged afresh.
    request.amount = 5  # type: ignore[attr-defined]
    assert (await call(tenant, method.split("-")[0], request)).balance > 0


async def test_balance_just_below_limit_then_one_more(tenant: Tenant) -> None:
    g = await tenant.admin.Grant(grant(amount=MAX - 1))
    assert g.balance == MAX - 1
    f = await fails(tenant.admin.Grant(grant(amount=2)))
    assert f.reason == "BALANCE_LIMIT_EXCEEDED"
    assert (await tenant.admin.Grant(grant(amount=1))).balance == MAX


# --- idempotency keys ---------------------------------------------------------------------------
def assert_reused(f: Failure, request_id: str) -> None:
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert f.reason == "IDEMPOTENCY_KEY_REUSED", f
    assert f.domain == "creditmeter"
    assert f.metadata == {"request_id": request_id}


Variant = Callable[[str, str], Message]  # (account, request id) -> request

REUSES: list[Any] = [
    pytest.param("Grant", lambda a, r: grant(account_id=a, request_id=r),
                 lambda a, r: grant(account_id=a, request_id=r, amount=11), id="grant-amount"),
    pytest.param("Grant", lambda a, r: grant(account_id=a, request_id=r),
                 lambda a, r: grant(account_id=a, request_id=r, priority=10), id="grant-priority"),
    pytest.param("Grant", lambda a, r: grant(account_id=a, request_id=r),
                 lambda a, r: grant(account_id=a, request_id=r, reference="order-2"),
                 id="grant-reference"),
    pytest.param("Grant", lambda a, r: grant(account_id=a, request_id=r),
                 lambda a, r: grant(account_id=a, request_id=r, source=pb.LOT_SOURCE_PURCHASE),
                 id="grant-source"),
    pytest.param("Grant", lambda a, r: grant(account_id=a, request_id=r),
                 lambda a, r: grant(account_id=a, request_id=r, valid_for=dur(3600)),
                 id="grant-expiry"),
    pytest.param("Consume", lambda a, r: consume(account_id=a, request_id=r),
                 lambda a, r: consume(account_id=a, request_id=r, quantity=2),
                 id="consume-quantity"),
    pytest.param("Consume", lambda a, r: consume(account_id=a, request_id=r),
                 lambda a, r: consume(account_id=a, request_id=r, feature="voice"),
                 id="consume-feature"),
    pytest.param("Consume", lambda a, r: consume(account_id=a, request_id=r),
                 lambda a, r: consume(account_id=a, request_id=r, amount=1),
                 id="consume-explicit-amount"),
    pytest.param("SetBalance", lambda a, r: set_balance(account_id=a, request_id=r),
                 lambda a, r: set_balance(account_id=a, request_id=r, reset=True),
                 id="set-balance-reset"),
    pytest.param("SetAccountOptions", lambda a, r: set_options(account_id=a, request_id=r),
                 lambda a, r: set_options(account_id=a, request_id=r, unlimited=False),
                 id="set-options-unlimited"),
]


@pytest.mark.parametrize(("method", "first", "second"), REUSES)
async def test_request_id_reused_with_other_parameters(
    tenant: Tenant, redis_client: redis.Redis, method: str, first: Variant, second: Variant
) -> None:
    await seed(tenant)
    await seed(tenant, OTHER_ACCOUNT)
    request_id = rid()
    original = await call(tenant, method, first(ACCOUNT, request_id))
    streams = watched_outboxes(tenant, OTHER_ACCOUNT)
    before = await state(tenant, redis_client, streams)
    # A true retry replays the first response and changes nothing ...
    assert await call(tenant, method, first(ACCOUNT, request_id)) == original
    await assert_unchanged(tenant, redis_client, before)
    # ... other parameters under the same id are refused, and change nothing either.
    f = await fails(call(tenant, method, second(ACCOUNT, request_id)))
    assert_reused(f, request_id)
    await assert_unchanged(tenant, redis_client, before)
    # The id is scoped to the account: on another account it is a new request.
    other = await call(tenant, method, second(OTHER_ACCOUNT, request_id))
    assert other != original
    after = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT))
    assert after == before.balance


async def test_request_id_reused_by_another_operation(
    tenant: Tenant, redis_client: redis.Redis
) -> None:
    """The fingerprint covers the operation: a Grant's id cannot be reused for a SetBalance
    (or a Consume) of the same account, even with the same amount."""
    await seed(tenant)
    request_id = rid()
    await tenant.admin.Grant(grant(amount=10, request_id=request_id))
    before = await state(tenant, redis_client, watched_outboxes(tenant))
    assert_reused(await fails(tenant.admin.SetBalance(
        set_balance(amount=10, request_id=request_id))), request_id)
    assert_reused(await fails(tenant.admin.Consume(
        consume(amount=10, request_id=request_id))), request_id)
    await assert_unchanged(tenant, redis_client, before)


async def test_set_rate_request_id_reused(tenant: Tenant, redis_client: redis.Redis) -> None:
    await seed(tenant)
    request_id = rid()
    first = await tenant.admin.SetRate(set_rate(request_id, feature="sms", credits_per_unit=2))
    before = await state(tenant, redis_client, watched_outboxes(tenant))
    retry = await tenant.admin.SetRate(set_rate(request_id, feature="sms", credits_per_unit=2))
    assert retry == first
    for changed in (
        {"feature": "sms", "credits_per_unit": 3},
        {"feature": "mms", "credits_per_unit": 2},  # per tenant: another feature is no escape
        {"feature": "sms", "credits_per_unit": 2, "unit": pb.RATE_UNIT_TIME},
    ):
        f = await fails(tenant.admin.SetRate(set_rate(request_id, **changed)))
        assert_reused(f, request_id)
    await assert_unchanged(tenant, redis_client, before)
    rates = {r.feature: r for r in before.rates.rates}
    assert rates["sms"].credits_per_unit == 2 and "mms" not in rates
    # A fresh id sets the new price.
    r = await tenant.admin.SetRate(set_rate(feature="sms", credits_per_unit=3))
    assert r.rate.credits_per_unit == 3


async def test_refused_set_rate_does_not_burn_its_request_id(tenant: Tenant) -> None:
    request_id = rid()
    f = await fails(tenant.admin.SetRate(set_rate(request_id, credits_per_unit=0)))
    assert f.reason == "INVALID_REQUEST"
    r = await tenant.admin.SetRate(set_rate(request_id, credits_per_unit=4))
    assert r.rate.credits_per_unit == 4


async def test_refused_grant_does_not_burn_its_request_id(tenant: Tenant) -> None:
    await seed(tenant)
    request_id = rid()
    f = await fails(tenant.admin.Grant(grant(amount=0, request_id=request_id)))
    assert f.reason == "INVALID_REQUEST"
    g = await tenant.admin.Grant(grant(amount=4, request_id=request_id))
    assert g.balance == SEED - SEED_USED + 4
