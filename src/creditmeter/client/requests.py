"""Request builders shared by the sync and asyncio clients: plain Python values in,
protobuf requests out. Neither client builds a request itself, so both send the same."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2, webhooks_pb2

LotSourceName = Literal["purchase", "bonus", "promotion", "trial", "manual", "refund", "rollover"]
RateUnitName = Literal["count", "time"]
TransactionKindName = Literal[
    "grant", "consume", "expire", "reset", "refund", "session", "options", "usage_limit",
    "repay", "debt",
    "recharge_due", "recharge_policy",
]
LimitPeriodName = Literal["day", "week", "month"]
LimitUnitName = Literal["units", "credits"]
TimeoutPolicyName = Literal["charge_quota", "release"]

#: Requests idempotent by the session's id and sequence rather than by a request id.
_SESSION_KEYED = frozenset(
    {
        pb.StartSessionRequest.DESCRIPTOR.full_name,
        pb.UpdateSessionRequest.DESCRIPTOR.full_name,
        pb.EndSessionRequest.DESCRIPTOR.full_name,
    }
)


def with_request_id(request: Message) -> bool:
    """Give a mutating request a fresh request id if it has none; whether the request is
    idempotent (carries a key a repeat is recognised by). The caller keeps the request and
    sends this same id on every retry."""
    if "request_id" in request.DESCRIPTOR.fields_by_name:
        if not request.request_id:  # type: ignore[attr-defined]
            request.request_id = str(uuid.uuid4())  # type: ignore[attr-defined]
        return True
    return request.DESCRIPTOR.full_name in _SESSION_KEYED


def _seconds(value: timedelta | float) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


def grant(
    account_id: str,
    amount: int,
    *,
    expires_at: datetime | None = None,
    valid_for: timedelta | float | None = None,
    priority: int | None = None,
    source: LotSourceName = "manual",
    reference: str = "",
    request_id: str | None = None,
) -> pb.GrantRequest:
    req = pb.GrantRequest(
        account_id=account_id,
        amount=amount,
        source=pb.LotSource.Value(f"LOT_SOURCE_{source.upper()}"),
        reference=reference,
        request_id=request_id or "",
    )
    if priority is not None:
        req.priority = priority
    if expires_at is not None:
        req.expires_at.FromDatetime(expires_at)
    if valid_for is not None:
        req.valid_for.FromTimedelta(timedelta(seconds=_seconds(valid_for)))
    return req


def consume(
    account_id: str,
    feature: str,
    *,
    quantity: int | None = None,
    amount: int | None = None,
    request_id: str | None = None,
) -> pb.ConsumeRequest:
    req = pb.ConsumeRequest(account_id=account_id, feature=feature, request_id=request_id or "")
    if quantity is not None:
        req.quantity = quantity
    if amount is not None:
        req.amount = amount
    return req


def check(
    account_id: str, feature: str, *, quantity: int | None = None, amount: int | None = None
) -> pb.CheckRequest:
    """A Check request (an item of check_batch): the consumption as `consume` takes it,
    without a request id (a check changes nothing)."""
    req = pb.CheckRequest(account_id=account_id, feature=feature)
    if quantity is not None:
        req.quantity = quantity
    if amount is not None:
        req.amount = amount
    return req


def set_balance(
    account_id: str, amount: int, *, reset: bool, reference: str, request_id: str | None
) -> pb.SetBalanceRequest:
    return pb.SetBalanceRequest(
        account_id=account_id,
        amount=amount,
        reset=reset,
        reference=reference,
        request_id=request_id or "",
    )


def set_rate(
    feature: str,
    credits_per_unit: int,
    *,
    unit: RateUnitName | None,
    billing_increment: timedelta | float | None,
    request_id: str | None,
) -> pb.SetRateRequest:
    rate = pb.Rate(feature=feature, credits_per_unit=credits_per_unit)
    if unit is not None:
        rate.unit = pb.RateUnit.Value(f"RATE_UNIT_{unit.upper()}")
    if billing_increment is not None:
        rate.billing_increment.FromTimedelta(timedelta(seconds=_seconds(billing_increment)))
    return pb.SetRateRequest(rate=rate, request_id=request_id or "")


def set_account_options(
    account_id: str,
    *,
    unlimited: bool | None,
    request_id: str | None,
    time_zone: str | None = None,
    ignore_usage_limits: bool | None = None,
    overdraft_limit: int | None = None,
) -> pb.SetAccountOptionsRequest:
    """The options given (None leaves one as it is); `overdraft_limit` in credits, 0
    removes the credit line."""
    req = pb.SetAccountOptionsRequest(account_id=account_id, request_id=request_id or "")
    if unlimited is not None:
        req.unlimited = unlimited
    if time_zone is not None:
        req.time_zone = time_zone
    if ignore_usage_limits is not None:
        req.ignore_usage_limits = ignore_usage_limits
    if overdraft_limit is not None:
        req.overdraft_limit = overdraft_limit
    return req


def set_usage_limit(
    feature: str,
    period: LimitPeriodName,
    limit: int | None,
    *,
    unit: LimitUnitName,
    account_id: str,
    request_id: str | None,
) -> pb.SetUsageLimitRequest:
    """A limit on `feature` per `period` (None removes it), the tenant's or, with an
    account id, the account's own."""
    return pb.SetUsageLimitRequest(
        account_id=account_id,
        limit=pb.UsageLimit(
            feature=feature,
            period=pb.UsageLimitPeriod.Value(f"USAGE_LIMIT_PERIOD_{period.upper()}"),
            limit=limit or 0,
            unit=pb.UsageLimitUnit.Value(f"USAGE_LIMIT_UNIT_{unit.upper()}"),
        ),
        remove=limit is None,
        request_id=request_id or "",
    )


def set_recharge_policy(
    threshold: int | None,
    pack_id: str,
    *,
    account_id: str,
    disable: bool,
    request_id: str | None,
) -> pb.SetRechargePolicyRequest:
    """Recharge below `threshold` with `pack_id` ('' = none): the tenant's default, or
    with an account id the account's own; `threshold` None removes it; `disable` turns
    recharges off for the account."""
    return pb.SetRechargePolicyRequest(
        account_id=account_id,
        policy=pb.RechargePolicy(threshold=threshold or 0, pack_id=pack_id),
        remove=threshold is None and not disable,
        disable=disable,
        request_id=request_id or "",
    )


def list_transactions(
    account_id: str,
    *,
    page_size: int,
    page_token: str,
    kinds: Iterable[TransactionKindName],
    features: Iterable[str],
    start_time: datetime | None,
    end_time: datetime | None,
) -> pb.ListTransactionsRequest:
    req = pb.ListTransactionsRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    req.filter.kinds.extend(
        pb.TransactionKind.Value(f"TRANSACTION_KIND_{k.upper()}") for k in kinds
    )
    req.filter.features.extend(features)
    if start_time is not None:
        req.filter.start_time.FromDatetime(start_time)
    if end_time is not None:
        req.filter.end_time.FromDatetime(end_time)
    return req


def usage_report(
    start_time: datetime,
    end_time: datetime,
    *,
    account_id: str,
    group_by: Literal["day", "month"],
    feature: str,
) -> pb.GetUsageReportRequest:
    req = pb.GetUsageReportRequest(
        account_id=account_id,
        feature=feature,
        group_by=pb.USAGE_PERIOD_MONTH if group_by == "month" else pb.USAGE_PERIOD_DAY,
    )
    req.start_time.FromDatetime(start_time)
    req.end_time.FromDatetime(end_time)
    return req


def start_session(
    account_id: str,
    feature: str,
    session_id: str,
    *,
    requested_seconds: int | None,
    timeout_policy: TimeoutPolicyName | None,
) -> pb.StartSessionRequest:
    req = pb.StartSessionRequest(account_id=account_id, feature=feature, session_id=session_id)
    if requested_seconds is not None:
        req.requested_seconds = requested_seconds
    if timeout_policy is not None:
        req.timeout_policy = pb.SessionTimeoutPolicy.Value(
            f"SESSION_TIMEOUT_POLICY_{timeout_policy.upper()}"
        )
    return req


def update_session(
    account_id: str,
    session_id: str,
    sequence: int,
    used_seconds: int,
    *,
    requested_seconds: int | None,
) -> pb.UpdateSessionRequest:
    req = pb.UpdateSessionRequest(
        account_id=account_id, session_id=session_id, sequence=sequence, used_seconds=used_seconds
    )
    if requested_seconds is not None:
        req.requested_seconds = requested_seconds
    return req


def list_purchases(
    account_id: str,
    *,
    status: Literal["pending", "completed", "cancelled", "expired", "refunded"] | None,
    page_size: int,
    page_token: str,
) -> packs_pb2.ListPurchasesRequest:
    req = packs_pb2.ListPurchasesRequest(
        account_id=account_id, page_size=page_size, page_token=page_token
    )
    if status is not None:
        req.status = packs_pb2.PurchaseStatus.Value(f"PURCHASE_STATUS_{status.upper()}")
    return req


# --- webhooks ---------------------------------------------------------------------------
WebhookEventName = Literal[
    "balance.low", "balance.depleted", "balance.topped_up", "purchase.completed",
    "purchase.refunded", "purchase.expired", "subscription.period_granted",
    "session.timed_out", "recharge.due",
]  # fmt: skip
WebhookDeliveryStatusName = Literal["pending", "delivered", "failed"]


def webhook_event_type(name: WebhookEventName) -> webhooks_pb2.WebhookEventType.ValueType:
    """The enum value of an event type named as in the webhook body ("balance.low")."""
    return webhooks_pb2.WebhookEventType.Value(
        "WEBHOOK_EVENT_TYPE_" + name.replace(".", "_").upper()
    )


def create_webhook_endpoint(
    url: str,
    event_types: Iterable[WebhookEventName],
    *,
    thresholds: Iterable[int],
    description: str,
    request_id: str | None,
) -> webhooks_pb2.CreateWebhookEndpointRequest:
    endpoint = webhooks_pb2.WebhookEndpoint(
        url=url, event_types=[webhook_event_type(t) for t in event_types],
        thresholds=list(thresholds), description=description,
    )  # fmt: skip
    return webhooks_pb2.CreateWebhookEndpointRequest(
        endpoint=endpoint, request_id=request_id or ""
    )


def update_webhook_endpoint(
    endpoint_id: str,
    *,
    url: str | None,
    event_types: Iterable[WebhookEventName] | None,
    thresholds: Iterable[int] | None,
    description: str | None,
    disabled: bool | None,
    request_id: str | None,
) -> webhooks_pb2.UpdateWebhookEndpointRequest:
    """Change the fields given (not None), and only those."""
    endpoint = webhooks_pb2.WebhookEndpoint(endpoint_id=endpoint_id)
    paths = []
    if url is not None:
        endpoint.url = url
        paths.append("url")
    if event_types is not None:
        endpoint.event_types.extend(webhook_event_type(t) for t in event_types)
        paths.append("event_types")
    if thresholds is not None:
        endpoint.thresholds.extend(thresholds)
        paths.append("thresholds")
    if description is not None:
        endpoint.description = description
        paths.append("description")
    if disabled is not None:
        endpoint.disabled = disabled
        paths.append("disabled")
    return webhooks_pb2.UpdateWebhookEndpointRequest(
        endpoint=endpoint, update_mask=field_mask_pb2.FieldMask(paths=paths),
        request_id=request_id or "",
    )  # fmt: skip


def list_webhook_deliveries(
    *,
    endpoint_id: str,
    status: WebhookDeliveryStatusName | None,
    page_size: int,
    page_token: str,
) -> webhooks_pb2.ListWebhookDeliveriesRequest:
    return webhooks_pb2.ListWebhookDeliveriesRequest(
        endpoint_id=endpoint_id,
        status=webhooks_pb2.WebhookDeliveryStatus.Value(
            f"WEBHOOK_DELIVERY_STATUS_{(status or 'unspecified').upper()}"
        ),
        page_size=page_size,
        page_token=page_token,
    )
