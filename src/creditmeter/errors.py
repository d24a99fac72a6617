"""Domain errors. Each carries a reason from the proto's ErrorReason enum (without the
ERROR_REASON_ prefix) and metadata; the transport maps each class to a gRPC status code."""

from __future__ import annotations

from collections.abc import Mapping


class CreditError(Exception):
    """Base of every error the server reports to a client."""

    reason = "UNSPECIFIED"

    def __init__(self, message: str, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidRequest(CreditError):
    """One or more fields are invalid."""

    reason = "INVALID_REQUEST"

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        fields = ", ".join(f"{field}: {why}" for field, why in violations)
        super().__init__(
            f"invalid request: {fields}", {"fields": ",".join(f for f, _ in violations)}
        )
        self.violations = violations


class IdempotencyKeyReused(CreditError):
    reason = "IDEMPOTENCY_KEY_REUSED"


class BalanceLimitExceeded(CreditError):
    reason = "BALANCE_LIMIT_EXCEEDED"


class InsufficientCredits(CreditError):
    reason = "INSUFFICIENT_CREDITS"


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


def from_rejection(rejected: Rejected) -> CreditError:
    """The domain error for a storage refusal."""
    cls = _REJECTIONS[rejected.reason]
    return cls(_MESSAGES[rejected.reason], rejected.metadata)
