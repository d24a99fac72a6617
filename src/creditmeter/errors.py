"""Domain errors. Each carries a reason from the proto's ErrorReason enum (without the
ERROR_REASON_ prefix) and metadata; the transport maps each class to a gRPC status code."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import TypeVar

from creditmeter.constants import (
    MAX_REPORTED_VIOLATIONS,
    MAX_VIOLATION_TEXT,
    MAX_VIOLATIONS_TEXT,
    MESSAGE_VIOLATIONS,
)


class CreditError(Exception):
    """Base of every error the server reports to a client."""

    reason = "UNSPECIFIED"

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidRequest(CreditError):
    """One or more fields are invalid.

    However many fields a request gets wrong, what reaches the client is bounded (AIP-193
    with a size limit: the details travel in a trailer, which clients cap at 8 KiB or
    less): at most MAX_REPORTED_VIOLATIONS violations and MAX_VIOLATIONS_TEXT characters
    of them, each cut to MAX_VIOLATION_TEXT, then one "and N more". `violations` keeps
    that bounded list; the message names the first few.
    """

    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[tuple[str, str]], message: str | None = None) -> None:
        shown: list[tuple[str, str]] = []
        budget = MAX_VIOLATIONS_TEXT
        for field, why in violations[:MAX_REPORTED_VIOLATIONS]:
            item = (_cut(field), _cut(why))
            budget -= len(item[0]) + len(item[1])
            if budget < 0:
                break
            shown.append(item)
        more = len(violations) - len(shown)
        listed = "; ".join(
            f"{field}: {why}" if field else why for field, why in shown[:MESSAGE_VIOLATIONS]
        )
        if len(violations) > MESSAGE_VIOLATIONS:
            listed += f" (and {len(violations) - MESSAGE_VIOLATIONS} more)"
        if more > 0:
            shown.append(("", f"and {more} more"))
        metadata = {"fields": ",".join(f for f, _ in shown if f)}
        if more > 0:
            metadata["violations"] = str(len(violations))
        super().__init__(message or f"invalid request: {listed}", metadata)
        self.violations = shown


class UndecodableRequest(InvalidRequest):
    """The request's bytes are not a valid message of its type (corrupt wire format, or a
    string field that is not UTF-8). Reported like any invalid request, without details of
    the decoder."""

    def __init__(self, type_name: str, utf8: bool) -> None:
        why = (
            "a string field is not valid UTF-8"
            if utf8
            else f"the bytes are not a valid {type_name} message"
        )
        super().__init__([], f"invalid request: {why}")


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VIOLATION_TEXT else text[: MAX_VIOLATION_TEXT - 3] + "..."


class IdempotencyKeyReused(CreditError):
    reason = "IDEMPOTENCY_KEY_REUSED"


class BalanceLimitExceeded(CreditError):
    reason = "BALANCE_LIMIT_EXCEEDED"


class InsufficientCredits(CreditError):
    reason = "INSUFFICIENT_CREDITS"


class UsageLimitExceeded(CreditError):
    """The charge would pass one of the feature's usage limits for the period."""

    reason = "USAGE_LIMIT_EXCEEDED"


class AccountNotFound(CreditError):
    reason = "ACCOUNT_NOT_FOUND"

    @classmethod
    def of(cls, account_id: str) -> AccountNotFound:
        """The error of every read of an account that has no state anywhere."""
        return cls(f"account {account_id!r} not found", {"account_id": account_id})


class ApiKeyInvalid(CreditError):
    reason = "API_KEY_INVALID"


class RoleNotAllowed(CreditError):
    reason = "ROLE_NOT_ALLOWED"


class BackendUnavailable(CreditError):
    reason = "BACKEND_UNAVAILABLE"


class PackNotFound(CreditError):
    reason = "PACK_NOT_FOUND"


class WebhookEndpointNotFound(CreditError):
    reason = "WEBHOOK_ENDPOINT_NOT_FOUND"


class WebhookDeliveryNotFound(CreditError):
    reason = "WEBHOOK_DELIVERY_NOT_FOUND"


class PackNotActive(CreditError):
    reason = "PACK_NOT_ACTIVE"


class PurchaseNotFound(CreditError):
    reason = "PURCHASE_NOT_FOUND"


class PurchaseNotPending(CreditError):
    reason = "PURCHASE_NOT_PENDING"


class PurchaseNotCompleted(CreditError):
    reason = "PURCHASE_NOT_COMPLETED"


class TrialAlreadyUsed(CreditError):
    reason = "TRIAL_ALREADY_USED"


class LotNotFound(CreditError):
    reason = "LOT_NOT_FOUND"


class PaymentReferenceUsed(CreditError):
    reason = "PAYMENT_REFERENCE_USED"


class SubscriptionNotFound(CreditError):
    reason = "SUBSCRIPTION_NOT_FOUND"


class SessionNotFound(CreditError):
    reason = "SESSION_NOT_FOUND"


class SessionClosed(CreditError):
    reason = "SESSION_CLOSED"


class SessionOutOfSequence(CreditError):
    reason = "SESSION_OUT_OF_SEQUENCE"


class SessionExists(CreditError):
    reason = "SESSION_EXISTS"


class LedgerBacklog(CreditError):
    """The ledger is too far behind: changes are refused until the backlog drains."""

    reason = "LEDGER_BACKLOG"


class ResumeTokenExpired(CreditError):
    """A WatchBalance resume token points before what the outboxes still keep."""

    reason = "RESUME_TOKEN_EXPIRED"


class Rejected(Exception):
    """A storage script refused an operation; `reason` names why (an ErrorReason name)."""

    def __init__(self, reason: str, metadata: Mapping[str, str]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metadata = dict(metadata)


_REJECTIONS: dict[str, type[CreditError]] = {
    cls.reason: cls
    for cls in (
        IdempotencyKeyReused,
        BalanceLimitExceeded,
        InsufficientCredits,
        UsageLimitExceeded,
        PackNotFound,
        PaymentReferenceUsed,
        SessionNotFound,
        SessionClosed,
        SessionOutOfSequence,
        SessionExists,
    )
}
_MESSAGES = {
    "PACK_NOT_FOUND": "no such pack",
    "PAYMENT_REFERENCE_USED": "another purchase was completed with this payment reference",
    "IDEMPOTENCY_KEY_REUSED": "request_id was already used with different parameters",
    "BALANCE_LIMIT_EXCEEDED": "the change would take a balance or total past 2^53-1 credits",
    "INSUFFICIENT_CREDITS": "the balance cannot cover the charge",
    "SESSION_NOT_FOUND": "no such session on this account",
    "SESSION_CLOSED": "the session has ended",
    "SESSION_OUT_OF_SEQUENCE": "the sequence number is not the next one of the session",
    "SESSION_EXISTS": "a session with this id was started with other parameters",
}


def _iso_ms(ms: str) -> str:
    return datetime.fromtimestamp(int(ms) / 1000, UTC).isoformat().replace("+00:00", "Z")


def from_rejection(rejected: Rejected) -> CreditError:
    """The domain error for a storage refusal."""
    if rejected.reason == UsageLimitExceeded.reason:
        m = dict(rejected.metadata)
        m["period_end"] = _iso_ms(m["period_end"])
        return UsageLimitExceeded(
            f"the charge would pass the usage limit of {m['feature']!r}: {m['limit']}"
            f" {m['unit']} a {m['period']}, {m['used']} used, {m['reserved']} reserved by"
            f" open sessions, {m['required']} more asked (the period ends {m['period_end']})",
            m,
        )
    cls = _REJECTIONS[rejected.reason]
    return cls(_MESSAGES[rejected.reason], rejected.metadata)


T = TypeVar("T")


async def applied(call: Awaitable[T]) -> T:
    """Await a storage call, turning its refusal (Rejected) into the domain error: the one
    place the domain writes `except Rejected: raise from_rejection(...)`."""
    try:
        return await call
    except Rejected as rejected:
        raise from_rejection(rejected) from None
