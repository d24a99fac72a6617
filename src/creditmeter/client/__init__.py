"""The creditmeter Python SDK: typed sync (`Client`) and asyncio (`AsyncClient`) clients
with API-key auth, deadlines, retries with stable request ids, exceptions per error reason,
and a call-session helper.

    from creditmeter.client import Client, InsufficientCredits

    with Client("127.0.0.1:50051", api_key) as client:
        client.consume("alice", "text", quantity=1)
"""

from creditmeter.client import errors
from creditmeter.client.aio import AsyncClient
from creditmeter.client.errors import (
    BY_REASON,
    AccountNotFound,
    AlreadyExists,
    ApiKeyInvalid,
    BackendUnavailable,
    BalanceLimitExceeded,
    CreditmeterError,
    DeadlineExceeded,
    FailedPrecondition,
    IdempotencyKeyReused,
    InsufficientCredits,
    InvalidArgument,
    InvalidRequest,
    LedgerBacklog,
    LotNotFound,
    NotFound,
    OutOfRange,
    PackNotActive,
    PackNotFound,
    PaymentReferenceUsed,
    PermissionDenied,
    PurchaseNotCompleted,
    PurchaseNotFound,
    PurchaseNotPending,
    ResumeTokenExpired,
    RoleNotAllowed,
    SessionClosed,
    SessionExists,
    SessionNotFound,
    SessionOutOfSequence,
    SubscriptionNotFound,
    TrialAlreadyUsed,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    UsageLimitExceeded,
    from_rpc_error,
)
from creditmeter.client.requests import check as check_request
from creditmeter.client.retry import NO_RETRY, RetryPolicy
from creditmeter.client.sessions import AsyncCallSession, CallSession, SessionMeter
from creditmeter.client.sync import Client

__all__ = [
    "BY_REASON",
    "NO_RETRY",
    "AccountNotFound",
    "AlreadyExists",
    "ApiKeyInvalid",
    "AsyncCallSession",
    "AsyncClient",
    "BackendUnavailable",
    "BalanceLimitExceeded",
    "CallSession",
    "Client",
    "CreditmeterError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IdempotencyKeyReused",
    "InsufficientCredits",
    "InvalidArgument",
    "InvalidRequest",
    "LedgerBacklog",
    "LotNotFound",
    "NotFound",
    "OutOfRange",
    "PackNotActive",
    "PackNotFound",
    "PaymentReferenceUsed",
    "PermissionDenied",
    "PurchaseNotCompleted",
    "PurchaseNotFound",
    "PurchaseNotPending",
    "ResumeTokenExpired",
    "RetryPolicy",
    "RoleNotAllowed",
    "SessionClosed",
    "SessionExists",
    "SessionMeter",
    "SessionNotFound",
    "SessionOutOfSequence",
    "SubscriptionNotFound",
    "TrialAlreadyUsed",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UsageLimitExceeded",
    "check_request",
    "errors",
    "from_rpc_error",
]
