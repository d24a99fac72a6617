"""HTTP/JSON (the Connect protocol) on the same contract: `--http-listen` beside gRPC.

The server is the in-process one with its gateway on a free port; the client is plain
HTTP (urllib, in a thread) with the Connect wire format written out here, so what is
checked is what a curl or PHP caller sees: JSON bodies, HTTP status codes, Connect error
codes, and the error details both as base64 protobuf (decoded with google.protobuf) and
as their JSON `debug` form."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.transport import connect_gateway
from creditmeter.transport.server import App, Settings
from tests.conftest import Tenant, make_tenant, rid
from tests.helpers import failure

pytestmark = pytest.mark.settings(http_listen="127.0.0.1:0")

README = Path(__file__).resolve().parent.parent / "README.md"
#: Connect's end-of-stream envelope flag.
END_STREAM = 0x02


@dataclass
class Answer:
    """One HTTP answer: its status, and its JSON body (or the Connect error)."""

    status: int
    body: dict[str, Any]
    reason: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    violations: dict[str, str] = field(default_factory=dict)

    @property
    def code(self) -> str:
        return str(self.body.get("code", ""))


def read_details(answer: Answer) -> Answer:
    """Fill in the ErrorInfo and BadRequest of a Connect error, from the base64 protobuf
    value, checking that the JSON `debug` form says the same."""
    for detail in answer.body.get("details", []):
        raw = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
        if detail["type"] == "google.rpc.ErrorInfo":
            info = error_details_pb2.ErrorInfo.FromString(raw)
            answer.reason, answer.metadata = info.reason, dict(info.metadata)
            assert detail["debug"]["reason"] == info.reason
            assert detail["debug"].get("metadata", {}) == answer.metadata
        elif detail["type"] == "google.rpc.BadRequest":
            bad = error_details_pb2.BadRequest.FromString(raw)
            answer.violations = {v.field: v.description for v in bad.field_violations}
            debug = {v["field"]: v["description"] for v in detail["debug"]["fieldViolations"]}
            assert debug == answer.violations
    return answer


def _post(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Answer(response.status, json.loads(response.read()))
    except urllib.error.HTTPError as error:
        with error:
            raw = error.read()
            return read_details(Answer(error.code, json.loads(raw) if raw else {}))


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


async def call(
    app: App, route: str, body: dict[str, Any] | bytes, key: str | None, service: str = "Credits"
) -> Answer:
    """POST a unary call: /credits.v1.SERVICE/ROUTE with a JSON body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"http://127.0.0.1:{app.http_port}/credits.v1.{service}/{route}"
    headers = {"Content-Type": "application/json", **auth(key)}
    return await asyncio.to_thread(_post, url, data, headers)


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(data)) + data


def read_envelopes(stream: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """The (flags, JSON) envelopes of a Connect streaming response body, as they come."""
    while header := stream.read(5):
        flags, length = struct.unpack(">BI", header)
        yield flags, json.loads(stream.read(length))


def _stream(
    url: str, body: bytes, key: str, first: int | None, arrived: threading.Event | None = None
) -> list[tuple[int, Any]]:
    headers = {"Content-Type": "application/connect+json", **auth(key)}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    got: list[tuple[int, Any]] = []
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        for item in read_envelopes(response):
            got.append(item)
            if arrived is not None:
                arrived.set()
            if first is not None and len(got) == first:
                break  # and hang up: the server's watch must end with the connection
    return got


async def stream(
    app: App, route: str, messages: list[dict[str, Any]], key: str, first: int | None = None
) -> list[tuple[int, Any]]:
    """A streaming call: the enveloped request messages, the response envelopes (all, up
    to the end-of-stream one, or only the `first` few)."""
    url = f"http://127.0.0.1:{app.http_port}/credits.v1.Credits/{route}"
    body = b"".join(envelope(m) for m in messages)
    return await asyncio.to_thread(_stream, url, body, key, first)


def grant(account: str, amount: int, request_id: str | None = None) -> dict[str, Any]:
    return {"accountId": account, "amount": str(amount), "requestId": request_id or rid()}


def consume(account: str, quantity: int, request_id: str | None = None) -> dict[str, Any]:
    return {
        "accountId": account, "feature": "text", "quantity": str(quantity),
        "requestId": request_id or rid(),
    }  # fmt: skip


# --- the contract over JSON -------------------------------------------------------------
async def test_grant_consume_balance_and_history_over_json(app: App, tenant: Tenant) -> None:
    granted = await call(app, "Grant", grant("h1", 100), tenant.admin.key)
    assert granted.status == 200
    assert granted.body["balance"] == "100"  # int64 is a JSON string (proto3 JSON mapping)
    assert granted.body["lot"]["source"] == "LOT_SOURCE_MANUAL"
    consumed = await call(app, "Consume", consume("h1", 7), tenant.meter.key)
    assert consumed.status == 200
    assert (consumed.body["amount"], consumed.body["balance"]) == ("7", "93")
    assert consumed.body["charges"][0]["lotId"] == granted.body["lot"]["lotId"]
    # The gRPC side sees the same account.
    over_grpc = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="h1"))
    assert over_grpc.balance == 93
    balance = await call(app, "GetBalance", {"accountId": "h1"}, tenant.read.key)
    assert balance.body["balance"] == "93"


@pytest.mark.flusher
async def test_history_over_json(app: App, tenant: Tenant) -> None:
    await call(app, "Grant", grant("h2", 10), tenant.admin.key)
    spent = await call(app, "Consume", consume("h2", 3), tenant.meter.key)
    assert app.flusher is not None
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            break
        await asyncio.sleep(0.02)
    page = await call(app, "ListTransactions", {"accountId": "h2"}, tenant.read.key)
    assert page.status == 200
    kinds = [t["kind"] for t in page.body["transactions"]]
    assert kinds == ["TRANSACTION_KIND_CONSUME", "TRANSACTION_KIND_GRANT"]
    assert page.body["transactions"][0]["transactionId"] == spent.body["transactionId"]


async def test_packs_service_too(app: App, tenant: Tenant) -> None:
    pack = {
        "name": "Starter", "credits": "500",
        "price": {"amountMinor": "900", "currency": "EUR"}, "active": True,
    }  # fmt: skip
    made = await call(
        app, "CreatePack", {"pack": pack, "requestId": rid()}, tenant.admin.key, "Packs"
    )
    assert made.status == 200, made.body
    listed = await call(app, "ListPacks", {}, tenant.read.key, service="Packs")
    assert [p["packId"] for p in listed.body["packs"]] == [made.body["pack"]["packId"]]
    assert listed.body["packs"][0]["price"] == {"amountMinor": "900", "currency": "EUR"}


async def test_idempotent_replay_and_reused_key(app: App, tenant: Tenant) -> None:
    request_id = rid()
    first = await call(app, "Grant", grant("i1", 50, request_id), tenant.admin.key)
    again = await call(app, "Grant", grant("i1", 50, request_id), tenant.admin.key)
    assert again.body == first.body  # the first answer, and nothing granted twice
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id="i1"))
    assert balance.balance == 50
    # The same id over gRPC is the same key: a replay there too.
    over_grpc = await tenant.admin.Grant(
        pb.GrantRequest(account_id="i1", amount=50, request_id=request_id)
    )
    assert over_grpc.lot.lot_id == first.body["lot"]["lotId"]
    reused = await call(app, "Grant", grant("i1", 51, request_id), tenant.admin.key)
    assert (reused.status, reused.code, reused.reason) == (
        400, "invalid_argument", "IDEMPOTENCY_KEY_REUSED"
    )


# --- errors -----------------------------------------------------------------------------
async def test_insufficient_credits_carries_its_details(app: App, tenant: Tenant) -> None:
    await call(app, "Grant", grant("e1", 2), tenant.admin.key)
    refused = await call(app, "Consume", consume("e1", 5), tenant.meter.key)
    assert (refused.status, refused.code, refused.reason) == (
        400, "failed_precondition", "INSUFFICIENT_CREDITS"
    )
    grpc_side = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="e1", feature="text", quantity=1, request_id=rid())
    )
    assert grpc_side.balance == 1  # the refusal took nothing
    # What the gRPC side reports for the same refusal, field for field.
    with pytest.raises(grpc.aio.AioRpcError) as over_grpc:
        await tenant.meter.Consume(
            pb.ConsumeRequest(account_id="e1", feature="text", quantity=5, request_id=rid())
        )
    expected = failure(over_grpc.value)
    again = await call(app, "Consume", consume("e1", 5), tenant.meter.key)
    assert again.body["message"] == expected.message
    assert (again.reason, again.metadata) == (expected.reason, expected.metadata)


async def test_validation_errors_name_the_fields(app: App, tenant: Tenant) -> None:
    bad = await call(
        app, "Grant", {"accountId": "bad account!", "amount": "-5", "requestId": rid()},
        tenant.admin.key,
    )  # fmt: skip
    assert (bad.status, bad.code, bad.reason) == (400, "invalid_argument", "INVALID_REQUEST")
    assert set(bad.violations) == {"account_id", "amount"}
    assert bad.violations["amount"] == "must be positive"
    read = await call(app, "GetBalance", {"accountId": "bad account!"}, tenant.read.key)
    assert (read.code, read.reason, list(read.violations)) == (
        "invalid_argument", "INVALID_REQUEST", ["account_id"]
    )


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"accountId": "u1", "amout": "5"}', b'{"accountId": 5}', b"\xff\xfe"],
    ids=["malformed", "unknown-field", "wrong-type", "not-utf8"],
)
async def test_undecodable_json_is_invalid_request(
    app: App, tenant: Tenant, body: bytes
) -> None:
    answer = await call(app, "Grant", body, tenant.admin.key)
    assert (answer.status, answer.code, answer.reason) == (
        400, "invalid_argument", "INVALID_REQUEST"
    )
    assert answer.body["message"].startswith("invalid JSON request: ")
    balance = await call(app, "GetBalance", {"accountId": "u1"}, tenant.read.key)
    assert balance.code == "not_found"  # nothing was granted


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer cm_0123456789ab_nope", "Bearer ", "Basic dXNlcjpwYXNz"],
    ids=["missing", "unknown-key", "empty", "not-bearer"],
)
async def test_unauthenticated(app: App, tenant: Tenant, authorization: str | None) -> None:
    url = f"http://127.0.0.1:{app.http_port}/credits.v1.Credits/Grant"
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    for body in (json.dumps(grant("a1", 5)).encode(), b"{not json"):
        # A bad body too: the key is checked before the body is read, as over gRPC.
        answer = await asyncio.to_thread(_post, url, body, headers)
        assert (answer.status, answer.code, answer.reason) == (
            401, "unauthenticated", "API_KEY_INVALID"
        )
    assert (await call(app, "GetBalance", {"accountId": "a1"}, tenant.read.key)).code == (
        "not_found"
    )


async def test_role_is_checked_per_call(app: App, tenant: Tenant) -> None:
    denied = await call(app, "Grant", grant("r1", 5), tenant.read.key)
    assert (denied.status, denied.code, denied.reason) == (
        403, "permission_denied", "ROLE_NOT_ALLOWED"
    )
    other = await call(app, "GetBalance", {"accountId": "r1"}, tenant.read.key)
    assert other.code == "not_found"


async def test_unknown_route_is_404(app: App, tenant: Tenant) -> None:
    assert (await call(app, "Nope", {}, tenant.admin.key)).status == 404
    assert (await call(app, "Grant", {}, tenant.admin.key, service="Nope")).status == 404


async def test_every_route_reaches_its_rpc(app: App, tenant: Tenant) -> None:
    """Each unary route answers from the server's own RPC (an empty request is invalid
    or unknown, never unimplemented)."""
    for route in connect_gateway.routes():
        if route.kind != "unary":
            continue
        service = route.path.split("/")[1].rpartition(".")[2]
        answer = await call(app, route.path.rsplit("/", 1)[1], {}, tenant.admin.key, service)
        assert answer.status != 404 and answer.code != "unimplemented", (route.path, answer)


async def test_roles_over_http_match_the_route_table(app: App, tenant: Tenant) -> None:
    """A read and a meter key on every unary route: refused exactly where the table's
    least role is above theirs (the gRPC side's role check, reached through the gateway)."""
    for route in connect_gateway.routes():
        if route.kind != "unary":
            continue
        service = route.path.split("/")[1].rpartition(".")[2]
        name = route.path.rsplit("/", 1)[1]
        least = connect_gateway.least_role(name)
        for role, key in (("read", tenant.read.key), ("meter", tenant.meter.key)):
            answer = await call(app, name, {}, key, service)
            may = {"read": ["read"], "meter": ["read", "meter"]}[role]
            if least.value in may:
                assert answer.code != "permission_denied", (route.path, role, answer)
            else:
                assert (answer.status, answer.reason) == (403, "ROLE_NOT_ALLOWED"), (
                    route.path, role, answer
                )


# --- streams ----------------------------------------------------------------------------
def rpcs(method: str, code: str) -> float:
    """creditmeter_rpcs_total of a Credits method and code: the gRPC interceptor's count."""
    labels = {"service": "credits.v1.Credits", "method": method, "code": code}
    return REGISTRY.get_sample_value("creditmeter_rpcs_total", labels) or 0.0


async def counted(method: str, code: str, above: float) -> float:
    """Wait until the interceptor counted one more call than `above`; the new count."""
    for _ in range(250):
        if (now := rpcs(method, code)) > above:
            return now
        await asyncio.sleep(0.02)
    raise AssertionError(f"{method} {code} was not counted")


async def test_http_calls_are_the_grpc_calls_with_their_metrics(app: App, tenant: Tenant) -> None:
    before = rpcs("Consume", "FAILED_PRECONDITION")
    await call(app, "Consume", consume("nothing-here", 1), tenant.meter.key)
    assert rpcs("Consume", "FAILED_PRECONDITION") == before + 1
    # Refused by the gateway before any gRPC call: counted all the same, once.
    unauthenticated, invalid = rpcs("Grant", "UNAUTHENTICATED"), rpcs("Grant", "INVALID_ARGUMENT")
    await call(app, "Grant", grant("nothing-here", 1), None)
    await call(app, "Grant", b"{not json", tenant.admin.key)
    await call(app, "Grant", {"amount": "-1"}, tenant.admin.key)  # refused by gRPC's validation
    assert rpcs("Grant", "UNAUTHENTICATED") == unauthenticated + 1
    assert rpcs("Grant", "INVALID_ARGUMENT") == invalid + 2


def test_routes_command_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "creditmeter", "routes"], capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == connect_gateway.routes_table()


async def test_watch_balance_streams_over_http(app: App, tenant: Tenant) -> None:
    await call(app, "Grant", grant("w1", 10), tenant.admin.key)
    # A resume token from a gRPC watch, so the HTTP one starts at a known point (a Connect
    # server stream sends its headers with its first message: no sign of when it began).
    watch = tenant.read.WatchBalance(pb.WatchBalanceRequest(account_id="w1", thresholds=[5]))
    await watch.initial_metadata()
    await call(app, "Consume", consume("w1", 6), tenant.meter.key)
    low = await asyncio.wait_for(watch.read(), 5)
    cancelled = rpcs("WatchBalance", "CANCELLED")
    watch.cancel()
    cancelled = await counted("WatchBalance", "CANCELLED", cancelled)
    await call(app, "Consume", consume("w1", 4), tenant.meter.key)
    got = await stream(
        app, "WatchBalance",
        [{"accountId": "w1", "thresholds": ["5"], "resumeToken": low.resume_token}],
        tenant.read.key, first=1,
    )  # fmt: skip
    flags, alert = got[0]
    assert flags == 0
    assert alert["kind"] == "BALANCE_ALERT_KIND_DEPLETED"
    assert (alert["previousBalance"], alert.get("balance", "0")) == ("4", "0")
    # The client hung up: the watch behind it ends too (it holds a Redis connection).
    await counted("WatchBalance", "CANCELLED", cancelled)


async def test_watch_refusal_ends_the_stream_with_the_error(app: App, tenant: Tenant) -> None:
    got = await stream(app, "WatchBalance", [{"thresholds": ["0"]}], tenant.read.key)
    [(flags, end)] = got
    assert flags == END_STREAM
    assert end["error"]["code"] == "invalid_argument"
    info = [d for d in end["error"]["details"] if d["type"] == "google.rpc.ErrorInfo"]
    assert info[0]["debug"]["reason"] == "INVALID_REQUEST"


async def test_meter_is_half_duplex_over_http(app: App, tenant: Tenant) -> None:
    await call(app, "Grant", grant("m1", 3), tenant.admin.key)
    items = [{"consume": consume("m1", 2)}, {"consume": consume("m1", 2)}]
    got = await stream(app, "Meter", items, tenant.meter.key)
    assert [flags for flags, _ in got] == [0, 0, END_STREAM]
    first, second = got[0][1]["result"], got[1][1]["result"]
    assert first["response"]["balance"] == "1"
    assert second["error"]["reason"] == "INSUFFICIENT_CREDITS"
    assert got[2][1] == {}  # a clean end


# --- the route list -----------------------------------------------------------------------
def test_readme_lists_every_route() -> None:
    """The README's HTTP route table is `creditmeter routes`'s output, which is made from
    the service descriptors: a new RPC without its README row fails here."""
    table = connect_gateway.routes_table()
    assert table in README.read_text(), "README.md: paste the output of `creditmeter routes`"
    paths = re.findall(r"`(/credits\.v1\.\w+/\w+)`", table)
    assert paths == [r.path for r in connect_gateway.routes()]
    expected = {f"/{s.full_name}/{m.name}" for s, _ in connect_gateway.SERVICES for m in s.methods}
    assert set(paths) == expected


# --- stopping -------------------------------------------------------------------------------
async def test_stop_ends_open_watches_within_the_grace(tmp_path: Path, redis_url: str) -> None:
    """A server stopping with an HTTP watch open ends the watch (its end-of-stream comes)
    and stops within its grace, rather than waiting on the open connection."""
    grace_s = 2.0
    server = App(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "data", redis_url=redis_url,
                          flusher=False, shutdown_grace_s=grace_s, http_listen="127.0.0.1:0"))
    await server.start()
    t = await make_tenant(server)
    try:
        # A replayed alert as the first message: then the HTTP watch is known to be open.
        await call(server, "Grant", grant("s1", 10), t.admin.key)
        watch = t.read.WatchBalance(pb.WatchBalanceRequest(account_id="s1", thresholds=[5]))
        await watch.initial_metadata()
        await call(server, "Consume", consume("s1", 6), t.meter.key)
        low = await asyncio.wait_for(watch.read(), 5)
        watch.cancel()
        await call(server, "Consume", consume("s1", 4), t.meter.key)
        first = threading.Event()
        url = f"http://127.0.0.1:{server.http_port}/credits.v1.Credits/WatchBalance"
        body = envelope({"accountId": "s1", "thresholds": ["5"], "resumeToken": low.resume_token})
        watching = asyncio.create_task(
            asyncio.to_thread(_stream, url, body, t.read.key, None, first)
        )
        assert await asyncio.to_thread(first.wait, 10)
    finally:
        started = time.monotonic()
        await server.stop()
        await t.channel.close()
    assert time.monotonic() - started < grace_s * 2
    got = await asyncio.wait_for(watching, 5)
    assert [flags for flags, _ in got] == [0, END_STREAM]
    assert got[1][1] == {}  # ended cleanly, not with an error
