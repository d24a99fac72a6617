"""The one interceptor of the server: authenticates every call to the credits.v1 services,
checks the key's role, decodes the request (only then: a caller without a valid key never
reaches the decoder), maps domain errors to gRPC status with rich error details
(google.rpc.ErrorInfo, BadRequest), as AIP-193 describes, and counts and times every call
(metrics and a debug access log line).

Nothing but a domain error's own message reaches a client: an undecodable request is
INVALID_ARGUMENT / INVALID_REQUEST, and any other exception is INTERNAL with a generic
message and an incident id that the one log line about it carries too."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from creditmeter import errors, metrics
from creditmeter.constants import ERROR_DOMAIN, UNDECODABLE_LOG_INTERVAL_S
from creditmeter.domain.keys import KeyRing, Principal

log = logging.getLogger(__name__)

PROTECTED_PACKAGE = "credits.v1."

_PRINCIPAL: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")

_STATUS: dict[type[errors.CreditError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UndecodableRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.IdempotencyKeyReused: grpc.StatusCode.INVALID_ARGUMENT,
    errors.BalanceLimitExceeded: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InsufficientCredits: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UsageLimitExceeded: grpc.StatusCode.FAILED_PRECONDITION,
    errors.AccountNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ApiKeyInvalid: grpc.StatusCode.UNAUTHENTICATED,
    errors.RoleNotAllowed: grpc.StatusCode.PERMISSION_DENIED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.LedgerBacklog: grpc.StatusCode.UNAVAILABLE,
    errors.PackNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WebhookEndpointNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WebhookDeliveryNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PurchaseNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LotNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SubscriptionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.PackNotActive: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PurchaseNotPending: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PurchaseNotCompleted: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TrialAlreadyUsed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PaymentReferenceUsed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SessionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.SessionClosed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SessionOutOfSequence: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SessionExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.ResumeTokenExpired: grpc.StatusCode.OUT_OF_RANGE,
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


def _code_of(exc: BaseException | None, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status code name a call ends with, given what escaped the handler (if anything)."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return str(grpc.StatusCode.CANCELLED.name)  # the client went away or its deadline passed
    # context.abort (ours in _abort, after a domain error) leaves the code on the context.
    code = context.code()
    if code is not None:
        return str(code.name if isinstance(code, grpc.StatusCode) else code)
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return str(grpc.StatusCode.UNKNOWN.name)  # grpc's answer to an unhandled exception
    return str(grpc.StatusCode.OK.name)


class _Throttled:
    """Logs at most one WARNING line per interval, saying how many were not logged."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        skipped, self._skipped, self._next = self._skipped, 0, now + self.interval_s
        if skipped:
            log.warning(msg + " (%d more since the last such line)", *args, skipped)
        else:
            log.warning(msg, *args)


_undecodable_log = _Throttled(UNDECODABLE_LOG_INTERVAL_S)


@dataclass(frozen=True)
class Undecodable:
    """An item of a request stream whose bytes are not a valid message: the servicer of a
    client-streaming RPC answers it as a failed item and reads on (Meter)."""

    error: errors.UndecodableRequest


#: Methods whose request streams may yield `Undecodable` items; any other streaming
#: method ends the call with the item's error.
ITEM_TOLERANT_STREAMS = frozenset({"Meter"})


def _decoder(
    deserialize: Callable[[bytes], Any] | None, service: str, method: str
) -> Callable[[bytes], Any]:
    """Decode a request's bytes with its message type, raising UndecodableRequest."""
    type_name = _request_type(deserialize)

    def decode(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except DecodeError as exc:
            utf8 = "UTF-8" in str(exc)
            # No traceback and no request bytes: a line that says what and where.
            _undecodable_log.warning(
                "undecodable %s request to %s/%s (%d bytes)%s",
                type_name, service, method, len(raw), ": invalid UTF-8" if utf8 else "",
            )  # fmt: skip
            raise errors.UndecodableRequest(type_name, utf8) from None

    return decode


def _request_type(deserialize: Callable[[bytes], Any] | None) -> str:
    """The proto full name of what `deserialize` (a generated FromString) decodes."""
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "request"))


async def _internal(
    context: grpc.aio.ServicerContext[Any, Any], service: str, method: str, exc: Exception
) -> None:
    """Answer an unexpected failure as INTERNAL with a generic message; the detail goes to
    one log line (the traceback only at DEBUG), tied to the answer by an incident id."""
    incident = secrets.token_hex(6)
    log.error(
        "%s/%s failed unexpectedly (incident %s): %s: %s",
        service, method, incident, type(exc).__name__, exc,
    )  # fmt: skip
    log.debug("incident %s traceback", incident, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error (incident {incident}); the server's log has the detail",
    )


def _authorization(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The call's `authorization` metadata value, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None


#: What escapes a handler on purpose: an abort already carries its status, and a
#: cancelled call has none to send.
_PASS_THROUGH = (grpc.aio.AbortError, asyncio.CancelledError)


class _Guard:
    """What the interceptor does around one method's calls: built once per method (its
    names, decoder and metric children), so a call pays only for its own work."""

    def __init__(
        self,
        keyring: Callable[[], KeyRing],
        service: str,
        operation: str,
        deserialize: Callable[[bytes], Any] | None,
    ) -> None:
        self.keyring = keyring
        self.service = service
        self.operation = operation
        self.decode = _decoder(deserialize, service, operation)
        self.record = metrics.rpc_recorder(service, operation)

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The caller of a verified key (raises ApiKeyInvalid)."""
        return self.keyring().authenticate(_authorization(context))

    def observe(
        self,
        start: float,
        escaped: BaseException | None,
        context: grpc.aio.ServicerContext[Any, Any],
        who: Principal | None,
    ) -> None:
        """Count and time one call, from its start to its status (a stream: to its end)."""
        seconds = time.perf_counter() - start
        code = _code_of(escaped, context)
        self.record(code, seconds)
        if log.isEnabledFor(logging.DEBUG):  # the hot path pays nothing when it is off
            # Only names and numbers: never the request, its metadata or the API key.
            log.debug(
                "%s/%s %s %.1f ms",
                self.service,
                self.operation,
                code,
                seconds * 1000,
                extra={
                    "rpc_service": self.service,
                    "rpc_method": self.operation,
                    "code": code,
                    "duration_ms": round(seconds * 1000, 3),
                    "tenant": who.tenant if who else None,
                    "key_id": who.key_id if who else None,
                },
            )

    async def decoded_stream(self, raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for item in raw:
            try:
                yield self.decode(item)
            except errors.UndecodableRequest as error:
                if self.operation not in ITEM_TOLERANT_STREAMS:
                    raise
                yield Undecodable(error)

    def unary(
        self, inner: Callable[..., Awaitable[Any]], streaming: bool
    ) -> Callable[..., Awaitable[Any]]:
        """The behaviour of a method with a single response around `inner`'s."""

        async def behavior(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            start = time.perf_counter()
            who: Principal | None = None
            escaped: BaseException | None = None
            try:
                try:
                    who = self.authenticate(context)  # known to the log line from here
                    who.require(self.operation)
                    token = _PRINCIPAL.set(who)
                    try:
                        request = self.decoded_stream(raw) if streaming else self.decode(raw)
                        return await inner(request, context)
                    finally:
                        _PRINCIPAL.reset(token)
                except errors.CreditError as error:
                    await _abort(context, error)
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await _internal(context, self.service, self.operation, exc)
            except BaseException as exc:
                escaped = exc
                raise
            finally:
                self.observe(start, escaped, context, who)

        return behavior

    def stream(
        self, inner: Callable[..., AsyncIterator[Any]], streaming: bool
    ) -> Callable[..., Any]:
        """The behaviour of a method with a response stream around `inner`'s."""

        async def behavior(
            raw: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            who: Principal | None = None
            escaped: BaseException | None = None
            try:
                try:
                    who = self.authenticate(context)
                    who.require(self.operation)
                    token = _PRINCIPAL.set(who)
                    try:
                        request = self.decoded_stream(raw) if streaming else self.decode(raw)
                        async for response in inner(request, context):
                            yield response
                    finally:
                        _PRINCIPAL.reset(token)
                except errors.CreditError as error:
                    await _abort(context, error)
                except _PASS_THROUGH:
                    raise
                except Exception as exc:
                    await _internal(context, self.service, self.operation, exc)
            except BaseException as exc:
                escaped = exc
                raise
            finally:
                self.observe(start, escaped, context, who)

        return behavior

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` behind the guard. Requests arrive as bytes (no deserializer) and are
        decoded after the key is checked, inside the error mapping."""
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, self.unary, False),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, self.unary, True),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, self.stream, False),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, self.stream, True),
        )
        for attr, make, wrap, streaming in kinds:
            inner = getattr(handler, attr)
            if inner is not None:
                return make(
                    wrap(inner, streaming),
                    request_deserializer=None,
                    response_serializer=handler.response_serializer,
                )
        return handler


class Gatekeeper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates, authorizes, maps errors, and counts and times every credits.v1 RPC."""

    def __init__(self, keyring: Callable[[], KeyRing]) -> None:
        self._keyring = keyring
        #: method -> (the handler grpc found for it, that handler behind the guard). The
        #: servicers register their handlers once, so each is wrapped once, not per call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        if handler is None or not method.startswith("/" + PROTECTED_PACKAGE):
            return handler  # health checking and reflection are open
        service, _, operation = method.lstrip("/").rpartition("/")
        guard = _Guard(self._keyring, service, operation, handler.request_deserializer)
        guarded = guard.wrap(handler)
        self._guarded[method] = (handler, guarded)
        return guarded
