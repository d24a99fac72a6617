"""What a client in another language really sends: undecodable bytes, invalid UTF-8, huge
repeated fields, adversarial ids. Every such request gets a clean answer over real gRPC,
and no id reaches another id's Redis keys."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2, packs_pb2_grpc
from creditmeter.constants import MAX_REPORTED_VIOLATIONS
from creditmeter.storage.layout import (
    AccountKeys,
    ParsedKey,
    bucket_of,
    bucket_tag,
    component,
    legacy,
    parse,
    uncomponent,
)
from tests.conftest import Tenant, rid
from tests.helpers import Failure, fails, failure

#: A string cut in the middle of an emoji: a lone high surrogate, as grpc-js encodes it
#: (the three bytes of U+D83D in UTF-8, which no valid UTF-8 string contains).
LONE_SURROGATE = b"\xed\xa0\xbd"
PYTHON_NAMES = ("DecodeError", "google.protobuf", "Traceback", "Error parsing", "Exception")


def raw_unary(tenant: Tenant, service: str, method: str) -> Any:
    """A generic unary call sending and receiving bytes (identity serializers)."""
    return tenant.channel.unary_unary(f"/credits.v1.{service}/{method}")


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2) with a short payload."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


async def raw_fails(tenant: Tenant, method: str, body: bytes, key: str | None) -> Failure:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return await fails(raw_unary(tenant, "Credits", method)(body, metadata=metadata))


def assert_clean_invalid(f: Failure) -> None:
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT, f
    assert f.reason == "INVALID_REQUEST" and f.domain == "creditmeter"
    assert not any(name in f.message for name in PYTHON_NAMES), f.message


# --- 1. undecodable requests ------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("GetBalance", b"\xff\xff\xff"),
        ("Consume", b"\x0a\x05ab"),  # a field longer than the bytes that follow
        ("GetBalance", field(1, b"alice" + LONE_SURROGATE)),
        ("Grant", field(1, LONE_SURROGATE) + b"\x10\x0a" + field(8, b"r-1")),
    ],
    ids=["garbage", "truncated", "utf8-read", "utf8-write"],
)
async def test_undecodable_request_is_invalid_argument(
    tenant: Tenant, method: str, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="creditmeter"):
        f = await raw_fails(tenant, method, body, tenant.admin.key)
    assert_clean_invalid(f)
    if body.endswith(LONE_SURROGATE) or LONE_SURROGATE in body:
        assert "UTF-8" in f.message
    # At most one line, at WARNING, and never a traceback.
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) <= 1 and all(r.levelno == logging.WARNING for r in lines)
    assert not any(r.exc_info for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


async def test_undecodable_request_without_key_is_unauthenticated(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    """The key is checked before the body is decoded: a caller without one learns
    nothing about the decoder, and writes nothing to the log."""
    with caplog.at_level(logging.DEBUG, logger="creditmeter"):
        for key in (None, "cm_bogus_key"):
            f = await raw_fails(tenant, "GetBalance", b"\xff\xff\xff", key)
            assert f.code == grpc.StatusCode.UNAUTHENTICATED and f.reason == "API_KEY_INVALID"
    assert not [r for r in caplog.records if "undecodable" in r.getMessage()]


async def test_undecodable_requests_are_logged_at_most_once_per_interval(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="creditmeter"):
        for _ in range(20):
            assert_clean_invalid(
                await raw_fails(tenant, "GetBalance", b"\xff\xff\xff", tenant.read.key)
            )
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) <= 1


async def test_meter_answers_an_undecodable_item_and_goes_on(tenant: Tenant) -> None:
    account = f"m-{uuid.uuid4().hex[:8]}"
    await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=10, request_id=rid()))
    good = [
        pb.MeterRequest(
            consume=pb.ConsumeRequest(account_id=account, feature="text", request_id=rid())
        ).SerializeToString()
        for _ in range(3)
    ]
    bad_utf8 = field(1, field(1, LONE_SURROGATE) + field(2, b"text") + field(5, b"r-x"))
    items = [good[0], b"\xff\xff\xff", good[1], bad_utf8, good[2]]

    async def send() -> AsyncIterator[bytes]:
        for item in items:
            yield item

    call = tenant.channel.stream_stream("/credits.v1.Credits/Meter")(
        send(), metadata=tenant.meter.metadata
    )
    results = [pb.MeterResponse.FromString(raw).result async for raw in call]
    assert await call.code() == grpc.StatusCode.OK
    assert [r.WhichOneof("outcome") for r in results] == [
        "response", "error", "response", "error", "response",
    ]  # fmt: skip
    for r in (results[1], results[3]):
        assert r.error.reason == "INVALID_REQUEST"
        assert r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert not any(name in r.error.message for name in PYTHON_NAMES)
    assert [r.response.balance for r in results if r.HasField("response")] == [9, 8, 7]


# --- 2. error details have a size bound ---------------------------------------------------
def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """The size of what the error carries in metadata: message and status details."""
    size = len((error.details() or "").encode())
    for key, value in error.trailing_metadata() or ():
        size += len(key) + len(value if isinstance(value, bytes) else value.encode())
    return size


def bad_requests(tenant: Tenant) -> list[tuple[str, Any]]:
    """The worst case of every repeated request field: far more entries than allowed,
    each invalid on its own."""
    packs = packs_pb2_grpc.PacksStub(tenant.channel)
    filter_ = pb.TransactionFilter(
        features=[f"Bad-{i}" for i in range(1001)], kinds=[999] * 1001
    )
    return [
        ("ListTransactions.filter",
         tenant.read.ListTransactions(
             pb.ListTransactionsRequest(account_id="a", filter=filter_))),
        ("ListTransactions.features only",
         tenant.read.ListTransactions(pb.ListTransactionsRequest(
             account_id="a", filter=pb.TransactionFilter(
                 features=[f"x{i}" for i in range(10)] + ["!" * 2000] * 60)))),
        ("UpdatePack.update_mask",
         packs.UpdatePack(
             packs_pb2.UpdatePackRequest(
                 pack=packs_pb2.Pack(pack_id="pack_x"),
                 update_mask=field_mask_pb2.FieldMask(paths=["p" * 200] * 1001),
                 request_id=rid()),
             metadata=tenant.admin.metadata)),
        ("ConsumeBatch.items",
         tenant.meter.ConsumeBatch(pb.ConsumeBatchRequest(
             items=[pb.ConsumeRequest(account_id="a", feature="text", request_id=rid())] * 1001
         ))),
    ]  # fmt: skip


async def test_error_details_stay_small_with_default_client_limits(tenant: Tenant) -> None:
    """A client with default limits (grpcio: 8 KiB of metadata) gets the ErrorInfo of the
    worst request, and a bounded BadRequest."""
    for name, call in bad_requests(tenant):
        try:
            await call
        except grpc.aio.AioRpcError as error:
            f = failure(error)
            assert f.code == grpc.StatusCode.INVALID_ARGUMENT, (name, f)
            assert f.reason == "INVALID_REQUEST", name
            size = trailer_bytes(error)
            assert size < 4096, (name, size)
            status = status_pb2.Status.FromString(
                dict(error.trailing_metadata())["grpc-status-details-bin"]
            )
            bad = error_details_pb2.BadRequest()
            assert any(d.Unpack(bad) for d in status.details), name
            assert 1 <= len(bad.field_violations) <= MAX_REPORTED_VIOLATIONS + 1, name
        else:
            raise AssertionError(f"{name} succeeded")


async def test_too_many_entries_is_one_violation(tenant: Tenant) -> None:
    f = await fails(
        tenant.read.ListTransactions(
            pb.ListTransactionsRequest(
                account_id="a",
                filter=pb.TransactionFilter(features=["Bad"] * 65, kinds=[999] * 17),
            )
        )
    )
    assert f.violations == {
        "filter.features": "at most 64 features",
        "filter.kinds": "at most 16 kinds",
    }


async def test_many_violations_end_with_and_n_more(tenant: Tenant) -> None:
    f = await fails(
        tenant.read.ListTransactions(
            pb.ListTransactionsRequest(
                account_id="a", filter=pb.TransactionFilter(features=["Bad"] * 64)
            )
        )
    )
    assert len(f.violations) == MAX_REPORTED_VIOLATIONS + 1
    assert f.violations[""] == f"and {64 - MAX_REPORTED_VIOLATIONS} more"
    assert f.metadata["violations"] == "64"


# --- 4. every offending field, every time -------------------------------------------------
async def test_unknown_enum_values_do_not_stop_validation(tenant: Tenant) -> None:
    packs = packs_pb2_grpc.PacksStub(tenant.channel)
    cases: list[tuple[Any, set[str]]] = [
        (packs.CreatePack(
            packs_pb2.CreatePackRequest(
                pack=packs_pb2.Pack(name="", credits=0, recurrence=9), request_id=rid()),
            metadata=tenant.admin.metadata),
         {"pack.name", "pack.credits", "pack.recurrence", "pack.price.currency"}),
        (tenant.admin.Grant(pb.GrantRequest(account_id="", amount=0, source=99, request_id="")),
         {"account_id", "amount", "source", "request_id"}),
        (tenant.admin.SetRate(pb.SetRateRequest(
            rate=pb.Rate(feature="", credits_per_unit=0, unit=7), request_id="")),
         {"rate.feature", "rate.credits_per_unit", "rate.unit", "request_id"}),
        (tenant.meter.StartSession(pb.StartSessionRequest(
            account_id="", feature="", session_id="", timeout_policy=42)),
         {"account_id", "feature", "session_id", "timeout_policy"}),
        (tenant.read.ListTransactions(pb.ListTransactionsRequest(
            account_id="", page_size=-1, filter=pb.TransactionFilter(kinds=[99], features=["X"]))),
         {"account_id", "page_size", "filter.kinds[0]", "filter.features[0]"}),
        (packs.ListPurchases(
            packs_pb2.ListPurchasesRequest(status=77, page_size=-1),
            metadata=tenant.read.metadata),
         {"status", "page_size"}),
        (tenant.read.GetUsageReport(pb.GetUsageReportRequest(group_by=5, feature="X")),
         {"group_by", "feature", "start_time", "end_time"}),
        (packs.PurchasePack(
            packs_pb2.PurchasePackRequest(
                account_id="{bad}", pack_id="", payment_reference="r" * 257, request_id=rid()),
            metadata=tenant.admin.metadata),
         {"account_id", "pack_id", "payment_reference"}),
    ]  # fmt: skip
    for call, fields in cases:
        f = await fails(call)
        assert f.code == grpc.StatusCode.INVALID_ARGUMENT
        assert set(f.violations) == fields, (fields, f.violations)


# --- 3. ids cannot reach each other's keys ------------------------------------------------
async def balance(tenant: Tenant, account: str) -> int:
    return (await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))).balance


def same_bucket(tenant: str, account: str, suffix: str) -> str:
    """`account` with a number appended such that it and it + `suffix` share a bucket: the
    only case in which the keys of 0.1.0 could collide (the issue's k8, k171, k27)."""
    for n in range(10_000):
        candidate = f"{account}{n}"
        if bucket_of(tenant, candidate) == bucket_of(tenant, candidate + suffix):
            return candidate
    raise AssertionError("no such number")


async def test_colliding_ids_of_the_issue(tenant: Tenant) -> None:
    admin, meter, t = tenant.admin, tenant.meter, tenant.name
    alice = same_bucket(t, "alice", ":idem:k8")
    await admin.Grant(pb.GrantRequest(account_id=f"{alice}:idem:k8", amount=5, request_id=rid()))
    await admin.Grant(pb.GrantRequest(account_id=alice, amount=7, request_id="k8:lots"))
    assert (await balance(tenant, f"{alice}:idem:k8"), await balance(tenant, alice)) == (5, 7)

    alice2 = same_bucket(t, "alice2-", ":idem:k171")
    await admin.Grant(pb.GrantRequest(account_id=alice2, amount=3, request_id="k171:acct"))
    await admin.Grant(
        pb.GrantRequest(account_id=f"{alice2}:idem:k171", amount=4, request_id=rid())
    )
    assert (await balance(tenant, alice2), await balance(tenant, f"{alice2}:idem:k171")) == (3, 4)

    victim = same_bucket(t, "victim", ":idem:k27")
    for account in (victim, f"{victim}:idem:k27"):
        await admin.Grant(pb.GrantRequest(account_id=account, amount=10, request_id=rid()))
    await meter.Consume(
        pb.ConsumeRequest(account_id=victim, feature="text", request_id="k27:idem:zz")
    )
    reply = await meter.Consume(
        pb.ConsumeRequest(account_id=f"{victim}:idem:k27", feature="text", request_id="zz")
    )
    assert reply.balance == 9 and await balance(tenant, victim) == 9


ID_ALPHABET = st.sampled_from(
    [":", "%", "3A", "25", "%3A", "%25", "idem", "lots", "acct", "sess", "rem", "a", "{", "}"]
)
ADVERSARIAL = st.lists(ID_ALPHABET, min_size=1, max_size=6).map("".join)
V2_KINDS = ("lots", "rem", "order", "exp", "acct")


@given(
    tenant=st.sampled_from(["t1", "t-2", "t_3"]),
    account=ADVERSARIAL,
    request_id=ADVERSARIAL,
    session_id=ADVERSARIAL,
)
def test_key_layout_round_trips(
    tenant: str, account: str, request_id: str, session_id: str
) -> None:
    """Every key names exactly one (tenant, account, kind, id): parse inverts the layout,
    so no two different tuples share a key."""
    keys = AccountKeys(tenant, account)
    assert uncomponent(component(account)) == account
    for kind, key in [("a", keys.account_key), *((k, f"{keys.base}:{k}") for k in V2_KINDS)]:
        parsed = parse(key)
        assert parsed is not None and (parsed.keys, parsed.kind, parsed.id) == (keys, kind, "")
    idem = parse(keys.idempotency_key(request_id))
    sess = parse(keys.session_key(session_id))
    assert idem is not None and (idem.keys, idem.kind, idem.id) == (keys, "idem", request_id)
    assert sess is not None and (sess.keys, sess.kind, sess.id) == (keys, "sess", session_id)


@given(a=st.tuples(ADVERSARIAL, ADVERSARIAL), b=st.tuples(ADVERSARIAL, ADVERSARIAL))
def test_different_ids_never_share_a_key(a: tuple[str, str], b: tuple[str, str]) -> None:
    ka = set(AccountKeys("t", a[0]).script_keys(a[1])[:2]) | {
        AccountKeys("t", a[0]).session_key(a[1])
    }
    kb = set(AccountKeys("t", b[0]).script_keys(b[1])[:2]) | {
        AccountKeys("t", b[0]).session_key(b[1])
    }
    if a != b:
        # Same account, other request: only the account's own keys are shared.
        shared = ka & kb
        assert shared == ({AccountKeys("t", a[0]).account_key} if a[0] == b[0] else set())


def _joined(*parts: str) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(parts), min_size=1, max_size=4).map("".join)


#: Account ids may hold ':' but not '%'; request ids any printable ASCII.
SERVER_ACCOUNTS = _joined(":", "idem", "lots", "acct", "k", "3A")
SERVER_REQUESTS = _joined(":", "%", "idem", "lots", "acct", "k", "3A", "%3A")
#: What may follow an account's key base: its own keys, another request's record.
TAILS = st.one_of(
    st.sampled_from(["lots", "rem", "order", "exp", "acct"]),
    SERVER_REQUESTS.map(lambda r: f"idem:{r}"),
)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(base=SERVER_ACCOUNTS, middle=SERVER_ACCOUNTS, tail=TAILS, order=st.booleans())
async def test_adversarial_ids_against_the_server(
    tenant: Tenant, base: str, middle: str, tail: str, order: bool
) -> None:
    """Pairs built to collide under plain ':' joining -- account B with request id
    `<middle>:<tail>` against account `B:idem:<middle>`, in one bucket -- stay
    independent: every call answers OK and each balance is its own."""
    b = same_bucket(tenant.name, f"{uuid.uuid4().hex[:6]}{base}", f":idem:{middle}")
    a = f"{b}:idem:{middle}"
    calls = [(b, f"{middle}:{tail}", 3), (a, tail.split(":")[-1] or "r", 5)]
    for account, request_id, amount in calls if order else calls[::-1]:
        reply = await tenant.admin.Grant(
            pb.GrantRequest(account_id=account, amount=amount, request_id=request_id)
        )
        assert reply.balance == amount
        consumed = await tenant.meter.Consume(
            pb.ConsumeRequest(account_id=account, feature="text", request_id=f"{request_id}:c")
        )
        assert consumed.balance == amount - 1
    assert (await balance(tenant, b), await balance(tenant, a)) == (2, 4)


# --- upgrading the keys of 0.1.0 ----------------------------------------------------------
# Keys written by 0.1.0 itself are opened in tests/test_upgrade.py (a data directory made
# by the 0.1.0 code).


def test_legacy_readings_land_in_their_bucket() -> None:
    keys = AccountKeys("t", "a:b")
    old = f"{bucket_tag(keys.bucket)}:t:a:b:idem:x:y"
    readings = legacy(old)
    assert ParsedKey(keys, "idem", "x:y") in readings
    assert all(r.keys.bucket == keys.bucket for r in readings)
    assert legacy("cm:{b00}:outbox") == []


async def test_session_ids_take_what_the_proto_documents(tenant: Tenant) -> None:
    """A SIP URI as session id: start, update, get, end."""
    account, sid = f"sip-{uuid.uuid4().hex[:6]}", "sip:call-1@pbx.example"
    await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=100, request_id=rid()))
    started = await tenant.meter.StartSession(
        pb.StartSessionRequest(account_id=account, feature="voice", session_id=sid)
    )
    assert started.session.session_id == sid
    await tenant.meter.UpdateSession(
        pb.UpdateSessionRequest(account_id=account, session_id=sid, sequence=1, used_seconds=30)
    )
    got = await tenant.read.GetSession(pb.GetSessionRequest(account_id=account, session_id=sid))
    assert got.session.session_id == sid and got.session.sequence == 1
    ended = await tenant.meter.EndSession(
        pb.EndSessionRequest(account_id=account, session_id=sid, sequence=2, used_seconds=10)
    )
    assert ended.session.state == pb.SESSION_STATE_ENDED and ended.balance == 99


async def test_client_request_ids_never_meet_session_steps(tenant: Tenant) -> None:
    """A session step's record is `<session id>#<sequence>`; a client may use that text as
    its own request id on the same account, and the two stay apart."""
    account = f"ns-{uuid.uuid4().hex[:6]}"
    await tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=100, request_id=rid()))
    consumed = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id=account, feature="text", request_id="call-9#0")
    )
    started = await tenant.meter.StartSession(
        pb.StartSessionRequest(account_id=account, feature="voice", session_id="call-9")
    )
    assert consumed.balance == 99 and started.session.session_id == "call-9"
    updated = await tenant.meter.UpdateSession(
        pb.UpdateSessionRequest(account_id=account, session_id="call-9", sequence=1,
                                used_seconds=10)
    )  # fmt: skip
    again = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id=account, feature="text", request_id="call-9#1")
    )
    assert updated.charged_amount == 1 and again.balance == updated.balance - 1


async def test_request_records_of_0_1_0_are_replayed(
    tenant: Tenant, redis_client: redis.Redis
) -> None:
    """A request record written by 0.1.0 (status "OK", one balance where this release has
    three figures) still answers its retry after the upgrade, with the balance it gave."""
    account = f"v1-{uuid.uuid4().hex[:6]}"
    grant = pb.GrantRequest(account_id=account, amount=50, request_id="g-1")
    consume = pb.ConsumeRequest(account_id=account, feature="text", request_id="c-1")
    granted = await tenant.admin.Grant(grant)
    consumed = await tenant.meter.Consume(consume)
    keys = AccountKeys(tenant.name, account)
    for request_id, balance_at, old_balance in (("g-1", 8, 12_345), ("c-1", 5, 54_321)):
        key = keys.idempotency_key(request_id)
        fingerprint, _, body = redis_client.get(key).partition("\n")
        reply = json.loads(body)
        assert reply[0] == "OK2"
        # 0.1.0's shape: "OK", and one balance in place of credit, reserved, unlimited.
        old = ["OK", *reply[1:balance_at], str(old_balance), *reply[balance_at + 3 :]]
        redis_client.set(key, f"{fingerprint}\n{json.dumps(old)}", ex=600)
    replayed_grant = await tenant.admin.Grant(grant)
    replayed_consume = await tenant.meter.Consume(consume)
    assert replayed_grant.balance == 12_345 and replayed_grant.lot == granted.lot
    assert replayed_consume.balance == 54_321
    assert replayed_consume.charges == consumed.charges
