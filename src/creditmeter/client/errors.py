"""The SDK's exceptions: one class per `ErrorReason` of the proto, read off the status
details (`google.rpc.ErrorInfo`, `google.rpc.BadRequest`) of a failed call.

Classes are grouped under a base per gRPC status (NotFound, FailedPrecondition, ...) so a
caller can catch a family (`except NotFound`) or one reason (`except PackNotFound`)."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from creditmeter.constants import ERROR_DOMAIN


class CreditmeterError(Exception):
    """A call that failed: its status code, ErrorInfo reason and metadata, and for invalid
    requests the offending fields."""

    #: The ErrorReason this class stands for (its name without ERROR_REASON_).
    REASON = ""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason or self.REASON
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: dict[str, str] = dict(field_violations or {})
        #: How many times the call was sent before giving up with this error.
        self.attempts = attempts

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"


# --- families, by status code --------------------------------------------------------
class InvalidArgument(CreditmeterError):
    """INVALID_ARGUMENT."""


class NotFound(CreditmeterError):
    """NOT_FOUND."""


class FailedPrecondition(CreditmeterError):
    """FAILED_PRECONDITION: the request is valid but the state does not allow it."""


class AlreadyExists(CreditmeterError):
    """ALREADY_EXISTS."""


class Unauthenticated(CreditmeterError):
    """No API key, or one the server does not know."""


class PermissionDenied(CreditmeterError):
    """The key's role does not allow the call."""


class Unavailable(CreditmeterError):
    """The server or one of its backends cannot be reached; retried calls kept failing."""


class DeadlineExceeded(CreditmeterError):
    """The call's deadline passed before the server answered (the outcome is unknown)."""


class Unimplemented(CreditmeterError):
    """The server does not implement this RPC (an older server)."""


class OutOfRange(CreditmeterError):
    """OUT_OF_RANGE."""


# --- one class per ErrorReason -------------------------------------------------------
class InsufficientCredits(FailedPrecondition):
    """The balance cannot cover the charge; nothing was deducted."""

    REASON = "INSUFFICIENT_CREDITS"

    @property
    def balance(self) -> int:
        """The spendable balance when the charge was refused."""
        return int(self.metadata.get("balance", "0"))

    @property
    def required(self) -> int:
        """The credits the charge needed."""
        return int(self.metadata.get("required", "0"))

    @property
    def debt(self) -> int:
        """On an account with a credit line: its debt then (0 otherwise)."""
        return int(self.metadata.get("debt", "0"))

    @property
    def overdraft_limit(self) -> int:
        """On an account with a credit line: its overdraft limit (0 otherwise). The charge
        would have taken the debt past it."""
        return int(self.metadata.get("overdraft_limit", "0"))


class UsageLimitExceeded(FailedPrecondition):
    """The charge would pass a usage limit of the feature for the period; nothing was
    deducted. More credit does not help: the limit resets at `period_end`."""

    REASON = "USAGE_LIMIT_EXCEEDED"

    @property
    def feature(self) -> str:
        return self.metadata.get("feature", "")

    @property
    def period(self) -> str:
        """day, week or month."""
        return self.metadata.get("period", "")

    @property
    def limit(self) -> int:
        return int(self.metadata.get("limit", "0"))

    @property
    def used(self) -> int:
        """Usage counted in the period, in the limit's unit (`unit`: units or credits)."""
        return int(self.metadata.get("used", "0"))

    @property
    def unit(self) -> str:
        return self.metadata.get("unit", "")

    @property
    def period_end(self) -> str:
        """When the period ends and the limit resets (RFC 3339, UTC)."""
        return self.metadata.get("period_end", "")


class IdempotencyKeyReused(InvalidArgument):
    """The request id was used before with different parameters; nothing changed."""

    REASON = "IDEMPOTENCY_KEY_REUSED"

    @property
    def request_id(self) -> str:
        return self.metadata.get("request_id", "")


class InvalidRequest(InvalidArgument):
    """Fields are invalid: `field_violations` maps each to why."""

    REASON = "INVALID_REQUEST"


class BalanceLimitExceeded(InvalidArgument):
    REASON = "BALANCE_LIMIT_EXCEEDED"


class AccountNotFound(NotFound):
    REASON = "ACCOUNT_NOT_FOUND"


class ApiKeyInvalid(Unauthenticated):
    REASON = "API_KEY_INVALID"


class RoleNotAllowed(PermissionDenied):
    REASON = "ROLE_NOT_ALLOWED"


class BackendUnavailable(Unavailable):
    REASON = "BACKEND_UNAVAILABLE"


class LedgerBacklog(Unavailable):
    REASON = "LEDGER_BACKLOG"


class PackNotFound(NotFound):
    REASON = "PACK_NOT_FOUND"


class WebhookEndpointNotFound(NotFound):
    REASON = "WEBHOOK_ENDPOINT_NOT_FOUND"


class WebhookDeliveryNotFound(NotFound):
    REASON = "WEBHOOK_DELIVERY_NOT_FOUND"


class PackNotActive(FailedPrecondition):
    REASON = "PACK_NOT_ACTIVE"


class PurchaseNotFound(NotFound):
    REASON = "PURCHASE_NOT_FOUND"


class PurchaseNotPending(FailedPrecondition):
    REASON = "PURCHASE_NOT_PENDING"


class PurchaseNotCompleted(FailedPrecondition):
    REASON = "PURCHASE_NOT_COMPLETED"


class TrialAlreadyUsed(FailedPrecondition):
    REASON = "TRIAL_ALREADY_USED"


class LotNotFound(NotFound):
    REASON = "LOT_NOT_FOUND"


class PaymentReferenceUsed(FailedPrecondition):
    REASON = "PAYMENT_REFERENCE_USED"


class SubscriptionNotFound(NotFound):
    REASON = "SUBSCRIPTION_NOT_FOUND"


class SessionNotFound(NotFound):
    REASON = "SESSION_NOT_FOUND"


class SessionClosed(FailedPrecondition):
    REASON = "SESSION_CLOSED"


class SessionOutOfSequence(FailedPrecondition):
    REASON = "SESSION_OUT_OF_SEQUENCE"


class SessionExists(AlreadyExists):
    REASON = "SESSION_EXISTS"


class ResumeTokenExpired(OutOfRange):
    REASON = "RESUME_TOKEN_EXPIRED"


#: ErrorReason name (without ERROR_REASON_) -> its exception class.
BY_REASON: dict[str, type[CreditmeterError]] = {
    cls.REASON: cls
    for cls in (
        InsufficientCredits, UsageLimitExceeded, IdempotencyKeyReused, InvalidRequest,
        BalanceLimitExceeded,
        AccountNotFound, ApiKeyInvalid, RoleNotAllowed, BackendUnavailable, LedgerBacklog,
        PackNotFound, PackNotActive, PurchaseNotFound, PurchaseNotPending, PurchaseNotCompleted,
        TrialAlreadyUsed, LotNotFound, PaymentReferenceUsed, SubscriptionNotFound,
        SessionNotFound, SessionClosed, SessionOutOfSequence, SessionExists, ResumeTokenExpired,
        WebhookEndpointNotFound, WebhookDeliveryNotFound,
    )
}  # fmt: skip

#: Status code -> the family raised when no ErrorInfo names a reason (a transport failure,
#: or an error raised by gRPC itself rather than by the server's code).
BY_CODE: dict[grpc.StatusCode, type[CreditmeterError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
}


def from_rpc_error(error: grpc.RpcError, attempts: int = 1) -> CreditmeterError:
    """The exception for a failed call (sync or aio), with the ErrorInfo reason and metadata
    and the BadRequest field violations from its status details."""
    code: grpc.StatusCode = error.code()
    message: str = error.details() or ""
    reason, metadata, violations = "", {}, {}
    # from_call raises ValueError when the rich status contradicts the plain one; a
    # confused server (or proxy) should not hide the original error behind that.
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        status = None
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain in ("", ERROR_DOMAIN):
            reason, metadata = info.reason, dict(info.metadata)
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            violations = {v.field: v.description for v in bad.field_violations}
    cls = BY_REASON.get(reason) or BY_CODE.get(code, CreditmeterError)
    return cls(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        attempts=attempts,
    )
