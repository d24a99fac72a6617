"""Purchases: a payment turns into credit lots, ledger first.

A purchase and the grants it makes are written to the ledger in one transaction before
any credit reaches Redis; the grants are then applied under ids derived from the purchase
id, so any retry (the client's, the reconciler's, a rebuild's) applies them at most once.
A payment reference is redeemed at most once per tenant and a trial once per account,
both decided by unique indexes in the ledger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import StrEnum

from creditmeter.constants import MAX_REFERENCE_LENGTH
from creditmeter.domain import balances, pages
from creditmeter.domain.backpressure import Backpressure
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint, new_id
from creditmeter.domain.lots import LotSource
from creditmeter.domain.model import PackRow, PurchaseRecord
from creditmeter.domain.packs import Catalog, Sale, snapshot
from creditmeter.domain.staging import apply_staged
from creditmeter.domain.validation import Violations
from creditmeter.errors import (
    IdempotencyKeyReused,
    InvalidRequest,
    LotNotFound,
    PurchaseNotCompleted,
    PurchaseNotFound,
    PurchaseNotPending,
    TrialAlreadyUsed,
    applied,
)
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import Commerce, StagedGrant
from creditmeter.storage.redis_store import Call, GrantRecord, RedisStore

DAY_MS = 86_400_000
DEFAULT_PENDING_TTL_MS = 30 * 60 * 1000
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
class PurchaseStatus(StrEnum):
    """Where a purchase stands. EXPIRED is never stored: a pending purchase past its
    expiry reads as expired (`shown`)."""

    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUNDED = "refunded"


STATUSES = tuple(PurchaseStatus)


@dataclass(frozen=True)
class PurchaseResult:
    purchase: PurchaseRecord
    balance: int
    #: Credits of the purchase that repaid the account's debt first (the credit line).
    debt_repaid: int = 0


@dataclass(frozen=True)
class RefundResult:
    purchase: PurchaseRecord
    refunded: int
    spent: int
    lots: list[tuple[str, int]]
    balance: int


@dataclass(frozen=True)
class VoidResult:
    voided: int
    spent: int
    balance: int


@dataclass(frozen=True)
class PurchasePage:
    purchases: list[PurchaseRecord]
    next_page_token: str


def shown(p: PurchaseRecord, now_ms: int) -> PurchaseRecord:
    """A pending purchase past its expiry reads as expired, swept or not."""
    if p.status == PurchaseStatus.PENDING and p.expire_ms is not None and p.expire_ms <= now_ms:
        return replace(p, status=PurchaseStatus.EXPIRED)
    return p


def _payment_reference(value: str, v: Violations, required: bool) -> None:
    if required and not value:
        v.add("payment_reference", "required (only trial packs are granted without one)")
    elif len(value) > MAX_REFERENCE_LENGTH:
        v.add("payment_reference", f"at most {MAX_REFERENCE_LENGTH} characters")


def _id(value: str, field: str, v: Violations) -> None:
    if not value:
        v.add(field, "required")
    elif len(value) > 64 or not value.isascii():
        v.add(field, "not an id this server issued")


class Purchases:
    def __init__(
        self,
        catalog: Catalog,
        ledger: Commerce,
        store: RedisStore,
        clock: Clock,
        gate: Backpressure,
        pending_ttl_ms: int = DEFAULT_PENDING_TTL_MS,
    ) -> None:
        self.catalog = catalog
        self.ledger = ledger
        self.store = store
        self.clock = clock
        self.gate = gate
        self.pending_ttl_ms = pending_ttl_ms

    # --- the grants of a purchase ---------------------------------------------------
    def _grants(self, p: PurchaseRecord, pack: PackRow, now_ms: int) -> list[StagedGrant]:
        """The staged grants of a completed purchase. Their ids derive from the purchase,
        so staging them again returns the first staging (with its original times)."""
        expires = now_ms + pack.validity_days * DAY_MS if pack.validity_days else None
        parts = [("credits", p.credits, LotSource.TRIAL if p.trial else LotSource.PURCHASE)]
        if p.bonus_credits:
            parts.append(("bonus", p.bonus_credits, LotSource.BONUS))
        grants = []
        for (part, amount, source), lot_id in zip(parts, p.lot_ids, strict=True):
            grants.append(
                StagedGrant(
                    tenant=p.tenant,
                    account=p.account,
                    request_id=f"{p.purchase_id}:{part}",
                    fingerprint=fingerprint(
                        "PurchaseGrant", {"purchase": p.purchase_id, "part": part}
                    ),
                    txn=f"txn_{p.purchase_id}_{part}",
                    lot_id=lot_id,
                    amount=amount,
                    priority=pack.priority,
                    expires_at_ms=expires,
                    source=str(source),
                    reference=p.purchase_id,
                    created_ms=now_ms,
                )
            )
        return grants

    def _lot_ids(self, pack: PackRow | PurchaseRecord, now_ms: int) -> tuple[str, ...]:
        return tuple(new_id("lot", now_ms) for _ in range(2 if pack.bonus_credits else 1))

    async def _apply(self, p: PurchaseRecord, pack: PackRow, now_ms: int) -> tuple[int, int]:
        """Apply a completed purchase's grants to Redis (idempotently); the balance after
        and the debt they repaid first."""
        balance = repaid = 0
        for grant in self._grants(p, pack, now_ms):
            staged = await applied(self.ledger.stage_grant(grant))
            record = await apply_staged(self.store, self.ledger, staged, now_ms)
            balance = balances.after(record.holdings)
            if isinstance(record, GrantRecord):
                repaid += record.repaid
        return balance, repaid

    def _record(
        self, tenant: str, account: str, pack: PackRow, request_id: str, fp: str, now: int,
        status: str, payment_reference: str, lot_ids: tuple[str, ...],
    ) -> PurchaseRecord:  # fmt: skip
        pending = status == PurchaseStatus.PENDING
        return PurchaseRecord(
            purchase_id=new_id("pur", now),
            tenant=tenant,
            account=account,
            status=status,
            payment_reference=payment_reference,
            lot_ids=lot_ids,
            request_id=request_id,
            fingerprint=fp,
            trial=pack.trial,
            create_ms=now,
            complete_ms=None if pending else now,
            expire_ms=now + self.pending_ttl_ms if pending else None,
            **snapshot(pack),
        )

    # --- PurchasePack ---------------------------------------------------------------
    async def purchase(
        self, tenant: str, account: str, pack_id: str, payment_reference: str, request_id: str
    ) -> PurchaseResult:
        """One call for a payment already taken: record it and grant the pack."""
        v = Violations()
        v.account_id(account)
        v.request_id(request_id)
        _id(pack_id, "pack_id", v)
        _payment_reference(payment_reference, v, required=False)  # its length, already
        v.raise_if_any()
        pack = await self.catalog.for_sale(tenant, pack_id, Sale.PURCHASE, v)
        _payment_reference(payment_reference, v, required=not pack.trial)
        v.raise_if_any()
        self.gate.check()
        now = self.clock.now_ms()
        fp = fingerprint("PurchasePack", {"account": account, "pack": pack_id,
                                          "payment_reference": payment_reference})  # fmt: skip
        record = self._record(tenant, account, pack, request_id, fp, now, PurchaseStatus.COMPLETED,
                              payment_reference, self._lot_ids(pack, now))  # fmt: skip
        stored, inserted = await self.ledger.create_purchase(
            record, self._grants(record, pack, now)
        )
        if not inserted:
            if stored.request_id == request_id and stored.fingerprint != fp:
                raise IdempotencyKeyReused(
                    "request_id was already used with different parameters",
                    {"request_id": request_id},
                )
            if (
                pack.trial
                and stored.trial
                and stored.request_id != request_id
                and (stored.account, stored.pack_id) == (account, pack_id)
            ):
                raise TrialAlreadyUsed(
                    f"account {account!r} has already had trial {pack_id!r}",
                    {"pack_id": pack_id, "purchase_id": stored.purchase_id},
                )
        if stored.status not in (PurchaseStatus.COMPLETED, PurchaseStatus.REFUNDED):
            raise PurchaseNotPending(  # a reference reused on a pending purchase: cannot be
                f"purchase {stored.purchase_id} is {stored.status}",
                {"purchase_id": stored.purchase_id, "status": stored.status},
            )
        stored_pack = (
            pack
            if stored.pack_id == pack.pack_id
            else await self.catalog.get(tenant, stored.pack_id)
        )
        balance, repaid = await self._apply(stored, stored_pack, stored.complete_ms or now)
        return PurchaseResult(stored, balance, repaid)

    # --- two-step purchases ---------------------------------------------------------
    async def create(
        self, tenant: str, account: str, pack_id: str, request_id: str
    ) -> PurchaseRecord:
        """A pending purchase (a payment intent): nothing is granted yet."""
        v = Violations()
        v.account_id(account)
        v.request_id(request_id)
        _id(pack_id, "pack_id", v)
        v.raise_if_any()
        pack = await self.catalog.for_sale(tenant, pack_id, Sale.PAYMENT_INTENT, v)
        v.raise_if_any()
        now = self.clock.now_ms()
        fp = fingerprint("CreatePurchase", {"account": account, "pack": pack_id})
        record = self._record(
            tenant, account, pack, request_id, fp, now, PurchaseStatus.PENDING, "", ()
        )
        stored, inserted = await self.ledger.create_purchase(record, [])
        if not inserted and stored.fingerprint != fp:
            raise IdempotencyKeyReused(
                "request_id was already used with different parameters", {"request_id": request_id}
            )
        return shown(stored, now)

    async def complete(
        self, tenant: str, purchase_id: str, payment_reference: str, request_id: str
    ) -> PurchaseResult:
        """Record the payment of a pending purchase and grant its credits."""
        v = Violations()
        _id(purchase_id, "purchase_id", v)
        v.request_id(request_id)
        _payment_reference(payment_reference, v, required=True)
        v.raise_if_any()
        self.gate.check()
        current = await self.get(tenant, purchase_id)
        pack = await self.catalog.get(tenant, current.pack_id)  # archived packs still apply
        now = self.clock.now_ms()
        lot_ids = current.lot_ids or self._lot_ids(current, now)
        completing = replace(current, lot_ids=lot_ids, complete_ms=now)
        after = await applied(self.ledger.complete_purchase(
            tenant, purchase_id, payment_reference, lot_ids, now,
            self._grants(completing, pack, now),
        ))  # fmt: skip
        assert after is not None
        if after.status != PurchaseStatus.COMPLETED or after.payment_reference != payment_reference:
            raise PurchaseNotPending(
                f"purchase {purchase_id} is {after.status}",
                {"purchase_id": purchase_id, "status": after.status},
            )
        balance, repaid = await self._apply(after, pack, after.complete_ms or now)
        return PurchaseResult(after, balance, repaid)

    async def cancel(self, tenant: str, purchase_id: str, request_id: str) -> PurchaseRecord:
        v = Violations()
        _id(purchase_id, "purchase_id", v)
        v.request_id(request_id)
        v.raise_if_any()
        current = await self.get(tenant, purchase_id)
        if current.status == PurchaseStatus.CANCELLED:
            return current  # cancelling twice changes nothing
        if current.status != PurchaseStatus.PENDING:
            raise PurchaseNotPending(
                f"purchase {purchase_id} is {current.status}",
                {"purchase_id": purchase_id, "status": current.status},
            )
        after = await self.ledger.update_purchase_status(
            tenant, purchase_id, PurchaseStatus.PENDING, PurchaseStatus.CANCELLED
        )
        assert after is not None
        if after.status != PurchaseStatus.CANCELLED:
            raise PurchaseNotPending(
                f"purchase {purchase_id} is {after.status}",
                {"purchase_id": purchase_id, "status": after.status},
            )
        return after

    # --- reads ----------------------------------------------------------------------
    async def get(self, tenant: str, purchase_id: str) -> PurchaseRecord:
        v = Violations()
        _id(purchase_id, "purchase_id", v)
        v.raise_if_any()
        p = await self.ledger.get_purchase(tenant, purchase_id)
        if p is None:
            raise PurchaseNotFound(f"no purchase {purchase_id!r}", {"purchase_id": purchase_id})
        return shown(p, self.clock.now_ms())

    async def list_page(
        self,
        tenant: str,
        account: str | None,
        status: str | None,
        page_size: int,
        token: str,
        violations: Violations | None = None,
    ) -> PurchasePage:
        v = Violations(violations)
        if account is not None:
            v.account_id(account)
        if page_size < 0:
            v.add("page_size", "must not be negative")
        key = json.dumps([account, status])
        before = _decode(token, key, v) if token else None
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # An expired purchase may still be stored as pending (nothing has touched it since
        # it expired): for either status read both, and tell them apart by expiry here.
        either = (PurchaseStatus.PENDING, PurchaseStatus.EXPIRED)
        stored_status = None if status in either else status
        now = self.clock.now_ms()
        out: list[PurchaseRecord] = []
        cursor = before
        while len(out) <= size:
            rows = await self.ledger.list_purchases(
                tenant, account, stored_status, size + 1, cursor
            )
            out.extend(p for p in map(lambda r: shown(r, now), rows) if status in (None, p.status))
            if len(rows) <= size:
                break
            cursor = (rows[-1].create_ms, rows[-1].purchase_id)
        page = out[:size]
        next_token = _encode(page[-1], key) if len(out) > size else ""
        return PurchasePage(page, next_token)

    # --- refunds ----------------------------------------------------------------------
    async def refund(
        self, tenant: str, purchase_id: str, reason: str, request_id: str
    ) -> RefundResult:
        """Remove what is left of a purchase's lots; report what was already spent."""
        v = Violations()
        _id(purchase_id, "purchase_id", v)
        v.request_id(request_id)
        v.reference(reason, "reason")
        v.raise_if_any()
        current = await self.get(tenant, purchase_id)
        if current.status == PurchaseStatus.REFUNDED:
            account = await balances.read(
                self.store, AccountKeys(tenant, current.account), self.clock.now_ms()
            )
            return RefundResult(current, 0, current.spent_credits, [], account.balance)
        if current.status != PurchaseStatus.COMPLETED:
            raise PurchaseNotCompleted(
                f"purchase {purchase_id} is {current.status}",
                {"purchase_id": purchase_id, "status": current.status},
            )
        self.gate.check()
        now = self.clock.now_ms()
        # The refund's request id derives from the purchase: a retry, by anyone, replays it.
        call = Call(now, new_id("txn", now), f"{purchase_id}:refund",
                    fingerprint("Refund", {"purchase": purchase_id}))  # fmt: skip
        record = await applied(
            self.store.refund(AccountKeys(tenant, current.account), call, reason, current.lot_ids)
        )
        refunded = record.removed
        spent = current.credits + current.bonus_credits - refunded
        after = await self.ledger.update_purchase_status(
            tenant, purchase_id, PurchaseStatus.COMPLETED, PurchaseStatus.REFUNDED, refunded, spent
        )
        assert after is not None
        lots = [(lot, max(n, 0)) for lot, n, _ in record.lots]
        return RefundResult(
            shown(after, now), refunded, spent, lots, balances.after(record.holdings)
        )

    async def void_grant(
        self, tenant: str, account: str, lot_id: str, reason: str, request_id: str
    ) -> VoidResult:
        """Remove what is left of one lot granted by mistake."""
        v = Violations()
        v.account_id(account)
        _id(lot_id, "lot_id", v)
        v.request_id(request_id)
        v.reference(reason, "reason")
        v.raise_if_any()
        self.gate.check()
        keys = AccountKeys(tenant, account)
        now = self.clock.now_ms()
        call = Call(now, new_id("txn", now), request_id,
                    fingerprint("VoidGrant", {"account": account, "lot": lot_id}))  # fmt: skip
        record = await applied(self.store.refund(keys, call, reason, [lot_id]))
        _, removed, granted = record.lots[0]
        if removed < 0:
            raise LotNotFound(f"lot {lot_id!r} is not on account {account!r}", {"lot_id": lot_id})
        return VoidResult(removed, granted - removed, balances.after(record.holdings))


def _encode(last: PurchaseRecord, key: str) -> str:
    return pages.encode({"c": last.create_ms, "i": last.purchase_id, "k": key})


def _decode(token: str, key: str, v: Violations) -> tuple[int, str] | None:
    return pages.decode(token, {"k": key}, pages.by_creation, v,
                        "belongs to a listing with another account or status")  # fmt: skip


def status_or_error(value: str | None) -> str | None:
    if value is not None and value not in STATUSES:
        raise InvalidRequest([("status", f"unknown status {value!r}")])
    return value
