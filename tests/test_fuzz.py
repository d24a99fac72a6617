"""Fuzz every unary RPC of credits.v1 over real gRPC: random and mutated requests built
from the descriptors, wire-level garbage, huge and negative numbers, long and non-ASCII
strings, ids full of ':' and '%'. No answer may be UNKNOWN or INTERNAL, none may name a
Python class, and afterwards the audit finds every account's Redis state equal to its
ledger."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message as pbm
from google.protobuf.message_factory import GetMessageClass

from creditmeter.api.credits.v1 import credits_pb2, packs_pb2
from creditmeter.domain.recovery import Recovery
from creditmeter.storage.ledger.flusher import drain
from creditmeter.storage.redis_store import RedisStore
from creditmeter.transport.server import App
from tests.conftest import Tenant

SEEDS = range(4)
PER_METHOD = 60
FORBIDDEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
PYTHON_NAMES = ("Traceback", "Error parsing", "class '", "redis.", "google.protobuf", "cm:{b")

#: A few accounts and ids many requests share, so that fuzzed calls also meet state.
ACCOUNTS = ["alice", "bob:1", "carol@x.example", "e:idem:f", "lots:acct", ""]
#: Invalid ones too.
BAD_ACCOUNTS = ["d%", "{b01}", "a|b", "x" * 129]
STRINGS = [
    "", "text", "voice", "a" * 129, "x" * 10_000, "é" * 40, "日本語", "\U0001f600" * 3,
    ":", "%3A", "%", "{b01}", "a|b", "null\x00byte", " ", "sip:call-1@pbx.example",
    "USD", "pack_00000000000deadbeef", "pur_1", "lot_1", "sub_1",
]  # fmt: skip
INTS = [0, 1, -1, 2, 60, 1000, 2**31, 2**32 + 1, 2**53 - 1, 2**53, 2**62, 2**63 - 1, -(2**63)]


def methods() -> Iterator[tuple[str, str, type[pbm.Message]]]:
    """(service, method, request class) of every unary-unary RPC."""
    for module in (credits_pb2, packs_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                if not m.client_streaming and not m.server_streaming:
                    yield service.full_name, m.name, GetMessageClass(m.input_type)


def scalar(f: d.FieldDescriptor, rng: random.Random) -> Any:
    t = f.type
    if t == d.FieldDescriptor.TYPE_STRING:
        if f.name.endswith("account_id"):
            return rng.choice(ACCOUNTS if rng.random() < 0.85 else BAD_ACCOUNTS)
        # Plausible values half the time, so that calls get past validation.
        if f.name == "request_id" and rng.random() < 0.7:
            return f"r:{rng.getrandbits(32)}"
        if f.name == "feature" and rng.random() < 0.7:
            return rng.choice(["text", "voice", "video"])
        if f.name == "currency" and rng.random() < 0.7:
            return "USD"
        return rng.choice(STRINGS) if rng.random() < 0.8 else rng.choice(ACCOUNTS)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if t == d.FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in f.enum_type.values]
        return rng.choice([*numbers, 99, -5, 2**31 - 1])
    if t == d.FieldDescriptor.TYPE_BYTES:
        return rng.randbytes(rng.randint(0, 40))
    if t in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return rng.choice([0.0, -1.5, 1e300, float("nan")])
    value = rng.choice(INTS) if rng.random() < 0.5 else rng.randint(1, 100)
    unsigned = t in (
        d.FieldDescriptor.TYPE_UINT32, d.FieldDescriptor.TYPE_UINT64,
        d.FieldDescriptor.TYPE_FIXED32, d.FieldDescriptor.TYPE_FIXED64,
    )  # fmt: skip
    bits = 32 if t in (
        d.FieldDescriptor.TYPE_INT32, d.FieldDescriptor.TYPE_SINT32,
        d.FieldDescriptor.TYPE_SFIXED32, d.FieldDescriptor.TYPE_UINT32,
        d.FieldDescriptor.TYPE_FIXED32,
    ) else 64  # fmt: skip
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return min(max(value, low), high)


def fill(msg: pbm.Message, rng: random.Random, depth: int = 0) -> None:
    """Set a random subset of a message's fields to random (often invalid) values."""
    for f in msg.DESCRIPTOR.fields:
        if rng.random() < 0.35:
            continue
        repeated = f.is_repeated
        count = rng.choice([0, 1, 2, 5, 70, 1500]) if repeated else 1
        if f.type == d.FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if f.message_type.GetOptions().map_entry:
                continue
            for _ in range(count if repeated else 1):
                child = getattr(msg, f.name).add() if repeated else getattr(msg, f.name)
                if rng.random() < 0.8:
                    fill(child, rng, depth + 1)
                elif not repeated:
                    child.SetInParent()
            continue
        values = [scalar(f, rng) for _ in range(count)]
        try:
            if repeated:
                getattr(msg, f.name).extend(values)
            else:
                setattr(msg, f.name, values[0])
        except (ValueError, TypeError):
            continue  # a value the Python runtime itself refuses (the wire test covers it)


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """Flip, cut, duplicate or splice bytes of a serialized request."""
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1 and data:
            del data[rng.randrange(len(data)) :]
        elif op == 2:
            data += data[: rng.randint(0, len(data))]
        else:
            at = rng.randint(0, len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def requests(cls: type[pbm.Message], rng: random.Random) -> Iterator[bytes]:
    for i in range(PER_METHOD):
        msg = cls()
        fill(msg, rng)
        raw = msg.SerializeToString()
        kind = i % 5
        if kind == 3:
            raw = mutate(raw, rng)
        elif kind == 4:
            raw = rng.randbytes(rng.randint(0, 64))
        yield raw


@pytest.mark.flusher
@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", SEEDS)
async def test_fuzz_every_unary_rpc(app: App, tenant: Tenant, seed: int) -> None:
    rng = random.Random(seed)
    # Some state for the fuzzed calls to meet.
    for account in ACCOUNTS[:-1]:
        await tenant.admin.Grant(
            credits_pb2.GrantRequest(account_id=account, amount=1000, request_id=f"seed-{account}")
        )
    seen: dict[str, int] = {}
    for service, method, cls in methods():
        call = tenant.channel.unary_unary(f"/{service}/{method}")
        for raw in requests(cls, rng):
            try:
                await call(raw, metadata=tenant.admin.metadata, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
                text = error.details() or ""
                assert code not in FORBIDDEN, (method, raw.hex()[:200], code, text)
                assert not any(n in text for n in PYTHON_NAMES), (method, text)
            seen[code.name] = seen.get(code.name, 0) + 1
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > 0, seen

    # Nothing the fuzz did left Redis and the ledger apart.
    assert app.ledger is not None and app.redis is not None
    flusher = app.flusher
    assert flusher is not None
    await drain(flusher, 30)
    await asyncio.sleep(0)
    checked, drifts = await Recovery(app.ledger, RedisStore(app.redis)).audit(tenant.name, 5.0)
    assert checked >= len(ACCOUNTS) - 1 and drifts == [], drifts
