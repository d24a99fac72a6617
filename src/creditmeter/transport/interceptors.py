"""The one interceptor of the server: authenticates every call to the credits.v1 services,
checks the key's role, and maps domain errors to gRPC status with rich error details
(google.rpc.ErrorInfo, BadRequest), as AIP-193 describes."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from creditmeter import errors
from creditmeter.constants import ERROR_DOMAIN
from creditmeter.domain.keys import KeyRing, Principal

log = logging.getLogger(__name__)

PROTECTED_PACKAGE = "credits.v1."

_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

_STATUS: dict[type[errors.CreditError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyReused: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BalanceLimitExceeded: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientCredits: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ApiKeyInvalid: grpc.StatusCode.UNAUTHENTICATED,
    errors.RoleNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.LedgerBacklog: grpc.StatusCode.UNAVAILABLE,
    errors.PackNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PurchaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LotNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SubscriptionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PackNotActive: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PurchaseNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PurchaseNotCompleted: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TrialAlreadyUsed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PaymentReferenceUsed: grpc.StatusCode.FAILED_PRECONDITION,
}


def principal() -> Principal:
    """The verified caller of the current RPC."""
    return _PRINCIPAL.get()


@dataclass(frozen=True)
class ErrorParts:
    """How a domain error is reported: what a failed call's status carries, and what a
    failed item of ConsumeBatch or Meter carries in its ConsumeError."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str]
    #: (field, why) for INVALID_REQUEST, else empty.
    violations: list[tuple[str, str]]

    @property
    def rpc_code(self) -> int:
        """The google.rpc.Code number of `code`."""
        return int(getattr(code_pb2, self.code.name))


def describe(error: errors.CreditError) -> ErrorParts:
    """The status code, reason, message, metadata and field violations of a domain error."""
    return ErrorParts(
        code=_STATUS.get(type(error), grpc.StatusCode.INTERNAL),
        reason=error.reason,
        message=error.message,
        metadata=dict(error.metadata),
        violations=list(error.violations) if isinstance(error, errors.InvalidRequest) else [],
    )


def to_status(error: errors.CreditError) -> grpc.Status:
    """The gRPC status, with ErrorInfo (and BadRequest) details, for a domain error."""
    parts = describe(error)
    details = []
    info = error_details_pb2.ErrorInfo(
        reason=parts.reason, domain=ERROR_DOMAIN, metadata=parts.metadata
    )
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)
    if parts.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in parts.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=parts.rpc_code, message=parts.message, details=details)
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.CreditError) -> None:
    status = to_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


class Gatekeeper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates, authorizes and maps errors for every credits.v1 RPC."""

    def __init__(self, keyring: Callable[[], KeyRing]) -> None:
        self._keyring = keyring

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith("/" + PROTECTED_PACKAGE):
            return handler  # health checking and reflection are open
        operation = method.rsplit("/", 1)[-1]
        authorization = next(
            (str(v) for k, v in details.invocation_metadata or () if k == "authorization"), None
        )

        def enter() -> contextvars.Token[Principal]:
            who = self._keyring().authenticate(authorization)
            who.require(operation)
            return _PRINCIPAL.set(who)

        def wrap_unary(inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    token = enter()
                    try:
                        return await inner(request, context)
                    finally:
                        _PRINCIPAL.reset(token)
                except errors.CreditError as error:
                    await _abort(context, error)

            return behavior

        def wrap_stream(inner: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
            async def behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    token = enter()
                    try:
                        async for response in inner(request, context):
                            yield response
                    finally:
                        _PRINCIPAL.reset(token)
                except errors.CreditError as error:
                    await _abort(context, error)

            return behavior

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, wrap_unary),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, wrap_unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, wrap_stream),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, wrap_stream),
        )
        for attr, make, wrap in kinds:
            inner = getattr(handler, attr)
            if inner is not None:
                return make(
                    wrap(inner),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler
