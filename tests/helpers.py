"""Reading rich error details off a failed call."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)


def failure(error: grpc.aio.AioRpcError) -> Failure:
    """The status code, ErrorInfo and BadRequest field violations of a failed call."""
    result = Failure(error.code(), error.details() or "")
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            result.reason, result.domain = info.reason, info.domain
            result.metadata = dict(info.metadata)
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            result.violations = {v.field: v.description for v in bad.field_violations}
    return result


async def fails(call: object) -> Failure:
    """Await a call that must fail, and describe how it failed."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return failure(error)
    raise AssertionError("the call succeeded but was expected to fail")
