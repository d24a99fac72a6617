"""Webhooks: the tenant's endpoints, the events they are told about, how a delivery is
signed, and when a failed one is tried again.

Where events come from: every change a webhook reports is written to the ledger as a
notice in the transaction that makes it (domain/model.py `Notice`): balance moves
and sessions closed by the server by the flusher with the batch that carries them (see
`notices_of`), purchase and subscription changes by the ledger call that makes them. The
delivery worker (transport/webhook_worker.py) fans each notice out into deliveries, one per
endpoint that wants it (`events_for`), and attempts them until delivered or given up: a
crash anywhere leaves the notice or the delivery in the ledger, so nothing is lost, and a
repeat carries the same event id (ids are made of the change's own ids).

Signatures follow Stripe's scheme: the header `Creditmeter-Signature: t=<unix seconds>,
v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`; a receiver recomputes it over the raw body
and rejects an old `t` (replays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from urllib.parse import urlsplit

from creditmeter.constants import (
    IDEMPOTENCY_TTL_S,
    MAX_CREDITS,
    MAX_WATCH_THRESHOLDS,
    MAX_WEBHOOK_ENDPOINTS,
    MAX_WEBHOOK_URL,
)
from creditmeter.domain import pages
from creditmeter.domain.alerts import (
    AlertKind,
    balance_change,
    crossings,
    recharge_due,
    transactions_of,
)
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint, new_id
from creditmeter.domain.model import Delivery, Notice, NoticeKind, WebhookRow
from creditmeter.domain.validation import Violations
from creditmeter.errors import (
    IdempotencyKeyReused,
    InvalidRequest,
    WebhookDeliveryNotFound,
    WebhookEndpointNotFound,
    applied,
)
from creditmeter.storage.config_store import ConfigStore
from creditmeter.storage.layout import session_request_id
from creditmeter.storage.ledger.base import WebhookFeed

log = logging.getLogger(__name__)

#: The signature header, and its scheme's version tag.
SIGNATURE_HEADER = "Creditmeter-Signature"
SIGNATURE_VERSION = "v1"
SECRET_PREFIX = "whsec_"
MAX_DESCRIPTION = 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Fields UpdateWebhookEndpoint may change.
UPDATABLE = frozenset({"url", "event_types", "thresholds", "description", "disabled"})
#: The request id suffix of the server's close of a session ("<session id>#timeout").
_TIMEOUT_STEP = session_request_id("", "timeout")


class EventType(StrEnum):
    """The `type` of a webhook body."""

    BALANCE_LOW = "balance.low"
    BALANCE_DEPLETED = "balance.depleted"
    BALANCE_TOPPED_UP = "balance.topped_up"
    PURCHASE_COMPLETED = "purchase.completed"
    PURCHASE_REFUNDED = "purchase.refunded"
    PURCHASE_EXPIRED = "purchase.expired"
    SUBSCRIPTION_PERIOD_GRANTED = "subscription.period_granted"
    SESSION_TIMED_OUT = "session.timed_out"
    RECHARGE_DUE = "recharge.due"


_ALERT_TYPE = {
    AlertKind.LOW: EventType.BALANCE_LOW,
    AlertKind.DEPLETED: EventType.BALANCE_DEPLETED,
    AlertKind.TOPPED_UP: EventType.BALANCE_TOPPED_UP,
}
_PURCHASE_TYPE = {
    "completed": EventType.PURCHASE_COMPLETED,
    "refunded": EventType.PURCHASE_REFUNDED,
    "expired": EventType.PURCHASE_EXPIRED,
}


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class EndpointSpec:
    """The fields of an endpoint a tenant chooses."""

    url: str
    event_types: tuple[EventType, ...]
    thresholds: tuple[int, ...] = ()
    description: str = ""
    disabled: bool = False


def types_of(row: WebhookRow) -> tuple[EventType, ...]:
    return tuple(EventType(t) for t in row.event_types.split(",") if t)


def thresholds_of(row: WebhookRow) -> tuple[int, ...]:
    return tuple(int(t) for t in row.thresholds.split(",") if t)


def spec_of(row: WebhookRow) -> EndpointSpec:
    return EndpointSpec(
        row.url, types_of(row), thresholds_of(row), row.description, row.disabled
    )


def check(spec: EndpointSpec, v: Violations, prefix: str = "endpoint.") -> None:
    """Add a violation for every invalid field of an endpoint."""
    try:
        parts = urlsplit(spec.url) if len(spec.url) <= MAX_WEBHOOK_URL else None
        if parts is not None:
            parts.port  # noqa: B018 (raises on a port that is not a number 0-65535)
    except ValueError:  # an unbalanced [ of an IPv6 host, a bad port
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        v.add(f"{prefix}url", f"an http:// or https:// URL of at most {MAX_WEBHOOK_URL} characters")
    elif parts.username or parts.password or parts.fragment:
        v.add(f"{prefix}url", "no credentials or fragment in the URL")
    if not spec.event_types:
        v.add(f"{prefix}event_types", "name at least one event type")
    elif len(set(spec.event_types)) != len(spec.event_types):
        v.add(f"{prefix}event_types", "each type once")
    if v.count(f"{prefix}thresholds", len(set(spec.thresholds)), MAX_WATCH_THRESHOLDS, "values"):
        for i, t in enumerate(spec.thresholds):
            if not 1 <= t <= MAX_CREDITS:
                v.add(f"{prefix}thresholds[{i}]", "must be from 1 to 2^53-1")
    if len(spec.description) > MAX_DESCRIPTION:
        v.add(f"{prefix}description", f"at most {MAX_DESCRIPTION} characters")


def _endpoint_id(value: str, v: Violations, field: str = "endpoint_id") -> None:
    if not value:
        v.add(field, "required")
    elif len(value) > 64 or not value.isascii():
        v.add(field, "not an endpoint id")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The Creditmeter-Signature header value of a body sent at `timestamp` (unix s)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},{SIGNATURE_VERSION}={mac.hexdigest()}"


def retry_delay_s(attempts: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """How long to wait after the `attempts`-th failed attempt: exponential, capped, with
    jitter over its upper half (so retries of one outage spread out, yet still grow)."""
    ceiling = min(max_s, base_s * (1 << min(max(attempts - 1, 0), 62)))
    return ceiling / 2 + rng.random() * ceiling / 2


def _event_id(*parts: object) -> str:
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).hexdigest()
    return f"evt_{digest[:32]}"


def delivery_id_of(endpoint_id: str, event_id: str) -> str:
    """The delivery of an event to an endpoint: one id, whoever fans the notice out."""
    digest = hashlib.sha256(f"{endpoint_id}\x00{event_id}".encode()).hexdigest()
    return f"whd_{digest[:32]}"


# --- where events come from ------------------------------------------------------------
BALANCE_TYPES = frozenset(
    {EventType.BALANCE_LOW, EventType.BALANCE_DEPLETED, EventType.BALANCE_TOPPED_UP}
)


def notices_of(events: Sequence[Mapping[str, str]], balance: bool = True) -> list[Notice]:
    """The notices of one outbox entry's events: one per transaction that moved the
    spendable balance (unless not `balance`), one per recharge falling due, and one for a
    session the server closed."""
    if not events:
        return []
    runs = transactions_of(events)
    found: list[Notice] = []
    first = events[0]
    tenant, account = first.get("tenant", ""), first.get("account", "")
    for txn, run in runs:
        ts = int(next((e["ts"] for e in reversed(run) if "ts" in e), "0"))
        due = recharge_due(run)
        if due is not None:  # one per crossing: always reported
            threshold, (before, after), pack = due
            data: dict[str, object] = {
                "account": account, "txn": txn, "threshold": threshold, "before": before,
                "after": after, "pack_id": pack,
            }  # fmt: skip
            found.append(
                Notice(f"recharge:{txn}", tenant, NoticeKind.RECHARGE_DUE, ts, _json(data))
            )
            continue
        change = balance_change(run) if balance else None
        if change is None or change[0] == change[1]:
            continue
        data = {"account": account, "txn": txn, "before": change[0], "after": change[1]}
        found.append(Notice(f"balance:{txn}", tenant, NoticeKind.BALANCE, ts, _json(data)))
    request_id = first.get("request_id", "")
    if request_id.endswith(_TIMEOUT_STEP):
        txn = first.get("txn", "")
        charged = sum(int(e.get("amount") or 0) for e in events if e.get("kind") == "session")
        data = {
            "account": account, "session_id": request_id[: -len(_TIMEOUT_STEP)], "txn": txn,
            "charged": charged,
        }  # fmt: skip
        found.append(
            Notice(f"timeout:{txn}", tenant, NoticeKind.SESSION_TIMEOUT, int(first.get("ts", 0)),
                   _json(data))
        )  # fmt: skip
    return found


class FlushNotices:
    """The flusher's NoticeSource: `notices_of`, leaving out the balance moves of tenants
    that have no enabled endpoint for balance events (a notice per charge would otherwise
    cost every deployment ledger writes, webhooks or not).

    Which tenants is read from the config store whenever its version has changed, by
    `refresh` (every CONFIG_RELOAD_INTERVAL_S in `watch`, and at once after a change made
    through this process): balance events reach an endpoint from within about a second of
    its creation. Until the first read, and while the store does not answer at first,
    every tenant's are kept."""

    def __init__(self, config: ConfigStore) -> None:
        self.config = config
        self._tenants: frozenset[str] | None = None
        self._version: int | None = None

    def __call__(self, events: Sequence[Mapping[str, str]]) -> list[Notice]:
        tenant = events[0].get("tenant", "") if events else ""
        return notices_of(events, self._tenants is None or tenant in self._tenants)

    async def refresh(self) -> None:
        version = await asyncio.to_thread(self.config.version)
        if version == self._version:
            return
        rows = await asyncio.to_thread(self.config.webhook_endpoints)
        self._tenants = frozenset(
            r.tenant for r in rows if not r.disabled and BALANCE_TYPES & set(types_of(r))
        )
        self._version = version

    async def watch(self, stopping: asyncio.Event, interval_s: float) -> None:
        """Refresh until `stopping`; a failed read keeps what was read before."""
        while not stopping.is_set():
            try:
                await self.refresh()
            except Exception as error:  # the config store away (PostgreSQL): try again
                log.warning("webhook tenants not refreshed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval_s)


def _json(data: Mapping[str, object]) -> str:
    return json.dumps(data, separators=(",", ":"))


@dataclass(frozen=True)
class WebhookEvent:
    """One event of a notice for one endpoint: `data` is the notice's figures (for a
    balance alert, with the kind and threshold), rendered to the proto message by the
    transport."""

    event_id: str
    type: EventType
    tenant: str
    created_ms: int
    notice_kind: str
    data: Mapping[str, object]


def events_for(notice: Notice, endpoint: WebhookRow) -> list[WebhookEvent]:
    """The events a notice makes for an endpoint (none if it wants none of them)."""
    wanted = set(types_of(endpoint))
    data = json.loads(notice.data)
    kind = notice.kind
    types: list[tuple[EventType, dict[str, object], tuple[object, ...]]] = []
    if kind == NoticeKind.BALANCE:
        for alert, threshold in crossings(data["before"], data["after"], thresholds_of(endpoint)):
            figures = {**data, "threshold": threshold}
            types.append((_ALERT_TYPE[alert], figures, (alert, threshold)))
    elif kind == NoticeKind.PURCHASE:
        types.append((_PURCHASE_TYPE[data["status"]], data, ()))
    elif kind == NoticeKind.SUBSCRIPTION_PERIOD:
        types.append((EventType.SUBSCRIPTION_PERIOD_GRANTED, data, ()))
    elif kind == NoticeKind.SESSION_TIMEOUT:
        types.append((EventType.SESSION_TIMED_OUT, data, ()))
    elif kind == NoticeKind.RECHARGE_DUE:
        types.append((EventType.RECHARGE_DUE, data, ()))
    return [
        WebhookEvent(
            # The same event for every endpoint that gets it (a balance alert's threshold
            # is part of it: endpoints watching other thresholds get other alerts).
            _event_id(notice.notice_id, *extra),
            event_type,
            notice.tenant,
            notice.created_ms,
            kind,
            figures,
        )
        for event_type, figures, extra in types
        if event_type in wanted
    ]


# --- endpoints and deliveries, for the Webhooks service ------------------------------------
@dataclass(frozen=True)
class DeliveryPage:
    deliveries: list[Delivery]
    next_page_token: str


class Webhooks:
    """Create, list, change and remove endpoints; list and resend deliveries."""

    def __init__(
        self,
        config: ConfigStore,
        ledger: WebhookFeed,
        clock: Clock,
        ttl_s: int = IDEMPOTENCY_TTL_S,
        changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`changed` runs after an endpoint was created or changed (the in-process
        FlushNotices' refresh)."""
        self.config = config
        self.ledger = ledger
        self.clock = clock
        self.ttl_ms = ttl_s * 1000
        self._changed = changed

    def _request(self, tenant: str, request_id: str, operation: str,
                 params: Mapping[str, object]) -> ConfigStore.Request:  # fmt: skip
        return ConfigStore.Request(
            tenant, request_id, fingerprint(operation, params), self.clock.now_ms(), self.ttl_ms
        )

    async def _put(
        self,
        tenant: str,
        endpoint_id: str,
        req: ConfigStore.Request,
        build: Callable[[WebhookRow | None], WebhookRow],
    ) -> WebhookRow:
        stored, _ = await applied(
            asyncio.to_thread(self.config.put_webhook_endpoint, endpoint_id, req, build)
        )
        if self._changed is not None:
            await self._changed()
        return stored

    @staticmethod
    def _existing(current: WebhookRow | None, endpoint_id: str) -> WebhookRow:
        if current is None:
            raise WebhookEndpointNotFound(
                f"no webhook endpoint {endpoint_id!r}", {"endpoint_id": endpoint_id}
            )
        return current

    async def create(
        self, tenant: str, spec: EndpointSpec, request_id: str, violations: Violations | None = None
    ) -> WebhookRow:
        """A new endpoint with a new secret (the one returned here, the only time)."""
        v = Violations(violations)
        check(spec, v)
        v.request_id(request_id)
        v.raise_if_any()
        now = self.clock.now_ms()
        endpoint_id = new_id("whe", now)
        row = WebhookRow(
            tenant=tenant, endpoint_id=endpoint_id, url=spec.url,
            event_types=",".join(spec.event_types),
            thresholds=",".join(str(t) for t in sorted(set(spec.thresholds))),
            description=spec.description, secret=new_secret(), disabled=spec.disabled,
            disabled_reason="", failing_since_ms=None, create_ms=now, update_ms=now,
        )  # fmt: skip
        full = len(await asyncio.to_thread(self.config.webhook_endpoints, tenant))
        full = full >= MAX_WEBHOOK_ENDPOINTS

        def build(_current: WebhookRow | None) -> WebhookRow:
            # Only a new request builds: a retry of one that succeeded gets its endpoint.
            if full:
                raise InvalidRequest(
                    [("endpoint", f"a tenant has at most {MAX_WEBHOOK_ENDPOINTS} endpoints")]
                )
            return row

        req = self._request(tenant, request_id, "CreateWebhookEndpoint", {"spec": repr(spec)})
        return await self._put(tenant, endpoint_id, req, build)

    async def list(self, tenant: str) -> list[WebhookRow]:
        return await asyncio.to_thread(self.config.webhook_endpoints, tenant)

    async def update(
        self,
        tenant: str,
        endpoint_id: str,
        changes: EndpointSpec,
        paths: Sequence[str],
        request_id: str,
        violations: Violations | None = None,
    ) -> WebhookRow:
        """Change the fields named by `paths` to their values in `changes`."""
        v = Violations(violations)
        v.request_id(request_id)
        _endpoint_id(endpoint_id, v, "endpoint.endpoint_id")
        v.update_mask(paths, UPDATABLE)
        v.raise_if_any()

        def build(current: WebhookRow | None) -> WebhookRow:
            stored = self._existing(current, endpoint_id)
            merged = spec_of(stored)
            for path in paths:
                merged = replace(merged, **{path: getattr(changes, path)})
            checked = Violations()
            check(merged, checked)
            checked.raise_if_any()
            enabled_again = stored.disabled and not merged.disabled
            return replace(
                stored,
                url=merged.url,
                event_types=",".join(merged.event_types),
                thresholds=",".join(str(t) for t in sorted(set(merged.thresholds))),
                description=merged.description,
                disabled=merged.disabled,
                # Enabled again by the tenant: a fresh start for the failure clock.
                disabled_reason="" if enabled_again else stored.disabled_reason,
                failing_since_ms=None if enabled_again else stored.failing_since_ms,
                update_ms=self.clock.now_ms(),
            )

        params = {"endpoint_id": endpoint_id, "paths": sorted(paths), "changes": repr(changes)}
        req = self._request(tenant, request_id, "UpdateWebhookEndpoint", params)
        return await self._put(tenant, endpoint_id, req, build)

    async def rotate(self, tenant: str, endpoint_id: str, request_id: str) -> WebhookRow:
        """A new secret for the endpoint (returned here, the only time)."""
        v = Violations()
        v.request_id(request_id)
        _endpoint_id(endpoint_id, v)
        v.raise_if_any()
        secret = new_secret()

        def build(current: WebhookRow | None) -> WebhookRow:
            stored = self._existing(current, endpoint_id)
            return replace(stored, secret=secret, update_ms=self.clock.now_ms())

        req = self._request(tenant, request_id, "RotateWebhookSecret", {"endpoint_id": endpoint_id})
        return await self._put(tenant, endpoint_id, req, build)

    async def delete(self, tenant: str, endpoint_id: str, request_id: str) -> None:
        v = Violations()
        v.request_id(request_id)
        _endpoint_id(endpoint_id, v)
        v.raise_if_any()
        req = self._request(
            tenant, request_id, "DeleteWebhookEndpoint", {"endpoint_id": endpoint_id}
        )
        found, _ = await applied(
            asyncio.to_thread(self.config.delete_webhook_endpoint, endpoint_id, req)
        )
        if not found:
            self._existing(None, endpoint_id)

    async def deliveries(
        self,
        tenant: str,
        endpoint_id: str,
        status: DeliveryStatus | None,
        page_size: int,
        page_token: str,
    ) -> DeliveryPage:
        v = Violations()
        if page_size < 0:
            v.add("page_size", "must not be negative")
        if endpoint_id:
            _endpoint_id(endpoint_id, v)
        before = _decode(page_token, endpoint_id, status, v) if page_token else None
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = await self.ledger.list_deliveries(
            tenant, endpoint_id or None, None if status is None else str(status), size + 1, before
        )
        page = rows[:size]
        token = _encode(page[-1], endpoint_id, status) if len(rows) > size else ""
        return DeliveryPage(page, token)

    async def resend(self, tenant: str, delivery_id: str, request_id: str) -> Delivery:
        """A new pending delivery of a delivery's event to its endpoint; its id comes from
        the request id, so a retry finds the first one."""
        v = Violations()
        v.request_id(request_id)
        if not delivery_id:
            v.add("delivery_id", "required")
        elif len(delivery_id) > 64 or not delivery_id.isascii():
            v.add("delivery_id", "not a delivery id")
        v.raise_if_any()
        original = await self.ledger.get_delivery(tenant, delivery_id)
        if original is None:
            raise WebhookDeliveryNotFound(
                f"no webhook delivery {delivery_id!r}", {"delivery_id": delivery_id}
            )
        now = self.clock.now_ms()
        digest = hashlib.sha256(f"{tenant}\x00resend\x00{request_id}".encode()).hexdigest()
        fresh = Delivery(
            delivery_id=f"whd_{digest[:32]}", tenant=tenant, endpoint_id=original.endpoint_id,
            event_id=original.event_id, event_type=original.event_type, body=original.body,
            status=DeliveryStatus.PENDING, attempts=0, create_ms=now, next_attempt_ms=0,
        )  # fmt: skip
        stored = await self.ledger.add_delivery(fresh)
        if (stored.endpoint_id, stored.event_id) != (original.endpoint_id, original.event_id):
            raise IdempotencyKeyReused(
                "request_id was used for another request", {"request_id": request_id}
            )
        return stored


def _encode(last: Delivery, endpoint_id: str, status: DeliveryStatus | None) -> str:
    return pages.encode({"c": last.create_ms, "i": last.delivery_id, "e": endpoint_id,
                         "s": str(status or "")})  # fmt: skip


def _decode(
    token: str, endpoint_id: str, status: DeliveryStatus | None, v: Violations
) -> tuple[int, str] | None:
    return pages.decode(token, {"e": endpoint_id, "s": str(status or "")}, pages.by_creation, v,
                        "belongs to a listing with other filters")  # fmt: skip
