"""Authentication, tenant isolation and role checks of every Credits RPC.

The RPC list comes from the proto descriptor, so a new RPC fails `test_request_table_*`
until it has a valid request below (and therefore gets every check in this file).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import webhooks_pb2, webhooks_pb2_grpc
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.model import Delivery
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, rid
from tests.helpers import Failure, fails

SERVICE = pb.DESCRIPTOR.services_by_name["Credits"]
METHODS: list[str] = [m.name for m in SERVICE.methods]
ACCOUNT = "acct-1"
SEED = 1_000
#: seed() also grants a lot here for VoidGrant to void; its id is only known at run time.
VOID_ACCOUNT = "acct-void"
VOID_LOT = {"id": ""}
#: seed() starts two call sessions on their own account (they hold credit).
SESSION_ACCOUNT = "acct-calls"
UPDATE_SESSION = "auth-update"
END_SESSION = "auth-end"

#: One request per RPC that succeeds for an admin key once ACCOUNT holds SEED credits.
VALID_REQUESTS: dict[str, Callable[[], Message]] = {
    "Grant": lambda: pb.GrantRequest(account_id=ACCOUNT, amount=5, request_id=rid()),
    "Consume": lambda: pb.ConsumeRequest(account_id=ACCOUNT, feature="text", request_id=rid()),
    "ConsumeBatch": lambda: pb.ConsumeBatchRequest(
        items=[pb.ConsumeRequest(account_id=ACCOUNT, feature="text", request_id=rid())]
    ),
    "Check": lambda: pb.CheckRequest(account_id=ACCOUNT, feature="text"),
    "CheckBatch": lambda: pb.CheckBatchRequest(
        items=[pb.CheckRequest(account_id=ACCOUNT, feature="voice", quantity=61)]
    ),
    "Meter": lambda: pb.MeterRequest(
        consume=pb.ConsumeRequest(account_id=ACCOUNT, feature="text", request_id=rid())
    ),
    "GetBalance": lambda: pb.GetBalanceRequest(account_id=ACCOUNT),
    "SetBalance": lambda: pb.SetBalanceRequest(account_id=ACCOUNT, amount=5, request_id=rid()),
    "GetUsage": lambda: pb.GetUsageRequest(account_id=ACCOUNT),
    "SetRate": lambda: pb.SetRateRequest(
        rate=pb.Rate(feature="sms", credits_per_unit=2), request_id=rid()
    ),
    "ListRates": lambda: pb.ListRatesRequest(),
    "SetAccountOptions": lambda: pb.SetAccountOptionsRequest(
        account_id=ACCOUNT, unlimited=False, request_id=rid()
    ),
    "SetUsageLimit": lambda: pb.SetUsageLimitRequest(
        limit=pb.UsageLimit(feature="text", period=pb.USAGE_LIMIT_PERIOD_DAY, limit=1000),
        request_id=rid(),
    ),
    "ListUsageLimits": lambda: pb.ListUsageLimitsRequest(account_id=ACCOUNT),
    "SetRechargePolicy": lambda: pb.SetRechargePolicyRequest(
        account_id=ACCOUNT, policy=pb.RechargePolicy(threshold=10), request_id=rid()
    ),
    "GetRechargePolicy": lambda: pb.GetRechargePolicyRequest(account_id=ACCOUNT),
    "ListTransactions": lambda: pb.ListTransactionsRequest(account_id=ACCOUNT),
    "GetUsageReport": lambda: pb.GetUsageReportRequest(
        account_id=ACCOUNT,
        start_time=timestamp_pb2.Timestamp(seconds=0),
        end_time=timestamp_pb2.Timestamp(seconds=86_400),
    ),
    "GetLedgerStatus": lambda: pb.GetLedgerStatusRequest(),
    "VoidGrant": lambda: pb.VoidGrantRequest(
        account_id=VOID_ACCOUNT, lot_id=VOID_LOT["id"], reason="test", request_id=rid()
    ),
    "StartSession": lambda: pb.StartSessionRequest(
        account_id=ACCOUNT, feature="voice", session_id=rid()
    ),
    # seed() starts these two sessions; each test has a fresh tenant, so sequence 1 is next.
    "UpdateSession": lambda: pb.UpdateSessionRequest(
        account_id=SESSION_ACCOUNT, session_id=UPDATE_SESSION, sequence=1, used_seconds=10
    ),
    "EndSession": lambda: pb.EndSessionRequest(
        account_id=SESSION_ACCOUNT, session_id=END_SESSION, sequence=1, used_seconds=10
    ),
    "WatchBalance": lambda: pb.WatchBalanceRequest(account_id=ACCOUNT, thresholds=[10]),
    "GetSession": lambda: pb.GetSessionRequest(
        account_id=SESSION_ACCOUNT, session_id=UPDATE_SESSION
    ),
}

#: Server streams answered by the stream in place (see invoke).
WATCH_IN_PLACE: dict[str, Callable[[], Message]] = {"WatchBalance": pb.WatchBalanceResponse}

#: What each role may call, as the proto documents it (independent of the server's table).
READ_RPCS = frozenset(
    {
        "GetBalance",
        "GetUsage",
        "ListRates",
        "ListTransactions",
        "GetUsageReport",
        "GetSession",
        "WatchBalance",
        "Check",
        "CheckBatch",
        "ListUsageLimits",
        "GetRechargePolicy",
    }
)
METER_RPCS = frozenset(
    {"Consume", "ConsumeBatch", "Meter", "StartSession", "UpdateSession", "EndSession"}
)
ALLOWED: dict[str, frozenset[str]] = {
    "read": READ_RPCS,
    "meter": READ_RPCS | METER_RPCS,
    "admin": frozenset(METHODS),
}


def valid_request(method: str) -> Message:
    assert method in VALID_REQUESTS, f"add a valid {method} request to VALID_REQUESTS"
    request = VALID_REQUESTS[method]()
    assert request.DESCRIPTOR is SERVICE.methods_by_name[method].input_type
    return request


def invoke(target: Any, method: str, request: Message, **kwargs: Any) -> Awaitable[Any]:
    """Call `method` of a stub or Caller with one request, in the call style its kind needs;
    an awaitable of the (first) response.

    A streaming RPC sends the request as its only message (client streaming) and answers
    with its first response; the call is then cancelled (a server stream may never end).
    A watch (server streaming only) has no response until a balance changes: its success
    is the stream in place (response headers sent, no status), answered as an empty
    response of its type.
    """
    rpc = getattr(target, method)
    descriptor = SERVICE.methods_by_name[method]
    if not descriptor.client_streaming and not descriptor.server_streaming:
        return cast(Awaitable[Any], rpc(request, **kwargs))
    if not descriptor.client_streaming:

        async def in_place() -> Any:
            call = rpc(request, **kwargs)
            try:
                await call.initial_metadata()
                await asyncio.sleep(0.05)  # a refusal ends the call right after its headers
                if call.done():
                    async for _ in call:  # raises the call's error
                        pass
                    raise AssertionError(f"{method} ended without an error or a watch")
                return WATCH_IN_PLACE[method]()
            finally:
                call.cancel()

        return in_place()

    async def first_response() -> Any:
        call = rpc(iter([request]) if descriptor.client_streaming else request, **kwargs)
        try:
            async for response in call:
                return response
            raise AssertionError(f"{method} ended without a response")
        finally:
            call.cancel()

    return first_response()


def raw_call(tenant: Tenant, method: str, authorization: str | None) -> Awaitable[Any]:
    """Call `method` with exactly the given authorization metadata (None: none at all)."""
    metadata = None if authorization is None else (("authorization", authorization),)
    return invoke(tenant.stub, method, valid_request(method), metadata=metadata)


def caller(tenant: Tenant, role: str) -> Caller:
    by_role: dict[str, Caller] = {"admin": tenant.admin, "meter": tenant.meter, "read": tenant.read}
    return by_role[role]


def key_id(key: str) -> str:
    prefix, kid, _secret = key.split("_", 2)
    assert prefix == "cm" and kid
    return kid


async def seed(tenant: Tenant, account: str = ACCOUNT, amount: int = SEED) -> None:
    g = await tenant.admin.Grant(
        pb.GrantRequest(account_id=account, amount=amount, request_id=rid())
    )
    assert g.balance == amount
    void = await tenant.admin.Grant(
        pb.GrantRequest(account_id=VOID_ACCOUNT, amount=5, request_id=rid())
    )
    VOID_LOT["id"] = void.lot.lot_id
    await tenant.admin.Grant(
        pb.GrantRequest(account_id=SESSION_ACCOUNT, amount=100, request_id=rid())
    )
    for session in (UPDATE_SESSION, END_SESSION):
        await tenant.meter.StartSession(
            pb.StartSessionRequest(account_id=SESSION_ACCOUNT, feature="voice", session_id=session)
        )


async def state(
    tenant: Tenant, account: str = ACCOUNT, via: Caller | None = None
) -> tuple[Message, Message, Message]:
    """Everything an RPC could change for the tenant (balance and lots, usage, rate card)."""
    who = via or tenant.read
    return (
        await who.GetBalance(pb.GetBalanceRequest(account_id=account)),
        await who.GetUsage(pb.GetUsageRequest(account_id=account)),
        await who.ListRates(pb.ListRatesRequest()),
    )


def assert_unauthenticated(f: Failure) -> None:
    assert f.code == grpc.StatusCode.UNAUTHENTICATED, f
    assert f.reason == "API_KEY_INVALID", f
    assert f.domain == "creditmeter", f


# --- the table itself ----------------------------------------------------------------------
def test_request_table_covers_every_rpc() -> None:
    assert set(VALID_REQUESTS) == set(METHODS)
    assert len(METHODS) >= 8  # Grant .. SetAccountOptions, as of credits.v1
    for method in METHODS:
        valid_request(method)


def test_role_table_covers_every_rpc() -> None:
    for allowed in ALLOWED.values():
        assert allowed <= set(METHODS)
    assert ALLOWED["admin"] == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
async def test_admin_can_call_every_rpc(tenant: Tenant, method: str) -> None:
    """The valid requests really are valid, so the refusals below are about the key alone."""
    await seed(tenant)
    response = await invoke(tenant.admin, method, valid_request(method))
    assert response.DESCRIPTOR is SERVICE.methods_by_name[method].output_type


# --- missing and wrong keys ---------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
async def test_missing_key_is_unauthenticated(tenant: Tenant, method: str) -> None:
    await seed(tenant)
    before = await state(tenant)
    f = await fails(raw_call(tenant, method, None))
    assert_unauthenticated(f)
    assert f.metadata == {}
    assert await state(tenant) == before


WRONG_KEYS: dict[str, Callable[[Tenant], str]] = {
    "unknown-key-id": lambda t: "Bearer cm_000000000000_" + t.admin.key.split("_", 2)[2],
    "known-id-wrong-secret": lambda t: f"Bearer cm_{key_id(t.admin.key)}_not-the-secret",
    "known-id-empty-secret": lambda t: f"Bearer cm_{key_id(t.admin.key)}_",
    "secret-of-another-key": lambda t: (
        f"Bearer cm_{key_id(t.admin.key)}_{t.read.key.split('_', 2)[2]}"
    ),
    "wrong-prefix": lambda t: "Bearer xx_" + t.admin.key.split("_", 1)[1],
    "garbage": lambda t: "Bearer garbage",
    "bearer-without-key": lambda t: "Bearer ",
    "empty-header": lambda t: "",
    "basic-scheme": lambda t: f"Basic {t.admin.key}",
    "token-scheme": lambda t: f"Token {t.admin.key}",
    "no-scheme": lambda t: t.admin.key,
    "key-then-junk": lambda t: f"Bearer {t.admin.key}x",
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("wrong", list(WRONG_KEYS))
async def test_wrong_key_is_unauthenticated(tenant: Tenant, method: str, wrong: str) -> None:
    await seed(tenant)
    before = await state(tenant)
    f = await fails(raw_call(tenant, method, WRONG_KEYS[wrong](tenant)))
    assert_unauthenticated(f)
    assert await state(tenant) == before


async def test_well_formed_header_is_accepted(tenant: Tenant) -> None:
    """Counterpart of the refusals: the scheme is case-insensitive, the key exact."""
    await seed(tenant)
    for header in (f"Bearer {tenant.read.key}", f"bearer {tenant.read.key}"):
        response = await raw_call(tenant, "GetBalance", header)
        assert response.balance == SEED


# --- roles -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("role", ["read", "meter", "admin"])
async def test_role_matrix(tenant: Tenant, role: str, method: str) -> None:
    await seed(tenant)
    before = await state(tenant)
    call = invoke(caller(tenant, role), method, valid_request(method))
    if method in ALLOWED[role]:
        response = await call  # must succeed outright: no PERMISSION_DENIED, no UNAUTHENTICATED
        assert response.DESCRIPTOR is SERVICE.methods_by_name[method].output_type
    else:
        f = await fails(call)
        assert f.code == grpc.StatusCode.PERMISSION_DENIED, f
        assert f.reason == "ROLE_NOT_ALLOWED", f
        assert f.domain == "creditmeter"
        assert f.metadata == {"role": role, "method": method}
        assert await state(tenant) == before


async def test_denied_call_with_invalid_request_is_still_permission_denied(tenant: Tenant) -> None:
    """The role is checked before the request is looked at: a read key learns nothing about
    validation (or account existence) from a Grant it may not make."""
    f = await fails(tenant.read.Grant(pb.GrantRequest(account_id="{bad}", amount=-1)))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    assert f.reason == "ROLE_NOT_ALLOWED"
    assert f.violations == {}


# --- tenant isolation ------------------------------------------------------------------------
async def test_other_tenant_cannot_read_account(tenant: Tenant, other_tenant: Tenant) -> None:
    await seed(tenant)
    for who in (other_tenant.admin, other_tenant.meter, other_tenant.read):
        f = await fails(who.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT)))
        assert f.code == grpc.StatusCode.NOT_FOUND, f
        assert f.reason == "ACCOUNT_NOT_FOUND"
        assert f.metadata == {"account_id": ACCOUNT}
        f = await fails(who.GetUsage(pb.GetUsageRequest(account_id=ACCOUNT)))
        assert f.code == grpc.StatusCode.NOT_FOUND, f
        assert f.reason == "ACCOUNT_NOT_FOUND"


async def test_other_tenant_cannot_spend_account(tenant: Tenant, other_tenant: Tenant) -> None:
    await seed(tenant)
    before = await state(tenant)
    for who in (other_tenant.admin, other_tenant.meter):
        f = await fails(
            who.Consume(pb.ConsumeRequest(account_id=ACCOUNT, feature="text", request_id=rid()))
        )
        assert f.code == grpc.StatusCode.FAILED_PRECONDITION, f
        assert f.reason == "INSUFFICIENT_CREDITS"
        assert f.metadata == {"balance": "0", "required": "1"}
        f = await fails(
            who.Consume(pb.ConsumeRequest(account_id=ACCOUNT, feature="text", amount=SEED,
                                          request_id=rid()))
        )
        assert f.metadata["balance"] == "0"
    assert await state(tenant) == before
    f = await fails(other_tenant.admin.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT)))
    assert f.code == grpc.StatusCode.NOT_FOUND  # the failed charges created nothing either


async def test_other_tenant_writes_stay_in_its_own_account(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    await seed(tenant)
    before = await state(tenant)
    b = other_tenant.admin
    g = await b.Grant(pb.GrantRequest(account_id=ACCOUNT, amount=7, request_id=rid()))
    assert g.balance == 7
    s = await b.SetBalance(
        pb.SetBalanceRequest(account_id=ACCOUNT, amount=3, reset=True, request_id=rid())
    )
    assert (s.balance, s.removed) == (3, 7)
    c = await b.Consume(pb.ConsumeRequest(account_id=ACCOUNT, feature="text", request_id=rid()))
    assert c.balance == 2
    o = await b.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id=ACCOUNT, unlimited=True, request_id=rid())
    )
    assert o.options.unlimited
    assert await state(tenant) == before
    balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT))
    assert (balance.balance, balance.unlimited) == (SEED, False)


async def test_same_request_id_in_other_tenant_is_independent(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    """A request id is not shared across tenants: B's call is neither refused as a reuse nor
    answered with A's stored response (which would leak A's lot)."""
    request_id = rid()
    a = await tenant.admin.Grant(pb.GrantRequest(account_id=ACCOUNT, amount=SEED,
                                                 request_id=request_id))
    b = await other_tenant.admin.Grant(pb.GrantRequest(account_id=ACCOUNT, amount=7,
                                                       request_id=request_id))
    assert b.lot.lot_id != a.lot.lot_id
    assert (b.balance, b.lot.amount) == (7, 7)  # B's own new lot, not A's response
    retry = await other_tenant.admin.Grant(pb.GrantRequest(account_id=ACCOUNT, amount=7,
                                                           request_id=request_id))
    assert retry.lot.lot_id == b.lot.lot_id  # B's retry replays B's record
    a_now = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT))
    assert a_now.balance == SEED and [lot.lot_id for lot in a_now.lots] == [a.lot.lot_id]
    rate_id = rid()
    await tenant.admin.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=2),
                                                 request_id=rate_id))
    r = await other_tenant.admin.SetRate(
        pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=3), request_id=rate_id)
    )
    assert r.rate.credits_per_unit == 3


def rates_of(response: Any) -> dict[str, pb.Rate]:
    return {r.feature: r for r in response.rates}


async def test_other_tenant_rates_are_separate(tenant: Tenant, other_tenant: Tenant) -> None:
    await tenant.admin.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=2),
                                                 request_id=rid()))
    before = await tenant.read.ListRates(pb.ListRatesRequest())
    b = other_tenant.admin
    await b.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="text", credits_per_unit=7),
                                      request_id=rid()))
    await b.SetRate(pb.SetRateRequest(rate=pb.Rate(feature="sms", credits_per_unit=9),
                                      request_id=rid()))
    await b.SetRate(pb.SetRateRequest(
        rate=pb.Rate(feature="fax", credits_per_unit=4, unit=pb.RATE_UNIT_TIME,
                     billing_increment=duration_pb2.Duration(seconds=30)),
        request_id=rid(),
    ))
    after = await tenant.read.ListRates(pb.ListRatesRequest())
    assert after == before
    mine = rates_of(after)
    assert mine["text"].credits_per_unit == 1 and mine["sms"].credits_per_unit == 2
    assert "fax" not in mine
    theirs = rates_of(await other_tenant.read.ListRates(pb.ListRatesRequest()))
    assert theirs["text"].credits_per_unit == 7 and theirs["sms"].credits_per_unit == 9
    assert "fax" in theirs
    # And the price used for A's consumption is A's own.
    await seed(tenant)
    c = await tenant.meter.Consume(pb.ConsumeRequest(account_id=ACCOUNT, feature="text",
                                                     quantity=3, request_id=rid()))
    assert c.amount == 3


# --- revoked keys ----------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["read", "meter", "admin"])
async def test_revoked_key_is_refused(
    app: App, tenant: Tenant, clock: ManualClock, role: str
) -> None:
    await seed(tenant)
    revoked = caller(tenant, role)
    assert (await revoked.GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT))).balance == SEED
    assert app.live is not None
    store = app.live.store
    assert store.revoke_key(key_id(revoked.key), clock.now_ms())
    await app.live.refresh()
    witness = tenant.read if role != "read" else tenant.meter
    before = await state(tenant, via=witness)
    for method in METHODS:
        f = await fails(invoke(revoked, method, valid_request(method)))
        assert_unauthenticated(f)
    assert await state(tenant, via=witness) == before
    # Only that key: the tenant's other keys still work.
    for other in {"read", "meter", "admin"} - {role}:
        balance = await caller(tenant, other).GetBalance(pb.GetBalanceRequest(account_id=ACCOUNT))
        assert balance.balance == SEED
    assert not store.revoke_key(key_id(revoked.key), clock.now_ms())  # already revoked


# --- open services -----------------------------------------------------------------------------
@pytest.mark.parametrize("authorization", [None, "Bearer garbage"], ids=["no-key", "bad-key"])
async def test_health_check_needs_no_key(tenant: Tenant, authorization: str | None) -> None:
    metadata = None if authorization is None else (("authorization", authorization),)
    stub = health_pb2_grpc.HealthStub(tenant.channel)
    for service in ("", SERVICE.full_name):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("authorization", [None, "Bearer garbage"], ids=["no-key", "bad-key"])
async def test_reflection_needs_no_key(tenant: Tenant, authorization: str | None) -> None:
    metadata = None if authorization is None else (("authorization", authorization),)
    stub = reflection_pb2_grpc.ServerReflectionStub(tenant.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE.full_name),
    ]
    responses = [r async for r in stub.ServerReflectionInfo(iter(requests), metadata=metadata)]
    assert len(responses) == 2
    services = {s.name for s in responses[0].list_services_response.service}
    assert SERVICE.full_name in services
    assert "grpc.health.v1.Health" in services
    files = responses[1].file_descriptor_response.file_descriptor_proto
    assert files, responses[1]
    assert any(b"credits/v1/credits.proto" in blob for blob in files)


# --- the Webhooks service: admin only ---------------------------------------------------------
WEBHOOKS = webhooks_pb2.DESCRIPTOR.services_by_name["Webhooks"]
WEBHOOK_METHODS: list[str] = [m.name for m in WEBHOOKS.methods]


async def webhook_requests(app: App, tenant: Tenant) -> dict[str, Message]:
    """One valid request per Webhooks RPC, on an endpoint and a delivery made here."""
    stub = webhooks_pb2_grpc.WebhooksStub(tenant.channel)
    url = "https://example.com/hook"
    endpoint = webhooks_pb2.WebhookEndpoint(url=url, event_types=[1])
    made = await stub.CreateWebhookEndpoint(
        webhooks_pb2.CreateWebhookEndpointRequest(endpoint=endpoint, request_id=rid()),
        metadata=tenant.admin.metadata,
    )
    endpoint_id = made.endpoint.endpoint_id
    assert app.ledger is not None
    # Made now: one made at the epoch is past the retention, and the worker's sweep may
    # prune it before the resend below.
    now_ms = int(time.time() * 1000)
    delivery = await app.ledger.add_delivery(Delivery(
        delivery_id=f"whd_{rid()}", tenant=tenant.name, endpoint_id=endpoint_id,
        event_id="evt_1", event_type="balance.low", body="{}", status="delivered",
        attempts=1, create_ms=now_ms, next_attempt_ms=now_ms,
    ))  # fmt: skip
    w = webhooks_pb2
    return {
        "CreateWebhookEndpoint": w.CreateWebhookEndpointRequest(
            endpoint=endpoint, request_id=rid()
        ),
        "ListWebhookEndpoints": w.ListWebhookEndpointsRequest(),
        "UpdateWebhookEndpoint": w.UpdateWebhookEndpointRequest(
            endpoint=w.WebhookEndpoint(endpoint_id=endpoint_id, description="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]), request_id=rid(),
        ),
        "RotateWebhookSecret": w.RotateWebhookSecretRequest(
            endpoint_id=endpoint_id, request_id=rid()
        ),
        "ListWebhookDeliveries": w.ListWebhookDeliveriesRequest(),
        "ResendWebhookDelivery": w.ResendWebhookDeliveryRequest(
            delivery_id=delivery.delivery_id, request_id=rid()
        ),
        "DeleteWebhookEndpoint": w.DeleteWebhookEndpointRequest(
            endpoint_id=endpoint_id, request_id=rid()
        ),
    }  # fmt: skip


async def test_webhook_rpcs_are_admin_only(app: App, tenant: Tenant) -> None:
    requests = await webhook_requests(app, tenant)
    assert set(requests) == set(WEBHOOK_METHODS)
    stub = webhooks_pb2_grpc.WebhooksStub(tenant.channel)
    before = await stub.ListWebhookEndpoints(
        webhooks_pb2.ListWebhookEndpointsRequest(), metadata=tenant.admin.metadata
    )
    for method, request in requests.items():
        rpc = getattr(stub, method)
        for role in ("read", "meter"):
            f = await fails(rpc(request, metadata=caller(tenant, role).metadata))
            assert (f.code, f.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_NOT_ALLOWED")
            assert f.metadata == {"role": role, "method": method}
        f = await fails(rpc(request))
        assert_unauthenticated(f)
    # Nothing changed by the refusals.
    assert before == await stub.ListWebhookEndpoints(
        webhooks_pb2.ListWebhookEndpointsRequest(), metadata=tenant.admin.metadata
    )
    for method, request in requests.items():  # the admin's calls succeed, in table order
        response = await getattr(stub, method)(request, metadata=tenant.admin.metadata)
        assert response.DESCRIPTOR is WEBHOOKS.methods_by_name[method].output_type


async def test_webhook_endpoints_are_per_tenant(
    app: App, tenant: Tenant, other_tenant: Tenant
) -> None:
    requests = await webhook_requests(app, tenant)
    stub = webhooks_pb2_grpc.WebhooksStub(other_tenant.channel)
    md = other_tenant.admin.metadata
    listed = await stub.ListWebhookEndpoints(
        webhooks_pb2.ListWebhookEndpointsRequest(), metadata=md
    )
    assert not listed.endpoints
    for method in ("UpdateWebhookEndpoint", "RotateWebhookSecret", "DeleteWebhookEndpoint"):
        f = await fails(getattr(stub, method)(requests[method], metadata=md))
        assert f.reason == "WEBHOOK_ENDPOINT_NOT_FOUND", method
    f = await fails(stub.ResendWebhookDelivery(requests["ResendWebhookDelivery"], metadata=md))
    assert f.reason == "WEBHOOK_DELIVERY_NOT_FOUND"
    deliveries = await stub.ListWebhookDeliveries(
        webhooks_pb2.ListWebhookDeliveriesRequest(), metadata=md
    )
    assert not deliveries.deliveries
