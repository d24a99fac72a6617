"""Webhooks: endpoints (CRUD, bad input, idempotency), and deliveries to a real HTTP
receiver on loopback: every event type arrives signed (checked by an HMAC written here from
the README's description, and by Node's crypto), a receiver answering 500 twice gets the
event on the third try, a slow receiver does not slow metering, and kill -9 of the
delivering server loses nothing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from creditmeter.api.credits.v1 import credits_pb2 as cpb
from creditmeter.api.credits.v1 import credits_pb2_grpc, packs_pb2_grpc, webhooks_pb2_grpc
from creditmeter.api.credits.v1 import packs_pb2 as ppb
from creditmeter.api.credits.v1 import webhooks_pb2 as pb
from creditmeter.constants import CONFIG_RELOAD_INTERVAL_S
from creditmeter.domain.clock import ManualClock
from creditmeter.transport.server import App, Settings
from creditmeter.transport.webhook_worker import WebhookTimings
from tests.conftest import Caller, Tenant, empty_redis, rid, tenant_keys, tenant_of
from tests.helpers import fails
from tests.test_server_process import (  # noqa: F401 (launch is a fixture)
    Launch,
    auth,
    cli,
    create_key,
    eventually,
    launch,
    processes_using,
)

FAST = WebhookTimings(
    poll_s=0.05, retry_base_s=0.05, retry_max_s=0.2, timeout_s=2.0, expiry_sweep_s=0.05
)
ALL_TYPES = [v for v in pb.WebhookEventType.values() if v]
TYPE_NAMES = {
    "balance.low", "balance.depleted", "balance.topped_up", "purchase.completed",
    "purchase.refunded", "purchase.expired", "subscription.period_granted", "session.timed_out",
    "recharge.due",
}  # fmt: skip


# --- a receiver on loopback ----------------------------------------------------------------
@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """An HTTP server in a thread: records every POST, answers with `statuses` in turn
    (then 200), after `delay_s`."""

    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    #: Requests being answered at once: now, and the most seen.
    at_once: int = 0
    most_at_once: int = 0

    def serve(self) -> ThreadingHTTPServer:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender died mid-request (the kill -9 test): nothing arrived, and
                    # no answer can reach it.
                    return
                with receiver.lock:
                    receiver.at_once += 1
                    receiver.most_at_once = max(receiver.most_at_once, receiver.at_once)
                time.sleep(receiver.delay_s)
                with receiver.lock:
                    receiver.at_once -= 1
                    receiver.received.append(Received(dict(self.headers.items()), body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.event for r in self.received]

    def types(self) -> set[str]:
        return {e["type"] for e in self.events()}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    server = r.serve()
    yield r
    server.shutdown()
    server.server_close()


async def until(
    check: Callable[[], bool], timeout_s: float = 15.0, show: Callable[[], object] = str
) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s: {show()}")
        await asyncio.sleep(0.02)


# --- verification, independent of the server's code -----------------------------------
def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """As the README says: t and v1 from the header, HMAC-SHA256 of "<t>.<body>" with the
    secret, compared in constant time, t recent."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) <= tolerance_s
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])


NODE_VERIFY = r"""
const crypto = require('crypto');
const [secret, header, bodyB64] = process.argv.slice(1);
const body = Buffer.from(bodyB64, 'base64');
const parts = Object.fromEntries(header.split(',').map(p => p.split('=', 2)));
const expected = crypto.createHmac('sha256', secret)
  .update(parts.t + '.').update(body).digest('hex');
const ok = crypto.timingSafeEqual(Buffer.from(expected), Buffer.from(parts.v1));
process.exit(ok ? 0 : 1);
"""


README = Path(__file__).parent.parent / "README.md"


def readme_snippet(language: str) -> str:
    """The README's webhook signature check in `language` (its first block after the
    Signatures paragraph)."""
    text = README.read_text()
    start = text.index("**Signatures**")
    block = text.index(f"```{language}\n", start) + len(language) + 4
    return text[block : text.index("```", block)]


def readme_verifies(language: str, secret: str, header: str, body: bytes) -> bool:
    """Run the README's own verify() in Node or PHP on one delivery."""
    import base64

    encoded = base64.b64encode(body).decode()
    if language == "js":
        program = readme_snippet("js") + (
            "process.exit(verify(process.argv[1], process.argv[2],"
            " Buffer.from(process.argv[3], 'base64')) ? 0 : 1);"
        )
        command = [shutil.which("node") or "node", "-e", program, secret, header, encoded]
    else:
        program = "<?php\n" + readme_snippet("php") + (
            "exit(verify($argv[1], $argv[2], base64_decode($argv[3])) ? 0 : 1);"
        )
        command = [shutil.which("php") or "php", "-r", program.removeprefix("<?php\n"),
                   "--", secret, header, encoded]  # fmt: skip
    result = subprocess.run(command, capture_output=True, timeout=30, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def node_verifies(secret: str, header: str, body: bytes) -> bool:
    import base64

    node = shutil.which("node")
    assert node, "node is needed to check signatures independently"
    result = subprocess.run(
        [node, "-e", NODE_VERIFY, secret, header, base64.b64encode(body).decode()],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return result.returncode == 0


# --- stubs ------------------------------------------------------------------------------
@dataclass
class Hooks:
    admin: Caller
    meter: Caller
    read: Caller
    packs: Caller


@pytest.fixture
def hooks(tenant: Tenant) -> Hooks:
    stub = webhooks_pb2_grpc.WebhooksStub(tenant.channel)
    return Hooks(
        Caller(stub, tenant.admin.key),  # type: ignore[arg-type]
        Caller(stub, tenant.meter.key),  # type: ignore[arg-type]
        Caller(stub, tenant.read.key),  # type: ignore[arg-type]
        Caller(packs_pb2_grpc.PacksStub(tenant.channel), tenant.admin.key),  # type: ignore[arg-type]
    )


async def create(hooks: Hooks, url: str, types: list[int] | None = None,
                 thresholds: tuple[int, ...] = ()) -> pb.CreateWebhookEndpointResponse:  # fmt: skip
    endpoint = pb.WebhookEndpoint(
        url=url, event_types=types or ALL_TYPES, thresholds=list(thresholds)
    )
    reply: pb.CreateWebhookEndpointResponse = await hooks.admin.CreateWebhookEndpoint(
        pb.CreateWebhookEndpointRequest(endpoint=endpoint, request_id=rid())
    )
    return reply


# --- endpoints ----------------------------------------------------------------------------
async def test_endpoint_crud(hooks: Hooks) -> None:
    req = pb.CreateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(
            url="https://example.com/hook", description="billing",
            event_types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_LOW], thresholds=[500, 100, 500],
        ),
        request_id=rid(),
    )  # fmt: skip
    made = await hooks.admin.CreateWebhookEndpoint(req)
    assert made.secret.startswith("whsec_") and len(made.secret) > 30
    e = made.endpoint
    assert e.endpoint_id.startswith("whe_") and e.url == "https://example.com/hook"
    assert list(e.thresholds) == [100, 500] and not e.disabled
    # A retry is the same endpoint and the same secret.
    again = await hooks.admin.CreateWebhookEndpoint(req)
    assert again == made

    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert [x.endpoint_id for x in listed.endpoints] == [e.endpoint_id]
    assert made.secret not in str(listed)

    changed = await hooks.admin.UpdateWebhookEndpoint(
        pb.UpdateWebhookEndpointRequest(
            endpoint=pb.WebhookEndpoint(
                endpoint_id=e.endpoint_id, url="https://example.com/v2", description="ignored"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["url"]),
            request_id=rid(),
        )
    )
    assert changed.endpoint.url == "https://example.com/v2"
    assert changed.endpoint.description == "billing"

    rotated = await hooks.admin.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(endpoint_id=e.endpoint_id, request_id=rid())
    )
    assert rotated.secret.startswith("whsec_") and rotated.secret != made.secret

    await hooks.admin.DeleteWebhookEndpoint(
        pb.DeleteWebhookEndpointRequest(endpoint_id=e.endpoint_id, request_id=rid())
    )
    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert not listed.endpoints
    f = await fails(
        hooks.admin.RotateWebhookSecret(
            pb.RotateWebhookSecretRequest(endpoint_id=e.endpoint_id, request_id=rid())
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_ENDPOINT_NOT_FOUND")
    assert f.metadata == {"endpoint_id": e.endpoint_id}
    f = await fails(
        hooks.admin.ResendWebhookDelivery(
            pb.ResendWebhookDeliveryRequest(delivery_id="whd_none", request_id=rid())
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.NOT_FOUND, "WEBHOOK_DELIVERY_NOT_FOUND")


BAD_ENDPOINTS: dict[str, tuple[pb.WebhookEndpoint, set[str]]] = {
    "ftp-url": (
        pb.WebhookEndpoint(url="ftp://example.com", event_types=ALL_TYPES), {"endpoint.url"}
    ),
    "no-host": (pb.WebhookEndpoint(url="https://", event_types=ALL_TYPES), {"endpoint.url"}),
    "bad-ipv6": (pb.WebhookEndpoint(url="http://[::1/x", event_types=ALL_TYPES), {"endpoint.url"}),
    "bad-port": (
        pb.WebhookEndpoint(url="http://example.com:99999/", event_types=ALL_TYPES),
        {"endpoint.url"},
    ),
    "too-long": (
        pb.WebhookEndpoint(url="https://example.com/" + "x" * 2048, event_types=ALL_TYPES),
        {"endpoint.url"},
    ),
    "credentials": (
        pb.WebhookEndpoint(url="https://u:p@example.com", event_types=ALL_TYPES),
        {"endpoint.url"},
    ),
    "no-types": (pb.WebhookEndpoint(url="https://example.com"), {"endpoint.event_types"}),
    "unspecified-type": (
        pb.WebhookEndpoint(url="https://example.com", event_types=[0]),
        {"endpoint.event_types[0]", "endpoint.event_types"},
    ),
    "unknown-type": (
        pb.WebhookEndpoint(url="https://example.com", event_types=[1, 99]),
        {"endpoint.event_types[1]"},
    ),
    "threshold-zero": (
        pb.WebhookEndpoint(url="https://example.com", event_types=ALL_TYPES, thresholds=[0]),
        {"endpoint.thresholds[0]"},
    ),
    "long-description": (
        pb.WebhookEndpoint(
            url="https://example.com", event_types=ALL_TYPES, description="x" * 1001
        ),
        {"endpoint.description"},
    ),
}


@pytest.mark.parametrize("case", list(BAD_ENDPOINTS))
async def test_bad_endpoint_is_invalid_and_changes_nothing(hooks: Hooks, case: str) -> None:
    endpoint, fields = BAD_ENDPOINTS[case]
    f = await fails(
        hooks.admin.CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(endpoint=endpoint, request_id=rid())
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert fields <= set(f.violations), f.violations
    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert not listed.endpoints


async def test_bad_requests_name_their_fields(hooks: Hooks) -> None:
    made = await create(hooks, "https://example.com/a")
    endpoint_id = made.endpoint.endpoint_id
    no_id = pb.CreateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(url="https://example.com", event_types=ALL_TYPES)
    )
    f = await fails(hooks.admin.CreateWebhookEndpoint(no_id))
    assert set(f.violations) == {"request_id"}
    f = await fails(
        hooks.admin.UpdateWebhookEndpoint(
            pb.UpdateWebhookEndpointRequest(
                endpoint=pb.WebhookEndpoint(endpoint_id=endpoint_id, url="nope"),
                update_mask=field_mask_pb2.FieldMask(paths=["url", "secret"]),
                request_id=rid(),
            )
        )
    )
    assert set(f.violations) == {"update_mask.paths[1]"}
    f = await fails(
        hooks.admin.UpdateWebhookEndpoint(
            pb.UpdateWebhookEndpointRequest(
                endpoint=pb.WebhookEndpoint(endpoint_id=endpoint_id, url="nope"),
                update_mask=field_mask_pb2.FieldMask(paths=["url"]),
                request_id=rid(),
            )
        )
    )
    assert set(f.violations) == {"endpoint.url"}
    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert listed.endpoints[0].url == "https://example.com/a"  # unchanged
    f = await fails(hooks.admin.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(page_token="garbage", page_size=-1)))  # fmt: skip
    assert set(f.violations) == {"page_token", "page_size"}


async def test_reused_request_id_is_refused(hooks: Hooks) -> None:
    request_id = rid()
    await hooks.admin.CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(url="https://example.com/a", event_types=ALL_TYPES),
        request_id=request_id))  # fmt: skip
    f = await fails(hooks.admin.CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(url="https://example.com/b", event_types=ALL_TYPES),
        request_id=request_id)))  # fmt: skip
    assert f.reason == "IDEMPOTENCY_KEY_REUSED"
    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert [e.url for e in listed.endpoints] == ["https://example.com/a"]


# --- deliveries ---------------------------------------------------------------------------
async def _grant(tenant: Tenant, account: str, amount: int) -> None:
    await tenant.admin.Grant(cpb.GrantRequest(account_id=account, amount=amount, request_id=rid()))


async def _consume(tenant: Tenant, account: str, amount: int) -> cpb.ConsumeResponse:
    reply: cpb.ConsumeResponse = await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id=account, feature="text", amount=amount, request_id=rid())
    )
    return reply


@pytest.mark.flusher
@pytest.mark.settings(webhook=FAST, session_close_interval_s=0.05)
async def test_every_event_type_arrives_signed(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver, clock: ManualClock
) -> None:
    made = await create(hooks, receiver.url, thresholds=(50,))
    secret = made.secret
    # A recharge is due below 30 (the tenant's default policy, naming no pack).
    await tenant.admin.SetRechargePolicy(cpb.SetRechargePolicyRequest(
        policy=cpb.RechargePolicy(threshold=30), request_id=rid()))  # fmt: skip
    assert app.live is not None
    await app.live.refresh()
    # Balance: topped up (past 0 and 50), low (under 50), depleted (and under 30).
    await _grant(tenant, "a", 100)
    await _consume(tenant, "a", 60)
    await _consume(tenant, "a", 40)
    # Purchases: completed then refunded, and one left pending past its expiry.
    pack = (await hooks.packs.CreatePack(ppb.CreatePackRequest(pack=ppb.Pack(
        name="ten", credits=10, price=ppb.Price(amount_minor=500, currency="EUR")),
        request_id=rid()))).pack  # fmt: skip
    bought = await hooks.packs.PurchasePack(ppb.PurchasePackRequest(
        account_id="b", pack_id=pack.pack_id, payment_reference="pay-1",
        request_id=rid()))  # fmt: skip
    await hooks.packs.RefundPurchase(ppb.RefundPurchaseRequest(
        purchase_id=bought.purchase.purchase_id, request_id=rid()))  # fmt: skip
    pending = await hooks.packs.CreatePurchase(ppb.CreatePurchaseRequest(
        account_id="b", pack_id=pack.pack_id, request_id=rid()))  # fmt: skip
    # A subscription's first period.
    monthly = (await hooks.packs.CreatePack(ppb.CreatePackRequest(pack=ppb.Pack(
        name="monthly", credits=30, price=ppb.Price(amount_minor=900, currency="EUR"),
        recurrence=ppb.RECURRENCE_MONTHLY), request_id=rid()))).pack  # fmt: skip
    sub = await hooks.packs.Subscribe(ppb.SubscribeRequest(
        account_id="c", pack_id=monthly.pack_id, request_id=rid()))  # fmt: skip
    # A call session whose call server goes silent.
    await _grant(tenant, "d", 1000)
    await tenant.meter.StartSession(
        cpb.StartSessionRequest(account_id="d", feature="voice", session_id="call-1")
    )
    clock.advance(3600 * 1000)  # past the pending purchase's expiry and the session's grace

    await until(lambda: receiver.types() >= TYPE_NAMES, 15.0, lambda: receiver.types())
    for r in receiver.received:
        header = r.headers["Creditmeter-Signature"]
        assert verify(secret, header, r.body), header
        assert not verify("whsec_wrong", header, r.body)
    # Node checks one of each type on its own; the README's Python, Node and PHP code too.
    firsts = {r.event["type"]: r for r in reversed(receiver.received)}
    for r in firsts.values():
        assert node_verifies(secret, r.headers["Creditmeter-Signature"], r.body)
    sample = receiver.received[0]
    header = sample.headers["Creditmeter-Signature"]
    readme_python: dict[str, Any] = {}
    exec(readme_snippet("python"), readme_python)
    assert readme_python["verify"](secret, header, sample.body)
    assert not readme_python["verify"](secret, header, sample.body + b" ")
    for language in ("js", "php"):
        if language == "php" and shutil.which("php") is None:
            continue
        assert readme_verifies(language, secret, header, sample.body), language
        assert not readme_verifies(language, "whsec_wrong", header, sample.body), language

    # Every type has arrived, but the last changes' other deliveries may still be on their
    # way: wait until every delivery listed has been delivered and received.
    deadline = time.monotonic() + 15.0
    while True:
        so_far = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest(
            endpoint_id=made.endpoint.endpoint_id, page_size=1000))  # fmt: skip
        statuses = [d.status for d in so_far.deliveries]
        if set(statuses) == {pb.WEBHOOK_DELIVERY_STATUS_DELIVERED} and len(
            receiver.events()) >= len(statuses):  # fmt: skip
            break
        assert time.monotonic() < deadline, (statuses, len(receiver.events()))
        await asyncio.sleep(0.05)
    events = receiver.events()
    for e in events:
        assert set(e) == {"id", "type", "created", "tenant", "data"}
        assert e["tenant"] == tenant.name and e["id"].startswith("evt_")
        assert e["created"].endswith("Z")
    by_type: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_type.setdefault(e["type"], []).append(e["data"])
    a_topped = sorted(int(d["threshold"]) if "threshold" in d else 0
                      for d in by_type["balance.topped_up"] if d["accountId"] == "a")  # fmt: skip
    assert a_topped == [0, 50]
    low = [d for d in by_type["balance.low"] if d["accountId"] == "a"]
    assert low == [{"accountId": "a", "threshold": "50", "previousBalance": "100",
                    "balance": "40", "transactionId": low[0]["transactionId"],
                    "eventTime": low[0]["eventTime"]}]  # fmt: skip
    depleted = [d for d in by_type["balance.depleted"] if d["accountId"] == "a"]
    assert len(depleted) == 1 and depleted[0]["previousBalance"] == "40"
    assert "balance" not in depleted[0]  # proto JSON leaves out zeros
    completed = by_type["purchase.completed"]
    assert [d["purchaseId"] for d in completed] == [bought.purchase.purchase_id]
    assert completed[0]["status"] == "PURCHASE_STATUS_COMPLETED"
    assert [d["purchaseId"] for d in by_type["purchase.refunded"]] == [bought.purchase.purchase_id]
    assert [d["purchaseId"] for d in by_type["purchase.expired"]] == [pending.purchase.purchase_id]
    period = by_type["subscription.period_granted"]
    assert period == [{"subscriptionId": sub.subscription.subscription_id, "accountId": "c",
                       "packId": monthly.pack_id, "credits": "30"}]  # fmt: skip
    due = [d for d in by_type["recharge.due"] if d["accountId"] == "a"]
    assert due == [{"accountId": "a", "threshold": "30", "previousBalance": "40",
                    "transactionId": due[0]["transactionId"],
                    "eventTime": due[0]["eventTime"]}]  # fmt: skip
    timed_out = by_type["session.timed_out"]
    assert len(timed_out) == 1 and timed_out[0]["sessionId"] == "call-1"
    assert timed_out[0]["accountId"] == "d" and int(timed_out[0]["charged"]) > 0

    # Every delivery is listed as delivered at the first attempt, with its body.
    listed = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest(
        endpoint_id=made.endpoint.endpoint_id, page_size=1000))  # fmt: skip
    assert len(listed.deliveries) == len(events)
    assert {d.event_id for d in listed.deliveries} == {e["id"] for e in events}
    for d in listed.deliveries:
        assert (d.status, d.attempts, d.last_status_code) == (
            pb.WEBHOOK_DELIVERY_STATUS_DELIVERED, 1, 200
        )
        assert json.loads(d.body)["id"] == d.event_id


@pytest.mark.flusher
@pytest.mark.settings(webhook=FAST)
async def test_only_wanted_types_and_thresholds(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_LOW], thresholds=(30,))
    other = await create(hooks, receiver.url + "?other", types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_LOW],
                         thresholds=(70,))  # fmt: skip
    await _grant(tenant, "a", 100)
    await _consume(tenant, "a", 50)  # 100 -> 50: past 70 only
    await _consume(tenant, "a", 30)  # 50 -> 20: past 30 only
    await until(lambda: len(receiver.received) >= 2)
    await asyncio.sleep(0.3)
    assert sorted(int(e["data"]["threshold"]) for e in receiver.events()) == [30, 70]
    listed = await hooks.admin.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(endpoint_id=other.endpoint.endpoint_id)
    )
    assert [json.loads(d.body)["data"]["threshold"] for d in listed.deliveries] == ["70"]


@pytest.mark.flusher
@pytest.mark.settings(webhook=FAST)
async def test_500_twice_then_200_arrives_on_the_third_try(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    receiver.statuses = [500, 500]
    made = await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP])
    await _grant(tenant, "a", 10)
    await until(lambda: len(receiver.received) >= 3)
    await asyncio.sleep(0.3)
    events = receiver.events()
    assert len(events) == 3 and len({e["id"] for e in events}) == 1  # one event, three tries
    assert len({r.body for r in receiver.received}) == 1
    for r in receiver.received:
        assert verify(made.secret, r.headers["Creditmeter-Signature"], r.body)
    listed = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest())
    (d,) = listed.deliveries
    assert (d.status, d.attempts, d.last_status_code, d.last_error) == (
        pb.WEBHOOK_DELIVERY_STATUS_DELIVERED, 3, 200, ""
    )

    # Resent: a new delivery of the same event (a retry of the resend makes no second).
    request_id = rid()
    resent = await hooks.admin.ResendWebhookDelivery(
        pb.ResendWebhookDeliveryRequest(delivery_id=d.delivery_id, request_id=request_id)
    )
    again = await hooks.admin.ResendWebhookDelivery(
        pb.ResendWebhookDeliveryRequest(delivery_id=d.delivery_id, request_id=request_id)
    )
    assert resent.delivery.delivery_id == again.delivery.delivery_id != d.delivery_id
    assert resent.delivery.event_id == d.event_id
    await until(lambda: len(receiver.received) >= 4)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 4 and receiver.events()[3]["id"] == d.event_id
    page = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest(page_size=1))
    assert len(page.deliveries) == 1 and page.next_page_token
    rest = await hooks.admin.ListWebhookDeliveries(
        pb.ListWebhookDeliveriesRequest(page_size=1, page_token=page.next_page_token)
    )
    assert {page.deliveries[0].delivery_id, rest.deliveries[0].delivery_id} == {
        d.delivery_id, resent.delivery.delivery_id
    }


@pytest.mark.flusher
@pytest.mark.settings(
    webhook=WebhookTimings(poll_s=0.05, retry_base_s=0.05, retry_max_s=0.1, timeout_s=0.3,
                           retry_window_s=3600, disable_after_s=0.5)
)  # fmt: skip
async def test_timeouts_are_retried_and_an_endpoint_failing_too_long_is_disabled(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    receiver.delay_s = 0.6  # past the timeout: every attempt times out
    made = await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP])
    disabled_before = REGISTRY.get_sample_value("creditmeter_webhook_endpoints_disabled_total")
    timeouts_before = REGISTRY.get_sample_value(
        "creditmeter_webhook_attempts_total", {"outcome": "timeout"}
    )

    async def disabled() -> bool:
        listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
        return bool(listed.endpoints[0].disabled)

    await _grant(tenant, "a", 10)
    deadline = time.monotonic() + 15
    while not await disabled():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    listed = await hooks.admin.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest())
    assert listed.endpoints[0].disabled_reason.startswith("every delivery failed")
    disabled_after = REGISTRY.get_sample_value("creditmeter_webhook_endpoints_disabled_total")
    assert (disabled_after or 0) == (disabled_before or 0) + 1
    timeouts_after = REGISTRY.get_sample_value(
        "creditmeter_webhook_attempts_total", {"outcome": "timeout"}
    )
    assert (timeouts_after or 0) >= (timeouts_before or 0) + 2
    deliveries = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest())
    (d,) = deliveries.deliveries
    assert d.attempts >= 2 and d.last_error in ("timeout", "endpoint disabled")
    # Enabled again by the tenant: deliveries resume.
    receiver.delay_s = 0
    await hooks.admin.UpdateWebhookEndpoint(pb.UpdateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(endpoint_id=made.endpoint.endpoint_id, disabled=False),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled"]), request_id=rid()))  # fmt: skip
    assert not await disabled()
    seen = len(receiver.received)
    await _grant(tenant, "b", 10)
    await until(lambda: any(e["data"]["accountId"] == "b" for e in receiver.events()[seen:]))


@pytest.mark.flusher
@pytest.mark.settings(webhook=WebhookTimings(poll_s=0.05, timeout_s=30.0))
async def test_a_slow_receiver_does_not_slow_metering(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    receiver.delay_s = 5.0
    await create(hooks, receiver.url)
    await _grant(tenant, "a", 10_000)
    await asyncio.sleep(0.3)  # the topped-up deliveries are in flight, held by the receiver
    start = time.monotonic()
    for i in range(100):
        reply = await _consume(tenant, "a", 10 if i % 2 else 90)  # crosses no threshold
        assert reply.balance >= 0
    elapsed = time.monotonic() - start
    assert elapsed < 3.0, elapsed  # 100 calls, each far under the receiver's 5 s
    assert len(receiver.received) == 0  # nothing answered yet: the receiver is still sleeping


# --- kill -9 of the delivering server -------------------------------------------------------
def test_kill_9_of_the_delivering_server_loses_no_event(
    launch: Launch,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
    receiver: Receiver,
) -> None:
    """Grants (each a balance.topped_up event of its own account) go on while the server
    delivers them to a slowish receiver; the whole process group (server, flusher child,
    Redis) is killed mid-run and started again: every acknowledged grant's event arrives,
    at least once, and a repeat is the same event, byte for byte."""
    receiver.delay_s = 0.02
    data = tmp_path / "data"
    key, _ = create_key(data, "hooks", "admin")
    md = auth(key)
    args = ["--webhook-timeout", "2"]
    server = launch(data, args=args)
    with grpc.insecure_channel(server.address) as channel:
        webhooks_pb2_grpc.WebhooksStub(channel).CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(
                endpoint=pb.WebhookEndpoint(
                    url=receiver.url, event_types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP]
                ),
                request_id=rid(),
            ),
            metadata=md, timeout=10,
        )  # fmt: skip
    # The flusher child reads which tenants want balance events when the config changes,
    # polling every CONFIG_RELOAD_INTERVAL_S.
    time.sleep(CONFIG_RELOAD_INTERVAL_S * 3)
    acknowledged: list[str] = []

    def grant_until_refused(address: str, first: int, count: int) -> None:
        with grpc.insecure_channel(address) as channel:
            stub = credits_pb2_grpc.CreditsStub(channel)
            for i in range(first, first + count):
                try:
                    grant = cpb.GrantRequest(account_id=f"acct-{i}", amount=5, request_id=rid())
                    stub.Grant(grant, metadata=md, timeout=5)
                except grpc.RpcError:
                    return
                acknowledged.append(f"acct-{i}")

    most = 20_000  # grants go on until the server is gone
    granting = threading.Thread(target=grant_until_refused, args=(server.address, 0, most))
    granting.start()
    try:
        eventually(lambda: len(receiver.received) >= 30, 60, 0.01)
        os.killpg(server.pgid, signal.SIGKILL)
        assert server.proc.wait(10) == -signal.SIGKILL
    finally:
        granting.join(30)
    eventually(lambda: processes_using(data) == [], 10)
    killed_with = len(acknowledged)
    assert 0 < killed_with < most, killed_with  # killed mid-run
    delivered_before = {e["data"]["accountId"] for e in receiver.events()}
    assert len(delivered_before) < killed_with  # some were still to deliver

    server = launch(data, args=args)
    grant_until_refused(server.address, 1000, 20)  # the restarted server takes new ones too

    def all_arrived() -> bool:
        return {e["data"]["accountId"] for e in receiver.events()} >= set(acknowledged)

    eventually(all_arrived, 90, 0.1)
    bodies: dict[str, set[bytes]] = {}
    for r in receiver.received:
        bodies.setdefault(r.event["id"], set()).add(r.body)
    assert all(len(b) == 1 for b in bodies.values())  # a repeat is the same event
    per_account = {}
    for e in receiver.events():
        per_account.setdefault(e["data"]["accountId"], set()).add(e["id"])
    assert all(len(ids) == 1 for ids in per_account.values())  # one event per grant
    assert server.terminate() == 0


# --- the CLI --------------------------------------------------------------------------------
async def test_cli_webhooks_commands(app: App, tenant: Tenant) -> None:
    base = ["--server", f"127.0.0.1:{app.port}", "--api-key", tenant.admin.key]

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = await asyncio.to_thread(cli, "webhooks", *args, *base)
        assert result.returncode == 0, result.stderr
        return result

    made = await run("create", "https://example.com/cli", "--event", "balance.low",
                     "--event", "purchase.completed", "--threshold", "25")  # fmt: skip
    secret = made.stdout.strip()
    assert secret.startswith("whsec_")
    listed = await run("list")
    assert "https://example.com/cli" in listed.stdout and secret not in listed.stdout
    stub = webhooks_pb2_grpc.WebhooksStub(tenant.channel)
    (endpoint,) = (await stub.ListWebhookEndpoints(
        pb.ListWebhookEndpointsRequest(), metadata=tenant.admin.metadata)).endpoints  # fmt: skip
    assert list(endpoint.event_types) == [
        pb.WEBHOOK_EVENT_TYPE_BALANCE_LOW, pb.WEBHOOK_EVENT_TYPE_PURCHASE_COMPLETED
    ]
    assert list(endpoint.thresholds) == [25]
    await run("update", endpoint.endpoint_id, "--disable", "--description", "paused")
    rotated = await run("rotate", endpoint.endpoint_id)
    assert rotated.stdout.strip().startswith("whsec_") and rotated.stdout.strip() != secret
    await run("deliveries", "--status", "pending")
    (after,) = (await stub.ListWebhookEndpoints(
        pb.ListWebhookEndpointsRequest(), metadata=tenant.admin.metadata)).endpoints  # fmt: skip
    assert after.disabled and after.description == "paused"
    await run("delete", endpoint.endpoint_id)
    missing = await asyncio.to_thread(cli, "webhooks", "resend", "whd_nope", *base)
    assert missing.returncode != 0 and "WEBHOOK_DELIVERY_NOT_FOUND" in missing.stderr


async def test_balance_notices_only_for_tenants_with_a_balance_endpoint(
    app: App, tenant: Tenant, other_tenant: Tenant, hooks: Hooks
) -> None:
    """The flusher writes a notice per balance move only for tenants that want them: a
    deployment without webhooks pays nothing per charge."""
    source = app.flush_notices
    assert source is not None

    def entry(tenant_name: str) -> list[dict[str, str]]:
        return [{"tenant": tenant_name, "account": "a", "txn": "tx1", "kind": "consume",
                 "amount": "5", "balance": "10", "ts": "1", "request_id": "r1"}]  # fmt: skip

    await source.refresh()
    assert source(entry(tenant.name)) == []
    await create(hooks, "https://example.com/p", types=[pb.WEBHOOK_EVENT_TYPE_PURCHASE_COMPLETED])
    assert source(entry(tenant.name)) == []  # no balance type wanted
    made = await create(hooks, "https://example.com/b", types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_LOW])
    (notice,) = source(entry(tenant.name))  # refreshed by the create itself
    assert notice.notice_id == "balance:tx1" and notice.tenant == tenant.name
    assert json.loads(notice.data) == {"account": "a", "txn": "tx1", "before": 15, "after": 10}
    assert source(entry(other_tenant.name)) == []
    await hooks.admin.UpdateWebhookEndpoint(pb.UpdateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(endpoint_id=made.endpoint.endpoint_id, disabled=True),
        update_mask=field_mask_pb2.FieldMask(paths=["disabled"]), request_id=rid()))  # fmt: skip
    assert source(entry(tenant.name)) == []


async def test_reflection_and_health_list_the_webhooks_service(tenant: Tenant) -> None:
    service = pb.DESCRIPTOR.services_by_name["Webhooks"].full_name
    stub = reflection_pb2_grpc.ServerReflectionStub(tenant.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=service),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    assert service in {s.name for s in responses[0].list_services_response.service}
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert any(b"credits/v1/webhooks.proto" in blob for blob in files)
    health = health_pb2_grpc.HealthStub(tenant.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- two servers on one PostgreSQL ledger -------------------------------------------------------
async def test_two_servers_deliver_each_event_once(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """Both servers' workers fan out and claim from the one ledger: each event is attempted
    by one of them, so a receiver that always answers sees it exactly once."""
    empty_redis(redis_url)  # the flusher drains only this test's outboxes
    apps = [
        App(Settings(
            listen="127.0.0.1:0", data_dir=tmp_path / f"server-{n}", redis_url=redis_url,
            ledger_url=fresh_postgres_url, flusher=n == 0, shutdown_grace_s=1.0, webhook=FAST,
        ))
        for n in range(2)
    ]  # fmt: skip
    started: list[App] = []
    try:
        for app in apps:
            await app.start()
            started.append(app)
        assert apps[0].live is not None
        name, keys = tenant_keys(apps[0].live.store)
        tenant = await tenant_of(apps[0], name, keys)
        try:
            stub = webhooks_pb2_grpc.WebhooksStub(tenant.channel)
            await stub.CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(
                endpoint=pb.WebhookEndpoint(
                    url=receiver.url, event_types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP]),
                request_id=rid()), metadata=tenant.admin.metadata)  # fmt: skip
            await asyncio.gather(*(_grant(tenant, f"acct-{i}", 5) for i in range(60)))
            await until(lambda: len(receiver.received) >= 60, 30)
            await asyncio.sleep(0.5)  # time for a second delivery, if there were one
        finally:
            await tenant.channel.close()
    finally:
        for app in started:
            await app.stop()
            assert app.live is not None
            app.live.store.close()
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert {e["data"]["accountId"] for e in receiver.events()} == {f"acct-{i}" for i in range(60)}


@pytest.mark.settings(http_listen="127.0.0.1:0")
async def test_endpoints_over_http_json(app: App, tenant: Tenant) -> None:
    """A platform without gRPC (PHP) manages its endpoints over the HTTP/JSON gateway."""
    base = f"http://127.0.0.1:{app.http_port}/credits.v1.Webhooks"
    headers = {"Authorization": f"Bearer {tenant.admin.key}"}
    async with httpx.AsyncClient(timeout=10) as http:
        made = await http.post(f"{base}/CreateWebhookEndpoint", headers=headers, json={
            "endpoint": {"url": "https://example.com/php", "thresholds": ["100"],
                         "eventTypes": ["WEBHOOK_EVENT_TYPE_BALANCE_LOW"]},
            "requestId": rid(),
        })  # fmt: skip
        assert made.status_code == 200, made.text
        body = made.json()
        assert body["secret"].startswith("whsec_")
        assert body["endpoint"]["thresholds"] == ["100"]
        listed = await http.post(f"{base}/ListWebhookEndpoints", headers=headers, json={})
        assert [e["url"] for e in listed.json()["endpoints"]] == ["https://example.com/php"]
        bad = await http.post(f"{base}/CreateWebhookEndpoint", headers=headers, json={
            "endpoint": {"url": "ftp://x"}, "requestId": rid()})  # fmt: skip
        assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
        meter = {"Authorization": f"Bearer {tenant.meter.key}"}
        denied = await http.post(f"{base}/ListWebhookEndpoints", headers=meter, json={})
        assert denied.status_code == 403, denied.text


@pytest.mark.flusher
@pytest.mark.settings(webhook=WebhookTimings(poll_s=0.05, timeout_s=10.0, concurrency=2))
async def test_at_most_concurrency_attempts_at_once_per_endpoint(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    receiver.delay_s = 0.3
    await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP])

    await asyncio.gather(*(_grant(tenant, f"acct-{i}", 5) for i in range(8)))
    start = time.monotonic()
    await until(lambda: len(receiver.received) >= 8, 20)
    took = time.monotonic() - start
    # 8 requests of 0.3 s, two at a time: at least 4 rounds (1.2 s), never all at once.
    assert took >= 1.0, took
    assert receiver.most_at_once == 2


@pytest.mark.flusher
@pytest.mark.settings(
    webhook=WebhookTimings(poll_s=0.05, retry_base_s=0.05, retry_max_s=0.05, retry_window_s=0.4)
)
async def test_a_delivery_failing_for_the_whole_window_is_given_up(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    receiver.statuses = [503] * 1000
    failed_before = REGISTRY.get_sample_value("creditmeter_webhook_deliveries_failed_total") or 0
    await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP])
    await _grant(tenant, "a", 5)

    async def status() -> pb.WebhookDelivery | None:
        listed = await hooks.admin.ListWebhookDeliveries(pb.ListWebhookDeliveriesRequest())
        return listed.deliveries[0] if listed.deliveries else None

    deadline = time.monotonic() + 15
    while (d := await status()) is None or d.status != pb.WEBHOOK_DELIVERY_STATUS_FAILED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert d.attempts >= 2 and d.last_status_code == 503 and d.last_error == "HTTP 503"
    assert not d.HasField("next_attempt_time")
    attempts = len(receiver.received)
    await asyncio.sleep(0.3)
    assert len(receiver.received) == attempts  # no attempt after giving up
    after = REGISTRY.get_sample_value("creditmeter_webhook_deliveries_failed_total") or 0
    assert after == failed_before + 1


@pytest.mark.flusher
@pytest.mark.settings(webhook=FAST)
async def test_rotation_signs_with_the_new_secret_and_deletion_stops_deliveries(
    app: App, tenant: Tenant, hooks: Hooks, receiver: Receiver
) -> None:
    made = await create(hooks, receiver.url, types=[pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP])
    endpoint_id = made.endpoint.endpoint_id
    rotated = await hooks.admin.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(endpoint_id=endpoint_id, request_id=rid())
    )
    await _grant(tenant, "a", 5)
    await until(lambda: len(receiver.received) >= 1)
    r = receiver.received[0]
    assert verify(rotated.secret, r.headers["Creditmeter-Signature"], r.body)
    assert not verify(made.secret, r.headers["Creditmeter-Signature"], r.body)

    receiver.delay_s = 0.0
    receiver.statuses = [500] * 1000  # the next event stays pending, retried
    await _grant(tenant, "b", 5)
    await until(lambda: len(receiver.received) >= 2)
    await hooks.admin.DeleteWebhookEndpoint(
        pb.DeleteWebhookEndpointRequest(endpoint_id=endpoint_id, request_id=rid())
    )

    async def given_up() -> bool:
        listed = await hooks.admin.ListWebhookDeliveries(
            pb.ListWebhookDeliveriesRequest(status=pb.WEBHOOK_DELIVERY_STATUS_FAILED)
        )
        return [d.last_error for d in listed.deliveries] == ["endpoint deleted"]

    deadline = time.monotonic() + 10
    while not await given_up():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    seen = len(receiver.received)
    await _grant(tenant, "c", 5)  # no endpoint: nothing made, nothing sent
    await asyncio.sleep(0.5)
    assert len(receiver.received) == seen


# --- the SDK --------------------------------------------------------------------------------
@pytest.mark.flusher
@pytest.mark.settings(webhook=FAST)
async def test_sdk_manages_endpoints_and_verifies_deliveries(
    app: App, tenant: Tenant, receiver: Receiver
) -> None:
    from creditmeter.client import AsyncClient, Client, WebhookEndpointNotFound
    from creditmeter.client.webhooks import verify_signature

    async with AsyncClient(f"127.0.0.1:{app.port}", tenant.admin.key) as client:
        made = await client.create_webhook_endpoint(
            receiver.url, ["balance.topped_up", "recharge.due"], thresholds=[10]
        )
        endpoint_id = made.endpoint.endpoint_id
        assert list(made.endpoint.event_types) == [
            pb.WEBHOOK_EVENT_TYPE_BALANCE_TOPPED_UP, pb.WEBHOOK_EVENT_TYPE_RECHARGE_DUE
        ]
        changed = await client.update_webhook_endpoint(endpoint_id, description="sdk")
        assert changed.endpoint.description == "sdk" and list(changed.endpoint.thresholds) == [10]
        await _grant(tenant, "a", 5)
        await until(lambda: len(receiver.received) >= 1)
        r = receiver.received[0]
        header = r.headers["Creditmeter-Signature"]
        assert verify_signature(made.secret, header, r.body)
        assert not verify_signature(made.secret, header, r.body + b"x")
        assert not verify_signature("whsec_other", header, r.body)
        assert not verify_signature(made.secret, header, r.body, now_s=time.time() + 3600)
        assert not verify_signature(made.secret, "garbage", r.body)
        page = await client.list_webhook_deliveries(endpoint_id=endpoint_id, status="delivered")
        assert [d.event_id for d in page.deliveries] == [r.event["id"]]

    def sync_calls() -> None:
        with Client(f"127.0.0.1:{app.port}", tenant.admin.key) as sync:
            assert [e.endpoint_id for e in sync.list_webhook_endpoints().endpoints] == [endpoint_id]
            rotated = sync.rotate_webhook_secret(endpoint_id)
            assert rotated.secret != made.secret
            delivery_id = sync.list_webhook_deliveries().deliveries[0].delivery_id
            assert sync.resend_webhook_delivery(delivery_id).delivery.status == (
                pb.WEBHOOK_DELIVERY_STATUS_PENDING
            )
            sync.delete_webhook_endpoint(endpoint_id)
            with pytest.raises(WebhookEndpointNotFound):
                sync.delete_webhook_endpoint(endpoint_id)

    await asyncio.to_thread(sync_calls)
