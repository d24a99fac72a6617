"""Packs and purchases over gRPC: catalog, one- and two-step purchases, trials, refunds."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from creditmeter.api.credits.v1 import credits_pb2 as cpb
from creditmeter.api.credits.v1 import packs_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2_grpc as pb_grpc
from creditmeter.domain.clock import ManualClock
from creditmeter.transport.server import App
from tests.conftest import Caller, Tenant, rid
from tests.helpers import fails

DAY_MS = 86_400_000


@pytest.fixture
def packs(tenant: Tenant) -> dict[str, Caller]:
    stub = pb_grpc.PacksStub(tenant.channel)
    return {role: Caller(stub, getattr(tenant, role).key) for role in ("admin", "meter", "read")}  # type: ignore[arg-type]


async def make_pack(admin: Caller, **fields: Any) -> pb.Pack:
    fields.setdefault("price", pb.Price(amount_minor=499, currency="EUR"))
    pack = pb.Pack(name=fields.pop("name", "Starter"), credits=fields.pop("credits", 100), **fields)
    return (await admin.CreatePack(pb.CreatePackRequest(pack=pack, request_id=rid()))).pack  # type: ignore[no-any-return]


async def balance(t: Tenant, account: str) -> cpb.GetBalanceResponse:
    return await t.read.GetBalance(cpb.GetBalanceRequest(account_id=account))  # type: ignore[no-any-return]


async def test_catalog_lifecycle(packs: dict[str, Caller], clock: ManualClock) -> None:
    admin, read = packs["admin"], packs["read"]
    a = await make_pack(admin, name="A", bonus_credits=20, validity_days=30)
    clock.advance(1)  # listed by creation time
    b = await make_pack(admin, name="B", credits=500)
    assert a.active and not a.archived and a.pack_id != b.pack_id
    got = (await read.GetPack(pb.GetPackRequest(pack_id=a.pack_id))).pack
    assert got == a
    listed = (await read.ListPacks(pb.ListPacksRequest())).packs
    assert [p.name for p in listed] == ["A", "B"]
    updated = (
        await admin.UpdatePack(
            pb.UpdatePackRequest(
                pack=pb.Pack(pack_id=a.pack_id, credits=150, name="ignored"),
                update_mask=field_mask_pb2.FieldMask(paths=["credits"]),
                request_id=rid(),
            )
        )
    ).pack
    assert (updated.credits, updated.name, updated.bonus_credits) == (150, "A", 20)
    await admin.DeletePack(pb.DeletePackRequest(pack_id=b.pack_id, request_id=rid()))
    assert [p.name for p in (await read.ListPacks(pb.ListPacksRequest())).packs] == ["A"]
    everything = (await read.ListPacks(pb.ListPacksRequest(show_archived=True))).packs
    assert [(p.name, p.archived) for p in everything] == [("A", False), ("B", True)]
    f = await fails(read.CreatePack(pb.CreatePackRequest(pack=a, request_id=rid())))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    f = await fails(
        admin.UpdatePack(
            pb.UpdatePackRequest(
                pack=pb.Pack(pack_id=a.pack_id, trial=True),
                update_mask=field_mask_pb2.FieldMask(paths=["trial"]),
                request_id=rid(),
            )
        )
    )
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "update_mask.paths[0]" in f.violations


async def test_purchase_grants_credits_and_a_bonus_lot(
    packs: dict[str, Caller], tenant: Tenant, clock: ManualClock
) -> None:
    pack = await make_pack(packs["admin"], credits=100, bonus_credits=25, validity_days=30)
    r = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="buyer", pack_id=pack.pack_id, payment_reference="pay_1", request_id=rid()
        )
    )
    assert r.balance == 125 and r.purchase.status == pb.PURCHASE_STATUS_COMPLETED
    assert (r.purchase.pack_name, r.purchase.price.amount_minor) == ("Starter", 499)
    lots = (await balance(tenant, "buyer")).lots
    # The bonus is promotional: it burns first at equal priority and expiry.
    assert [(lot.lot_id, lot.amount, lot.source) for lot in lots] == [
        (r.purchase.lot_ids[1], 25, cpb.LOT_SOURCE_BONUS),
        (r.purchase.lot_ids[0], 100, cpb.LOT_SOURCE_PURCHASE),
    ]
    expiry = lots[0].expires_at.seconds * 1000
    assert abs(expiry - (clock.now_ms() + 30 * DAY_MS)) < 1000
    # The same payment reference again (another request): the first purchase, no credits.
    again = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="buyer", pack_id=pack.pack_id, payment_reference="pay_1", request_id=rid()
        )
    )
    assert again.purchase.purchase_id == r.purchase.purchase_id and again.balance == 125


async def test_concurrent_purchases_with_one_payment_reference(
    packs: dict[str, Caller], tenant: Tenant
) -> None:
    pack = await make_pack(packs["admin"], credits=10)
    replies = await asyncio.gather(
        *(
            packs["admin"].PurchasePack(
                pb.PurchasePackRequest(
                    account_id="race",
                    pack_id=pack.pack_id,
                    payment_reference="pay_once",
                    request_id=rid(),
                )
            )
            for _ in range(20)
        )
    )
    assert len({r.purchase.purchase_id for r in replies}) == 1
    assert (await balance(tenant, "race")).balance == 10


async def test_pack_changes_never_alter_what_was_bought(
    packs: dict[str, Caller], tenant: Tenant
) -> None:
    pack = await make_pack(packs["admin"], credits=100)
    r = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="keep", pack_id=pack.pack_id, payment_reference="pay_k", request_id=rid()
        )
    )
    await packs["admin"].UpdatePack(
        pb.UpdatePackRequest(
            pack=pb.Pack(
                pack_id=pack.pack_id, credits=1, price=pb.Price(amount_minor=1, currency="USD")
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["credits", "price"]),
            request_id=rid(),
        )
    )
    await packs["admin"].DeletePack(pb.DeletePackRequest(pack_id=pack.pack_id, request_id=rid()))
    p = (
        await packs["read"].GetPurchase(pb.GetPurchaseRequest(purchase_id=r.purchase.purchase_id))
    ).purchase
    assert (p.credits, p.price.amount_minor, p.price.currency) == (100, 499, "EUR")
    assert (await balance(tenant, "keep")).balance == 100
    f = await fails(
        packs["admin"].PurchasePack(
            pb.PurchasePackRequest(
                account_id="keep",
                pack_id=pack.pack_id,
                payment_reference="pay_k2",
                request_id=rid(),
            )
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PACK_NOT_ACTIVE")


async def test_two_step_purchase_and_expiry(
    packs: dict[str, Caller], tenant: Tenant, clock: ManualClock, app: App
) -> None:
    pack = await make_pack(packs["admin"], credits=40)
    pending = (
        await packs["admin"].CreatePurchase(
            pb.CreatePurchaseRequest(account_id="two", pack_id=pack.pack_id, request_id=rid())
        )
    ).purchase
    assert pending.status == pb.PURCHASE_STATUS_PENDING and not pending.lot_ids
    done = await packs["admin"].CompletePurchase(
        pb.CompletePurchaseRequest(
            purchase_id=pending.purchase_id, payment_reference="pay_2", request_id=rid()
        )
    )
    assert done.balance == 40 and done.purchase.status == pb.PURCHASE_STATUS_COMPLETED
    # Completing again with the same payment is a replay, not new credit.
    again = await packs["admin"].CompletePurchase(
        pb.CompletePurchaseRequest(
            purchase_id=pending.purchase_id, payment_reference="pay_2", request_id=rid()
        )
    )
    assert again.balance == 40

    late = (
        await packs["admin"].CreatePurchase(
            pb.CreatePurchaseRequest(account_id="two", pack_id=pack.pack_id, request_id=rid())
        )
    ).purchase
    clock.advance(app.settings.pending_purchase_ttl_ms + 1)
    got = (
        await packs["read"].GetPurchase(pb.GetPurchaseRequest(purchase_id=late.purchase_id))
    ).purchase
    assert got.status == pb.PURCHASE_STATUS_EXPIRED
    f = await fails(
        packs["admin"].CompletePurchase(
            pb.CompletePurchaseRequest(
                purchase_id=late.purchase_id, payment_reference="pay_3", request_id=rid()
            )
        )
    )
    assert (f.code, f.reason, f.metadata["status"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PURCHASE_NOT_PENDING",
        "expired",
    )
    assert (await balance(tenant, "two")).balance == 40

    cancelled = (
        await packs["admin"].CreatePurchase(
            pb.CreatePurchaseRequest(account_id="two", pack_id=pack.pack_id, request_id=rid())
        )
    ).purchase
    await packs["admin"].CancelPurchase(
        pb.CancelPurchaseRequest(purchase_id=cancelled.purchase_id, request_id=rid())
    )
    f = await fails(
        packs["admin"].CompletePurchase(
            pb.CompletePurchaseRequest(
                purchase_id=cancelled.purchase_id, payment_reference="pay_4", request_id=rid()
            )
        )
    )
    assert f.reason == "PURCHASE_NOT_PENDING"
    listed = (
        await packs["read"].ListPurchases(
            pb.ListPurchasesRequest(account_id="two", status=pb.PURCHASE_STATUS_EXPIRED)
        )
    ).purchases
    assert [p.purchase_id for p in listed] == [late.purchase_id]


async def test_trial_once_per_account(packs: dict[str, Caller], tenant: Tenant) -> None:
    trial = await make_pack(
        packs["admin"],
        name="Trial",
        credits=5,
        trial=True,
        price=pb.Price(amount_minor=0, currency="EUR"),
    )
    first = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(account_id="newbie", pack_id=trial.pack_id, request_id=rid())
    )
    assert first.balance == 5
    f = await fails(
        packs["admin"].PurchasePack(
            pb.PurchasePackRequest(account_id="newbie", pack_id=trial.pack_id, request_id=rid())
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TRIAL_ALREADY_USED")
    other = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(account_id="other", pack_id=trial.pack_id, request_id=rid())
    )
    assert other.balance == 5
    assert (await balance(tenant, "newbie")).balance == 5


async def test_refund_after_partial_spend(
    packs: dict[str, Caller], tenant: Tenant, clock: ManualClock
) -> None:
    pack = await make_pack(packs["admin"], credits=100, bonus_credits=10)
    other = await make_pack(packs["admin"], name="Other", credits=50)
    r = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="ref", pack_id=pack.pack_id, payment_reference="pay_r", request_id=rid()
        )
    )
    clock.advance(1)  # the other purchase is younger: the oldest lot burns first
    await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="ref", pack_id=other.pack_id, payment_reference="pay_o", request_id=rid()
        )
    )
    await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id="ref", feature="text", quantity=30, request_id=rid())
    )
    refund = await packs["admin"].RefundPurchase(
        pb.RefundPurchaseRequest(
            purchase_id=r.purchase.purchase_id, reason="chargeback", request_id=rid()
        )
    )
    # 30 spent: 10 of the bonus, then 20 of one of the two 100/50 lots by age: the first.
    assert (refund.refunded_credits, refund.spent_credits) == (80, 30)
    assert refund.purchase.status == pb.PURCHASE_STATUS_REFUNDED
    assert refund.balance == 50  # the other purchase is untouched
    twice = await packs["admin"].RefundPurchase(
        pb.RefundPurchaseRequest(
            purchase_id=r.purchase.purchase_id, reason="again", request_id=rid()
        )
    )
    assert (twice.refunded_credits, twice.spent_credits, twice.balance) == (0, 30, 50)
    usage = await tenant.read.GetUsage(cpb.GetUsageRequest(account_id="ref"))
    assert (usage.refunded, usage.remaining) == (80, 50)


async def test_purchases_and_refunds_answer_the_spendable_balance(
    packs: dict[str, Caller], tenant: Tenant
) -> None:
    """Credit held by a call session is not spendable: purchases and refunds answer the
    balance GetBalance reports (once, the credit in lots, held credit included)."""
    await tenant.admin.Grant(cpb.GrantRequest(account_id="held", amount=10, request_id=rid()))
    started = await tenant.meter.StartSession(
        cpb.StartSessionRequest(account_id="held", session_id="call", feature="voice")
    )
    assert (started.session.reserved_amount, started.balance) == (3, 7)
    pack = await make_pack(packs["admin"], credits=100)
    bought = await packs["admin"].PurchasePack(
        pb.PurchasePackRequest(
            account_id="held", pack_id=pack.pack_id, payment_reference="pay_h", request_id=rid()
        )
    )
    assert bought.balance == 107 == (await balance(tenant, "held")).balance
    pending = (
        await packs["admin"].CreatePurchase(
            pb.CreatePurchaseRequest(account_id="held", pack_id=pack.pack_id, request_id=rid())
        )
    ).purchase
    done = await packs["admin"].CompletePurchase(
        pb.CompletePurchaseRequest(
            purchase_id=pending.purchase_id, payment_reference="pay_h2", request_id=rid()
        )
    )
    assert done.balance == 207 == (await balance(tenant, "held")).balance
    refund = await packs["admin"].RefundPurchase(
        pb.RefundPurchaseRequest(
            purchase_id=bought.purchase.purchase_id, reason="test", request_id=rid()
        )
    )
    assert (refund.refunded_credits, refund.balance) == (100, 107)
    twice = await packs["admin"].RefundPurchase(
        pb.RefundPurchaseRequest(
            purchase_id=bought.purchase.purchase_id, reason="again", request_id=rid()
        )
    )
    assert twice.balance == 107 == (await balance(tenant, "held")).balance


async def test_void_grant(tenant: Tenant) -> None:
    g = await tenant.admin.Grant(cpb.GrantRequest(account_id="v", amount=40, request_id=rid()))
    await tenant.meter.Consume(
        cpb.ConsumeRequest(account_id="v", feature="text", quantity=15, request_id=rid())
    )
    req = cpb.VoidGrantRequest(account_id="v", lot_id=g.lot.lot_id, reason="typo", request_id=rid())
    voided = await tenant.admin.VoidGrant(req)
    assert (voided.voided, voided.spent, voided.balance) == (25, 15, 0)
    assert await tenant.admin.VoidGrant(req) == voided  # a retry replays
    f = await fails(
        tenant.admin.VoidGrant(
            cpb.VoidGrantRequest(
                account_id="v", lot_id=g.lot.lot_id, reason="again", request_id=rid()
            )
        )
    )
    assert (f.code, f.reason) == (grpc.StatusCode.NOT_FOUND, "LOT_NOT_FOUND")


PACKS_SERVICE = pb.DESCRIPTOR.services_by_name["Packs"]
PACK_READS = {"GetPack", "ListPacks", "GetPurchase", "ListPurchases", "GetSubscription"}


@pytest.mark.parametrize("method", [m.name for m in PACKS_SERVICE.methods])
async def test_packs_auth(tenant: Tenant, packs: dict[str, Caller], method: str) -> None:
    """Keys and roles guard every Packs RPC: reads for any key, the rest for admins."""
    from google.protobuf import message_factory

    request_class = message_factory.GetMessageClass(
        PACKS_SERVICE.methods_by_name[method].input_type
    )
    rpc = getattr(pb_grpc.PacksStub(tenant.channel), method)
    f = await fails(rpc(request_class()))
    assert (f.code, f.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    for role in ("read", "meter"):
        try:
            await getattr(packs[role], method)(request_class())
            outcome = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as error:
            outcome = error.code()
        if method in PACK_READS:
            assert outcome not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            )
        else:
            assert outcome == grpc.StatusCode.PERMISSION_DENIED, (role, method)


async def test_concurrent_updates_of_different_fields_both_land(packs: dict[str, Caller]) -> None:
    pack = await make_pack(packs["admin"], credits=100)
    updates = [
        pb.UpdatePackRequest(
            pack=pb.Pack(pack_id=pack.pack_id, description=f"d{i}", credits=200 + i),
            update_mask=field_mask_pb2.FieldMask(paths=["description" if i % 2 else "credits"]),
            request_id=rid(),
        )
        for i in range(10)
    ]
    await asyncio.gather(*(packs["admin"].UpdatePack(u) for u in updates))
    final = (await packs["read"].GetPack(pb.GetPackRequest(pack_id=pack.pack_id))).pack
    # Every update read the pack inside the write transaction: a description update never
    # put an older credits value back, and the other way round.
    assert final.description in {f"d{i}" for i in range(1, 10, 2)}
    assert final.credits in {200 + i for i in range(0, 10, 2)}
