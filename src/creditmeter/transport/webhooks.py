"""Webhooks over the wire: the credits.v1.Webhooks servicer and the JSON bodies (proto
JSON of the event messages) the delivery worker (transport/webhook_worker.py) POSTs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeAlias

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from creditmeter.api.credits.v1 import webhooks_pb2 as pb
from creditmeter.api.credits.v1 import webhooks_pb2_grpc as pb_grpc
from creditmeter.domain.model import Delivery, NoticeKind, PurchaseRecord, WebhookRow
from creditmeter.domain.validation import Violations
from creditmeter.domain.webhooks import (
    DeliveryStatus,
    EndpointSpec,
    EventType,
    WebhookEvent,
    Webhooks,
    thresholds_of,
    types_of,
)
from creditmeter.transport import convert
from creditmeter.transport.enums import enum_name, enum_pb
from creditmeter.transport.interceptors import principal
from creditmeter.transport.packs_servicer import purchase_pb

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


# --- protobuf <-> domain --------------------------------------------------------------
def event_type_pb(t: EventType) -> pb.WebhookEventType.ValueType:
    return enum_pb(pb.WebhookEventType, t.value.replace(".", "_"))


def _event_types(values: Any, v: Violations, field: str) -> tuple[EventType, ...]:
    by_name = {t.value.replace(".", "_"): t for t in EventType}
    found = []
    for i, value in enumerate(values):
        name = enum_name(pb.WebhookEventType, value, f"{field}[{i}]", v)
        if name is None:
            if value == 0:
                v.add(f"{field}[{i}]", "unspecified is not an event type")
            continue
        found.append(by_name[name])
    return tuple(found)


def spec(e: pb.WebhookEndpoint, v: Violations) -> EndpointSpec:
    return EndpointSpec(
        url=e.url,
        event_types=_event_types(e.event_types, v, "endpoint.event_types"),
        thresholds=tuple(e.thresholds),
        description=e.description,
        disabled=e.disabled,
    )


def endpoint_pb(row: WebhookRow) -> pb.WebhookEndpoint:
    return pb.WebhookEndpoint(
        endpoint_id=row.endpoint_id,
        url=row.url,
        event_types=[event_type_pb(t) for t in types_of(row)],
        thresholds=list(thresholds_of(row)),
        description=row.description,
        disabled=row.disabled,
        disabled_reason=row.disabled_reason,
        create_time=convert.timestamp(row.create_ms),
        update_time=convert.timestamp(row.update_ms),
    )


def delivery_pb(d: Delivery) -> pb.WebhookDelivery:
    msg = pb.WebhookDelivery(
        delivery_id=d.delivery_id,
        endpoint_id=d.endpoint_id,
        event_id=d.event_id,
        event_type=d.event_type,
        status=enum_pb(pb.WebhookDeliveryStatus, d.status),
        attempts=d.attempts,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        create_time=convert.timestamp(d.create_ms),
        body=d.body,
    )
    if d.last_attempt_ms is not None:
        msg.last_attempt_time.CopyFrom(convert.timestamp(d.last_attempt_ms))
    if d.status == DeliveryStatus.PENDING:
        msg.next_attempt_time.CopyFrom(convert.timestamp(d.next_attempt_ms))
    return msg


def _data_pb(event: WebhookEvent) -> Message:
    d: Mapping[str, Any] = event.data
    kind = event.notice_kind
    if kind == NoticeKind.BALANCE:
        return pb.BalanceAlertData(
            account_id=d["account"], threshold=d["threshold"], previous_balance=d["before"],
            balance=d["after"], transaction_id=d["txn"],
            event_time=convert.timestamp(event.created_ms),
        )  # fmt: skip
    if kind == NoticeKind.PURCHASE:
        return purchase_pb(PurchaseRecord(**{**d, "lot_ids": tuple(d["lot_ids"])}))
    if kind == NoticeKind.RECHARGE_DUE:
        return pb.RechargeDueData(
            account_id=d["account"], threshold=d["threshold"], previous_balance=d["before"],
            balance=d["after"], pack_id=d["pack_id"], transaction_id=d["txn"],
            event_time=convert.timestamp(event.created_ms),
        )  # fmt: skip
    if kind == NoticeKind.SUBSCRIPTION_PERIOD:
        return pb.SubscriptionPeriodData(
            subscription_id=d["subscription_id"], account_id=d["account"], pack_id=d["pack_id"],
            period=d["period"], credits=d["credits"], bonus_credits=d["bonus_credits"],
        )  # fmt: skip
    return pb.SessionClosedData(
        account_id=d["account"], session_id=d["session_id"], transaction_id=d["txn"],
        charged=d["charged"], close_time=convert.timestamp(event.created_ms),
    )  # fmt: skip


def body_of(event: WebhookEvent) -> str:
    """The JSON body of an event: {id, type, created, tenant, data}, data in the proto JSON
    mapping of its message (lowerCamelCase names, 64-bit integers as strings)."""
    return json.dumps(
        {
            "id": event.event_id,
            "type": str(event.type),
            "created": convert.timestamp(event.created_ms).ToJsonString(),
            "tenant": event.tenant,
            "data": json_format.MessageToDict(_data_pb(event)),
        },
        separators=(",", ":"),
    )


# --- the servicer -----------------------------------------------------------------------
class WebhooksServicer(pb_grpc.WebhooksServicer):
    def __init__(self, webhooks: Webhooks) -> None:
        self.webhooks = webhooks

    async def CreateWebhookEndpoint(
        self, request: pb.CreateWebhookEndpointRequest, context: Context
    ) -> pb.CreateWebhookEndpointResponse:
        v = Violations()
        endpoint_spec = spec(request.endpoint, v)
        row = await self.webhooks.create(
            principal().tenant, endpoint_spec, request.request_id, v
        )
        return pb.CreateWebhookEndpointResponse(endpoint=endpoint_pb(row), secret=row.secret)

    async def ListWebhookEndpoints(
        self, request: pb.ListWebhookEndpointsRequest, context: Context
    ) -> pb.ListWebhookEndpointsResponse:
        rows = await self.webhooks.list(principal().tenant)
        return pb.ListWebhookEndpointsResponse(endpoints=[endpoint_pb(r) for r in rows])

    async def UpdateWebhookEndpoint(
        self, request: pb.UpdateWebhookEndpointRequest, context: Context
    ) -> pb.UpdateWebhookEndpointResponse:
        v = Violations()
        changes = spec(request.endpoint, v)
        row = await self.webhooks.update(
            principal().tenant,
            request.endpoint.endpoint_id,
            changes,
            list(request.update_mask.paths),
            request.request_id,
            v,
        )
        return pb.UpdateWebhookEndpointResponse(endpoint=endpoint_pb(row))

    async def DeleteWebhookEndpoint(
        self, request: pb.DeleteWebhookEndpointRequest, context: Context
    ) -> pb.DeleteWebhookEndpointResponse:
        await self.webhooks.delete(principal().tenant, request.endpoint_id, request.request_id)
        return pb.DeleteWebhookEndpointResponse()

    async def RotateWebhookSecret(
        self, request: pb.RotateWebhookSecretRequest, context: Context
    ) -> pb.RotateWebhookSecretResponse:
        row = await self.webhooks.rotate(
            principal().tenant, request.endpoint_id, request.request_id
        )
        return pb.RotateWebhookSecretResponse(endpoint=endpoint_pb(row), secret=row.secret)

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        v = Violations()
        name = enum_name(pb.WebhookDeliveryStatus, request.status, "status", v)
        v.raise_if_any()
        page = await self.webhooks.deliveries(
            principal().tenant,
            request.endpoint_id,
            None if name is None else DeliveryStatus(name),
            request.page_size,
            request.page_token,
        )
        return pb.ListWebhookDeliveriesResponse(
            deliveries=[delivery_pb(d) for d in page.deliveries],
            next_page_token=page.next_page_token,
        )

    async def ResendWebhookDelivery(
        self, request: pb.ResendWebhookDeliveryRequest, context: Context
    ) -> pb.ResendWebhookDeliveryResponse:
        d = await self.webhooks.resend(principal().tenant, request.delivery_id, request.request_id)
        return pb.ResendWebhookDeliveryResponse(delivery=delivery_pb(d))
