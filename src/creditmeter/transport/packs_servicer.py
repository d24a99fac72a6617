"""The credits.v1.Packs servicer: translates protobuf to domain calls and back."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from creditmeter.api.credits.v1 import credits_pb2
from creditmeter.api.credits.v1 import packs_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2_grpc as pb_grpc
from creditmeter.constants import DEFAULT_PRIORITY
from creditmeter.domain.model import PackRow, PurchaseRecord
from creditmeter.domain.packs import Catalog, PackSpec, Recurrence
from creditmeter.domain.purchases import PurchaseResult, Purchases, status_or_error
from creditmeter.domain.subscriptions import Subscriptions, SubscriptionView
from creditmeter.domain.validation import Violations
from creditmeter.errors import InvalidRequest
from creditmeter.transport import convert
from creditmeter.transport.enums import enum_name, enum_pb
from creditmeter.transport.interceptors import principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


def _recurrence(value: int, v: Violations) -> Recurrence:
    name = enum_name(pb.Recurrence, value, "pack.recurrence", v)
    return Recurrence.ONE_TIME if name is None else Recurrence(name)


def spec(p: pb.Pack, v: Violations) -> PackSpec:
    """The pack a request describes; an unknown enum value is added to `v`."""
    return PackSpec(
        name=p.name,
        description=p.description,
        credits=p.credits,
        bonus_credits=p.bonus_credits,
        price_minor=p.price.amount_minor,
        currency=p.price.currency,
        validity_days=p.validity_days,
        recurrence=_recurrence(p.recurrence, v),
        rollover_cap=p.rollover_cap,
        priority=p.priority if p.HasField("priority") else DEFAULT_PRIORITY,
        active=p.active,
        trial=p.trial,
    )


def pack_pb(row: PackRow) -> pb.Pack:
    return pb.Pack(
        pack_id=row.pack_id,
        name=row.name,
        description=row.description,
        credits=row.credits,
        bonus_credits=row.bonus_credits,
        price=pb.Price(amount_minor=row.price_minor, currency=row.currency),
        validity_days=row.validity_days,
        recurrence=enum_pb(pb.Recurrence, row.recurrence),
        rollover_cap=row.rollover_cap,
        priority=row.priority,
        active=row.active,
        trial=row.trial,
        archived=row.archived,
        create_time=convert.timestamp(row.create_ms),
        update_time=convert.timestamp(row.update_ms),
    )


def purchase_pb(p: PurchaseRecord) -> pb.Purchase:
    msg = pb.Purchase(
        purchase_id=p.purchase_id,
        account_id=p.account,
        pack_id=p.pack_id,
        status=enum_pb(pb.PurchaseStatus, p.status),
        payment_reference=p.payment_reference,
        pack_name=p.pack_name,
        price=pb.Price(amount_minor=p.price_minor, currency=p.currency),
        credits=p.credits,
        bonus_credits=p.bonus_credits,
        lot_ids=list(p.lot_ids),
        create_time=convert.timestamp(p.create_ms),
        refunded_credits=p.refunded_credits,
        spent_credits=p.spent_credits,
    )
    if p.complete_ms is not None:
        msg.complete_time.CopyFrom(convert.timestamp(p.complete_ms))
    if p.expire_ms is not None:
        msg.expire_time.CopyFrom(convert.timestamp(p.expire_ms))
    return msg


def _granted_pb(
    result: PurchaseResult, into: pb.PurchasePackResponse | pb.CompletePurchaseResponse
) -> None:
    """A purchase that granted its pack, into either response (the same fields)."""
    into.purchase.CopyFrom(purchase_pb(result.purchase))
    into.balance = result.balance
    into.debt_repaid = result.debt_repaid


def _status(value: int, v: Violations) -> str | None:
    name = enum_name(pb.PurchaseStatus, value, "status", v)
    return None if name is None else status_or_error(name)


def subscription_pb(v: SubscriptionView) -> pb.Subscription:
    sub = v.sub
    msg = pb.Subscription(
        subscription_id=sub.subscription_id,
        account_id=sub.account,
        pack_id=sub.pack_id,
        status=enum_pb(pb.SubscriptionStatus, sub.status),
        recurrence=enum_pb(pb.Recurrence, sub.recurrence),
        credits=sub.credits,
        bonus_credits=sub.bonus_credits,
        rollover_cap=sub.rollover_cap,
        periods_granted=sub.periods_granted,
        current_period_start=convert.timestamp(v.current_start_ms),
        current_period_end=convert.timestamp(v.current_end_ms),
        create_time=convert.timestamp(sub.create_ms),
    )
    if sub.cancel_ms is not None:
        msg.cancel_time.CopyFrom(convert.timestamp(sub.cancel_ms))
    return msg


class PacksServicer(pb_grpc.PacksServicer):
    def __init__(
        self, catalog: Catalog, purchases: Purchases, subscriptions: Subscriptions
    ) -> None:
        self.catalog = catalog
        self.purchases = purchases
        self.subscriptions = subscriptions

    async def CreatePack(
        self, request: pb.CreatePackRequest, context: Context
    ) -> pb.CreatePackResponse:
        if not request.HasField("pack"):
            raise InvalidRequest([("pack", "required")])
        v = Violations()
        row = await self.catalog.create(
            principal().tenant, spec(request.pack, v), request.request_id, violations=v
        )
        return pb.CreatePackResponse(pack=pack_pb(row))

    async def GetPack(self, request: pb.GetPackRequest, context: Context) -> pb.GetPackResponse:
        return pb.GetPackResponse(
            pack=pack_pb(await self.catalog.get(principal().tenant, request.pack_id))
        )

    async def ListPacks(
        self, request: pb.ListPacksRequest, context: Context
    ) -> pb.ListPacksResponse:
        page = await self.catalog.list_page(
            principal().tenant, request.show_archived, request.page_size, request.page_token
        )
        return pb.ListPacksResponse(
            packs=[pack_pb(r) for r in page.packs], next_page_token=page.next_page_token
        )

    async def UpdatePack(
        self, request: pb.UpdatePackRequest, context: Context
    ) -> pb.UpdatePackResponse:
        if not request.HasField("pack"):
            raise InvalidRequest([("pack", "required")])
        v = Violations()
        row = await self.catalog.update(
            principal().tenant,
            request.pack.pack_id,
            spec(request.pack, v),
            list(request.update_mask.paths),
            request.request_id,
            violations=v,
        )
        return pb.UpdatePackResponse(pack=pack_pb(row))

    async def DeletePack(
        self, request: pb.DeletePackRequest, context: Context
    ) -> pb.DeletePackResponse:
        row = await self.catalog.archive(principal().tenant, request.pack_id, request.request_id)
        return pb.DeletePackResponse(pack=pack_pb(row))

    async def PurchasePack(
        self, request: pb.PurchasePackRequest, context: Context
    ) -> pb.PurchasePackResponse:
        result = await self.purchases.purchase(
            principal().tenant, request.account_id, request.pack_id, request.payment_reference,
            request.request_id,
        )  # fmt: skip
        response = pb.PurchasePackResponse()
        _granted_pb(result, response)
        return response

    async def CreatePurchase(
        self, request: pb.CreatePurchaseRequest, context: Context
    ) -> pb.CreatePurchaseResponse:
        p = await self.purchases.create(
            principal().tenant, request.account_id, request.pack_id, request.request_id
        )
        return pb.CreatePurchaseResponse(purchase=purchase_pb(p))

    async def CompletePurchase(
        self, request: pb.CompletePurchaseRequest, context: Context
    ) -> pb.CompletePurchaseResponse:
        result = await self.purchases.complete(
            principal().tenant, request.purchase_id, request.payment_reference, request.request_id
        )
        response = pb.CompletePurchaseResponse()
        _granted_pb(result, response)
        return response

    async def CancelPurchase(
        self, request: pb.CancelPurchaseRequest, context: Context
    ) -> pb.CancelPurchaseResponse:
        p = await self.purchases.cancel(principal().tenant, request.purchase_id, request.request_id)
        return pb.CancelPurchaseResponse(purchase=purchase_pb(p))

    async def GetPurchase(
        self, request: pb.GetPurchaseRequest, context: Context
    ) -> pb.GetPurchaseResponse:
        p = await self.purchases.get(principal().tenant, request.purchase_id)
        return pb.GetPurchaseResponse(purchase=purchase_pb(p))

    async def ListPurchases(
        self, request: pb.ListPurchasesRequest, context: Context
    ) -> pb.ListPurchasesResponse:
        v = Violations()
        page = await self.purchases.list_page(
            principal().tenant,
            request.account_id or None,
            _status(request.status, v),
            request.page_size,
            request.page_token,
            violations=v,
        )
        return pb.ListPurchasesResponse(
            purchases=[purchase_pb(p) for p in page.purchases],
            next_page_token=page.next_page_token,
        )

    async def RefundPurchase(
        self, request: pb.RefundPurchaseRequest, context: Context
    ) -> pb.RefundPurchaseResponse:
        r = await self.purchases.refund(
            principal().tenant, request.purchase_id, request.reason, request.request_id
        )
        return pb.RefundPurchaseResponse(
            purchase=purchase_pb(r.purchase),
            refunded_credits=r.refunded,
            spent_credits=r.spent,
            lots=[credits_pb2.LotCharge(lot_id=lot, amount=n) for lot, n in r.lots],
            balance=r.balance,
        )

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: Context
    ) -> pb.SubscribeResponse:
        v = await self.subscriptions.subscribe(
            principal().tenant, request.account_id, request.pack_id, request.request_id
        )
        return pb.SubscribeResponse(subscription=subscription_pb(v))

    async def GetSubscription(
        self, request: pb.GetSubscriptionRequest, context: Context
    ) -> pb.GetSubscriptionResponse:
        v = await self.subscriptions.get(principal().tenant, request.subscription_id)
        return pb.GetSubscriptionResponse(subscription=subscription_pb(v))

    async def CancelSubscription(
        self, request: pb.CancelSubscriptionRequest, context: Context
    ) -> pb.CancelSubscriptionResponse:
        v = await self.subscriptions.cancel(
            principal().tenant, request.subscription_id, request.request_id
        )
        return pb.CancelSubscriptionResponse(subscription=subscription_pb(v))
