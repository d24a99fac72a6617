"""Packs: what a tenant sells. Packs are configuration (the config store), so they
survive the loss of Redis; a change never alters what was already bought (purchases keep
a snapshot)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypedDict

from creditmeter.constants import (
    DEFAULT_PRIORITY,
    IDEMPOTENCY_TTL_S,
    MAX_CREDITS,
    MAX_PRIORITY,
    MAX_UPDATE_PATHS,
)
from creditmeter.domain import pages
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint, new_id
from creditmeter.domain.model import PackRow
from creditmeter.domain.validation import Violations
from creditmeter.errors import PackNotActive, PackNotFound, applied
from creditmeter.storage.config_store import ConfigStore

MAX_NAME = 100
MAX_DESCRIPTION = 1000
MAX_VALIDITY_DAYS = 36_600
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_CURRENCY = re.compile(r"[A-Z]{3}")
_FIELD_OF_PATH = {"price.amount_minor": "price_minor", "price.currency": "currency"}
#: Fields UpdatePack may change (AIP-134 field mask paths).
UPDATABLE = frozenset(
    {"name", "description", "credits", "bonus_credits", "price", "price.amount_minor",
     "price.currency", "validity_days", "rollover_cap", "priority", "active"}
)  # fmt: skip


class Recurrence(StrEnum):
    ONE_TIME = "one_time"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    YEARLY = "yearly"


@dataclass(frozen=True)
class PackSpec:
    """The fields of a pack a tenant chooses."""

    name: str
    description: str = ""
    credits: int = 0
    bonus_credits: int = 0
    price_minor: int = 0
    currency: str = ""
    validity_days: int = 0
    recurrence: Recurrence = Recurrence.ONE_TIME
    rollover_cap: int = 0
    priority: int = DEFAULT_PRIORITY
    active: bool = True
    trial: bool = False


def check(spec: PackSpec, v: Violations, prefix: str = "pack.") -> None:
    """Add a violation for every invalid field of a pack."""
    if not spec.name or len(spec.name) > MAX_NAME:
        v.add(f"{prefix}name", f"1 to {MAX_NAME} characters")
    if len(spec.description) > MAX_DESCRIPTION:
        v.add(f"{prefix}description", f"at most {MAX_DESCRIPTION} characters")
    v.credits(spec.credits, f"{prefix}credits")
    v.credits(spec.bonus_credits, f"{prefix}bonus_credits", allow_zero=True)
    if spec.credits + spec.bonus_credits > MAX_CREDITS:
        v.add(f"{prefix}bonus_credits", "credits and bonus together must be at most 2^53-1")
    v.credits(spec.price_minor, f"{prefix}price.amount_minor", allow_zero=True)
    if not _CURRENCY.fullmatch(spec.currency):
        v.add(f"{prefix}price.currency", "an ISO 4217 code: three capital letters")
    if not 0 <= spec.validity_days <= MAX_VALIDITY_DAYS:
        v.add(f"{prefix}validity_days", f"0 (never expires) to {MAX_VALIDITY_DAYS}")
    v.credits(spec.rollover_cap, f"{prefix}rollover_cap", allow_zero=True)
    if spec.rollover_cap and spec.recurrence is Recurrence.ONE_TIME:
        v.add(f"{prefix}rollover_cap", "only recurring packs roll credits over")
    if not 0 <= spec.priority <= MAX_PRIORITY:
        v.add(f"{prefix}priority", f"must be between 0 and {MAX_PRIORITY}")
    if spec.trial:
        if spec.price_minor:
            v.add(f"{prefix}price.amount_minor", "a trial pack is free")
        if spec.recurrence is not Recurrence.ONE_TIME:
            v.add(f"{prefix}recurrence", "a trial pack is one-time")


class Sale(StrEnum):
    """How a pack is sold, which decides the packs it may sell."""

    #: PurchasePack: a one-time pack, paid for already (or a trial).
    PURCHASE = "purchase"
    #: CreatePurchase: a one-time pack, to be paid for (so no trial).
    PAYMENT_INTENT = "payment_intent"
    #: Subscribe: a recurring pack.
    SUBSCRIPTION = "subscription"
    #: A recharge policy's pack, bought as a payment intent when a recharge falls due.
    RECHARGE = "recharge"


#: Why a pack of the other kind (one-time or recurring) is refused, by sale.
_WRONG_KIND = {
    Sale.PURCHASE: "a recurring pack is sold by subscription, not purchase",
    Sale.PAYMENT_INTENT: "a recurring pack is sold by subscription, not purchase",
    Sale.SUBSCRIPTION: "a one-time pack is bought with PurchasePack",
    Sale.RECHARGE: "a recharge buys a one-time pack, not a subscription",
}
#: Why a trial pack is refused, by the sales that refuse it (a trial is granted free,
#: by PurchasePack).
_NO_TRIAL = {
    Sale.PAYMENT_INTENT: "a trial pack is granted with PurchasePack, not a payment intent",
    Sale.RECHARGE: "a trial pack cannot be a recharge",
}


def check_for_sale(pack: PackRow, sale: Sale, v: Violations, field: str = "pack_id") -> None:
    """The rule of which packs each sale may sell: a paused or archived pack is for no
    sale (raises PackNotActive); a recurring pack is sold by subscription only, a one-time
    one by the others, and a trial by PurchasePack only (else a violation at `field`)."""
    if not pack.active or pack.archived:
        raise PackNotActive(f"pack {pack.pack_id!r} is not for sale", {"pack_id": pack.pack_id})
    recurring = pack.recurrence != Recurrence.ONE_TIME
    if recurring != (sale is Sale.SUBSCRIPTION):
        v.add(field, _WRONG_KIND[sale])
    elif pack.trial and sale in _NO_TRIAL:
        v.add(field, _NO_TRIAL[sale])


def spec_of(row: PackRow) -> PackSpec:
    return PackSpec(
        name=row.name,
        description=row.description,
        credits=row.credits,
        bonus_credits=row.bonus_credits,
        price_minor=row.price_minor,
        currency=row.currency,
        validity_days=row.validity_days,
        recurrence=Recurrence(row.recurrence),
        rollover_cap=row.rollover_cap,
        priority=row.priority,
        active=row.active,
        trial=row.trial,
    )


class PackSnapshot(TypedDict):
    """What a purchase and a subscription keep of their pack as it was (the fields of
    PurchaseRecord and SubscriptionRecord of these names): a later change to the pack
    alters nothing bought."""

    pack_id: str
    pack_name: str
    credits: int
    bonus_credits: int
    price_minor: int
    currency: str


def snapshot(pack: PackRow) -> PackSnapshot:
    return PackSnapshot(
        pack_id=pack.pack_id, pack_name=pack.name, credits=pack.credits,
        bonus_credits=pack.bonus_credits, price_minor=pack.price_minor, currency=pack.currency,
    )  # fmt: skip


def _row(
    tenant: str, pack_id: str, spec: PackSpec, archived: bool, created: int, now: int
) -> PackRow:
    return PackRow(
        tenant=tenant,
        pack_id=pack_id,
        name=spec.name,
        description=spec.description,
        credits=spec.credits,
        bonus_credits=spec.bonus_credits,
        price_minor=spec.price_minor,
        currency=spec.currency,
        validity_days=spec.validity_days,
        recurrence=str(spec.recurrence),
        rollover_cap=spec.rollover_cap,
        priority=spec.priority,
        active=spec.active and not archived,
        trial=spec.trial,
        archived=archived,
        create_ms=created,
        update_ms=now,
    )


def _pack_id(value: str, v: Violations, field: str = "pack_id") -> None:
    if not value:
        v.add(field, "required")
    elif len(value) > 64 or not value.isascii():
        v.add(field, "not a pack id")


@dataclass(frozen=True)
class PackPage:
    packs: list[PackRow]
    next_page_token: str


class Catalog:
    """Create, read, change and archive packs."""

    def __init__(self, config: ConfigStore, clock: Clock, ttl_s: int = IDEMPOTENCY_TTL_S):
        self.config = config
        self.clock = clock
        self.ttl_ms = ttl_s * 1000

    async def _put(
        self,
        tenant: str,
        pack_id: str,
        request_id: str,
        operation: str,
        params: Mapping[str, object],
        build: Callable[[PackRow | None], PackRow],
    ) -> PackRow:
        now = self.clock.now_ms()
        req = ConfigStore.Request(
            tenant, request_id, fingerprint(operation, params), now, self.ttl_ms
        )
        stored, _ = await applied(asyncio.to_thread(self.config.put_pack, pack_id, req, build))
        return stored

    @staticmethod
    def _existing(current: PackRow | None, pack_id: str) -> PackRow:
        if current is None:
            raise PackNotFound(f"no pack {pack_id!r}", {"pack_id": pack_id})
        return current

    async def create(
        self, tenant: str, spec: PackSpec, request_id: str, violations: Violations | None = None
    ) -> PackRow:
        v = Violations(violations)
        check(spec, v)
        v.request_id(request_id)
        v.raise_if_any()
        now = self.clock.now_ms()
        spec = replace(spec, active=True)  # new packs are for sale; UpdatePack can pause them
        row = _row(tenant, new_id("pack", now), spec, False, now, now)
        return await self._put(
            tenant, row.pack_id, request_id, "CreatePack", {"spec": repr(spec)}, lambda _: row
        )

    async def get(self, tenant: str, pack_id: str) -> PackRow:
        v = Violations()
        _pack_id(pack_id, v)
        v.raise_if_any()
        row = await asyncio.to_thread(self.config.pack, tenant, pack_id)
        if row is None:
            raise PackNotFound(f"no pack {pack_id!r}", {"pack_id": pack_id})
        return row

    async def for_sale(
        self, tenant: str, pack_id: str, sale: Sale, v: Violations, field: str = "pack_id"
    ) -> PackRow:
        """The pack, if `sale` may sell it (`check_for_sale`); PackNotFound if none."""
        pack = await self.get(tenant, pack_id)
        check_for_sale(pack, sale, v, field)
        return pack

    async def list_page(
        self, tenant: str, show_archived: bool, page_size: int, page_token: str
    ) -> PackPage:
        v = Violations()
        if page_size < 0:
            v.add("page_size", "must not be negative")
        after = _decode(page_token, show_archived, v) if page_token else None
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows = await asyncio.to_thread(self.config.packs, tenant, show_archived, size + 1, after)
        page = rows[:size]
        token = _encode(page[-1], show_archived) if len(rows) > size else ""
        return PackPage(page, token)

    async def update(
        self,
        tenant: str,
        pack_id: str,
        changes: PackSpec,
        paths: list[str],
        request_id: str,
        violations: Violations | None = None,
    ) -> PackRow:
        """Change the fields named by `paths` to their values in `changes`."""
        v = Violations(violations)
        v.request_id(request_id)
        _pack_id(pack_id, v, "pack.pack_id")
        v.update_mask(paths, UPDATABLE, MAX_UPDATE_PATHS)
        v.raise_if_any()

        def build(current: PackRow | None) -> PackRow:
            # Runs inside the store's write transaction, on the pack as it is now.
            stored = self._existing(current, pack_id)
            merged = spec_of(stored)
            for path in paths:
                if path == "price":
                    merged = replace(
                        merged, price_minor=changes.price_minor, currency=changes.currency
                    )
                else:
                    attr = _FIELD_OF_PATH.get(path, path)
                    merged = replace(merged, **{attr: getattr(changes, attr)})
            check_merged = Violations()
            check(merged, check_merged)
            check_merged.raise_if_any()
            return _row(
                tenant, pack_id, merged, stored.archived, stored.create_ms, self.clock.now_ms()
            )

        # The request's own values, not the merged pack: a retry after another change to
        # the pack is still the same request.
        params = {"pack_id": pack_id, "paths": sorted(paths), "changes": repr(changes)}
        return await self._put(tenant, pack_id, request_id, "UpdatePack", params, build)

    async def archive(self, tenant: str, pack_id: str, request_id: str) -> PackRow:
        """Archive a pack: no longer listed as active nor for sale; purchases stay."""
        v = Violations()
        v.request_id(request_id)
        _pack_id(pack_id, v)
        v.raise_if_any()

        def build(current: PackRow | None) -> PackRow:
            stored = self._existing(current, pack_id)
            return _row(
                tenant, pack_id, spec_of(stored), True, stored.create_ms, self.clock.now_ms()
            )

        return await self._put(
            tenant, pack_id, request_id, "DeletePack", {"pack_id": pack_id}, build
        )


def _encode(last: PackRow, show_archived: bool) -> str:
    return pages.encode({"c": last.create_ms, "i": last.pack_id, "a": show_archived})


def _decode(token: str, show_archived: bool, v: Violations) -> tuple[int, str] | None:
    return pages.decode(token, {"a": show_archived}, pages.by_creation, v,
                        "belongs to a listing with another show_archived")  # fmt: skip
