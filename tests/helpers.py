"""Reading rich error details off a failed call; a model of Consume's outcomes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.constants import ACCOUNT_ID_PATTERN


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


@dataclass
class ConsumeModel:
    """What a sequence of Consume calls must return, computed independently of the server:
    balances per account, idempotency per (account, request id), refusals not stored.

    `expect(request)` gives, for one ConsumeRequest of the built-in `text` feature (1 credit
    per message), ("ok", amount, balance after), ("replay", index of the original), or
    ("error", code, reason, metadata). `record(i, response)` stores the reply of call i, so
    replays can be compared with it byte for byte.
    """

    balances: dict[str, int]
    #: (account, request id) -> (parameters, index of the call that succeeded)
    done: dict[tuple[str, str], tuple[tuple[object, ...], int]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def expect(self, request: pb.ConsumeRequest) -> tuple[object, ...]:
        index = self.calls
        self.calls += 1
        account, request_id = request.account_id, request.request_id
        params = (
            request.feature,
            request.quantity if request.HasField("quantity") else None,
            request.amount if request.HasField("amount") else None,
        )
        if (
            not re.fullmatch(ACCOUNT_ID_PATTERN, account)
            or not request_id
            or (request.feature != "text")
        ):
            return ("error", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", None)
        earlier = self.done.get((account, request_id))
        if earlier is not None:
            if earlier[0] == params:
                return ("replay", earlier[1])
            return ("error", grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED", None)
        amount = params[2] if params[2] is not None else (params[1] or 1)
        balance = self.balances.get(account, 0)
        if balance < amount:
            metadata = {"balance": str(balance), "required": str(amount)}
            return ("error", grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_CREDITS", metadata)
        self.balances[account] = balance - amount
        self.used[account] = self.used.get(account, 0) + amount
        self.done[(account, request_id)] = (params, index)
        return ("ok", amount, balance - amount)


def assert_outcomes(
    requests: list[Any], expected: list[tuple[object, ...]], results: list[Any]
) -> None:
    """Each ConsumeResult is what ConsumeModel expected for the request at its position."""
    assert len(results) == len(requests) == len(expected)
    for i, (request, want, result) in enumerate(zip(requests, expected, results, strict=True)):
        assert result.request_id == request.request_id, i
        kind = result.WhichOneof("outcome")
        if want[0] == "ok":
            assert kind == "response", (i, want, result)
            r = result.response
            assert (r.amount, r.balance, r.feature) == (want[1], want[2], "text"), (i, r)
            assert r.transaction_id and sum(c.amount for c in r.charges) == want[1], (i, r)
        elif want[0] == "replay":
            original = results[int(str(want[1]))]
            assert kind == "response", (i, want, result)
            assert result.response == original.response, i  # the same transaction, replayed
        else:
            _, code, reason, metadata = want
            assert kind == "error", (i, want, result)
            e = result.error
            assert isinstance(code, grpc.StatusCode)
            assert (e.code, e.reason) == (getattr(code_pb2, code.name), reason), (i, e)
            assert e.message, i
            if metadata is not None:
                assert dict(e.metadata) == metadata, (i, e)
            if reason == "INVALID_REQUEST":
                assert e.field_violations and all(e.field_violations.values()), (i, e)
                assert set(e.metadata["fields"].split(",")) == set(e.field_violations), (i, e)
            else:
                assert not e.field_violations, (i, e)
