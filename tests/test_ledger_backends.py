"""One suite, every ledger backend: SQLite and PostgreSQL (a real local server)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from json import loads as json_loads
from pathlib import Path

import pytest

from creditmeter.domain.model import Delivery, Notice, NoticeKind, Period, PurchaseRecord, TxnQuery
from creditmeter.errors import Rejected
from creditmeter.storage.ledger import open_ledger
from creditmeter.storage.ledger.base import Event, Ledger, RequestRecord, StagedGrant

DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    ledger = open_ledger(url, tmp_path)
    await ledger.open()
    yield ledger
    await ledger.close()


def ev(tenant: str, account: str, seq: int, kind: str = "consume", **kw: object) -> Event:
    txn = str(kw.pop("txn", f"{tenant}-{account}-txn{seq}"))
    fields: dict[str, object] = {
        "event_id": f"{txn}:{kw.pop('n', 1)}", "tenant": tenant, "account": account,
        "kind": kind, "txn": txn, "seq": seq, "request_id": f"r{seq}", "ts_ms": T0 + seq,
    }  # fmt: skip
    fields.update(kw)
    return Event(**fields)  # type: ignore[arg-type]


def fresh() -> str:
    return "t" + uuid.uuid4().hex[:10]


async def test_append_is_idempotent_on_event_id(ledger: Ledger) -> None:
    t = fresh()
    batch = [
        ev(t, "a", 1, "grant", lot="L1", amount=100, balance=100, priority=50, source="manual"),
        ev(t, "a", 2, lot="L1", amount=30, balance=70, feature="text", units=30),
    ]
    assert await ledger.append(batch, []) == 2
    assert await ledger.append(batch, []) == 0  # a replayed batch (flusher crash before ack)
    assert await ledger.append([*batch, ev(t, "a", 3, lot="L1", amount=1, balance=69)], []) == 1
    events = [e async for e in ledger.scan(t)]
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0] == batch[0] and events[1] == batch[1]


async def test_requests_are_kept_once(ledger: Ledger) -> None:
    t = fresh()
    rec = RequestRecord(t, "a", "req-1", "f" * 32, '["OK","x"]', "txn1", T0)
    await ledger.append([], [rec, rec])
    await ledger.append([], [RequestRecord(t, "a", "req-1", "g" * 32, "[]", "txn2", T0 + 5)])
    since = [r for r in await ledger.requests_since(T0) if r.tenant == t]
    assert since == [rec]
    assert [r for r in await ledger.requests_since(T0 + 1) if r.tenant == t] == []


async def test_stage_grant_replay_reuse_and_application(ledger: Ledger) -> None:
    t = fresh()
    g = StagedGrant(t, "a", "req", "f" * 32, "txnG", "lotG", 500, 50, None, "purchase", "ord-1", T0)
    assert await ledger.stage_grant(g) == g
    retry = StagedGrant(t, "a", "req", "f" * 32, "txnOther", "lotOther", 500, 50, None,
                        "purchase", "ord-1", T0 + 9)  # fmt: skip
    assert await ledger.stage_grant(retry) == g  # the first staging wins, ids included
    with pytest.raises(Rejected) as reused:
        await ledger.stage_grant(StagedGrant(t, "a", "req", "e" * 32, "x", "y", 1, 50, None,
                                             "purchase", "", T0))  # fmt: skip
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    pending = [s for s in await ledger.unapplied_grants(T0 + 1, 100) if s.tenant == t]
    assert pending == [g]
    assert [s for s in await ledger.unapplied_grants(T0, 100) if s.tenant == t] == []
    await ledger.append([ev(t, "a", 1, "grant", txn="txnG", lot="lotG", amount=500)], [])
    assert [s for s in await ledger.unapplied_grants(T0 + 1, 100) if s.tenant == t] == []


async def test_paging_1000_transactions_in_pages_of_7(ledger: Ledger) -> None:
    t = fresh()
    events: list[Event] = []
    seq = 0
    for i in range(1000):
        feature = ("text", "voice", "video")[i % 3]
        seq += 1
        events.append(ev(t, "a", seq, txn=f"c{i:04d}", lot="L1", amount=1, balance=0,
                         feature=feature, units=1))  # fmt: skip
        if i % 5 == 0:  # every fifth consume spans two lots
            seq += 1
            events.append(ev(t, "a", seq, txn=f"c{i:04d}", n=2, lot="L2", amount=2, balance=0,
                             feature=feature))  # fmt: skip
    events.append(ev(t, "other", 1, txn="elsewhere", amount=1, feature="text"))
    await ledger.append(events, [])

    async def read_all(query: TxnQuery) -> list[str]:
        seen: list[str] = []
        before: int | None = None
        while True:
            page = await ledger.transactions(t, "a", query, 7, before)
            assert len(page) <= 7
            seen.extend(p.txn for p in page)
            if len(page) < 7:
                return seen
            before = page[-1].seq

    everything = await read_all(TxnQuery())
    assert everything == [f"c{i:04d}" for i in reversed(range(1000))]
    voice = await read_all(TxnQuery(features=("voice",)))
    assert voice == [f"c{i:04d}" for i in reversed(range(1000)) if i % 3 == 1]
    window = await read_all(TxnQuery(start_ms=T0 + 100, end_ms=T0 + 200))
    in_window = {e.txn for e in events if T0 + 100 <= e.ts_ms < T0 + 200 and e.account == "a"}
    assert window == sorted(in_window, reverse=True) and len(window) > 50
    spanning = (await ledger.transactions(t, "a", TxnQuery(), 1000, None))[-1]
    assert (spanning.txn, spanning.amount, spanning.lines) == ("c0000", 3, [("L1", 1), ("L2", 2)])
    assert await ledger.transactions(t, "a", TxnQuery(kinds=("grant",)), 7, None) == []


async def test_usage_by_day_and_month(ledger: Ledger) -> None:
    t = fresh()
    rows = [
        ev(t, "a", 1, ts_ms=T0 + 1000, feature="text", amount=2, units=2),
        ev(t, "a", 2, ts_ms=T0 + DAY_MS, feature="text", amount=3, units=3),
        ev(t, "a", 3, ts_ms=T0 + DAY_MS + 5, feature="voice", amount=10, units=2),
        ev(t, "b", 1, ts_ms=T0 + 40 * DAY_MS, feature="text", amount=7, units=7),
        ev(t, "b", 2, "grant", ts_ms=T0 + 2, amount=1000),
    ]
    await ledger.append(rows, [])
    by_day = await ledger.usage(t, "a", T0, T0 + 50 * DAY_MS, Period.DAY, None)
    assert [(r.period, r.feature, r.credits, r.units) for r in by_day] == [
        ("2026-01-01", "text", 2, 2), ("2026-01-02", "text", 3, 3), ("2026-01-02", "voice", 10, 2)
    ]
    by_month = await ledger.usage(t, None, T0, T0 + 50 * DAY_MS, Period.MONTH, "text")
    assert [(r.period, r.credits) for r in by_month] == [("2026-01", 5), ("2026-02", 7)]
    assert await ledger.usage(t, None, T0 + 41 * DAY_MS, T0 + 50 * DAY_MS, Period.DAY, None) == []


async def test_scan_orders_by_account_and_seq(ledger: Ledger) -> None:
    t = fresh()
    await ledger.append([ev(t, "b", 2), ev(t, "a", 3), ev(t, "b", 1, txn="x"), ev(t, "a", 1)], [])
    assert [(e.account, e.seq) for e in ledger_events(await collect(ledger, t))] == [
        ("a", 1), ("a", 3), ("b", 1), ("b", 2)
    ]
    assert await ledger.event_count() >= 4
    await ledger.ping()


async def collect(ledger: Ledger, tenant: str) -> list[Event]:
    return [e async for e in ledger.scan(tenant)]


def ledger_events(events: list[Event]) -> list[Event]:
    return events


# --- purchases ----------------------------------------------------------------------------


def purchase(
    tenant: str,
    purchase_id: str,
    *,
    account: str = "a",
    pack_id: str = "pack1",
    status: str = "completed",
    reference: str = "",
    request_id: str | None = None,
    trial: bool = False,
    create_ms: int = T0,
    expire_ms: int | None = None,
) -> PurchaseRecord:
    """A purchase; its id is `purchase_id` after the tenant (ids are global: the PostgreSQL
    database is shared by the session)."""
    purchase_id = f"{tenant}-{purchase_id}"
    completed = status == "completed"
    return PurchaseRecord(
        purchase_id=purchase_id, tenant=tenant, account=account, pack_id=pack_id,
        status=status, payment_reference=reference, pack_name="Starter",
        price_minor=0 if trial else 999, currency="EUR", credits=1000, bonus_credits=100,
        lot_ids=(f"{purchase_id}-L1", f"{purchase_id}-L2") if completed else (),
        request_id=request_id or f"req-{purchase_id}", fingerprint="f" * 32, trial=trial,
        create_ms=create_ms, complete_ms=create_ms if completed else None, expire_ms=expire_ms,
    )  # fmt: skip


def purchase_grants(p: PurchaseRecord, lot_ids: tuple[str, ...] = ()) -> list[StagedGrant]:
    """The two grants of a purchase: its credits lot, then its bonus lot."""
    lots = lot_ids or p.lot_ids or (f"{p.purchase_id}-L1", f"{p.purchase_id}-L2")
    return [
        StagedGrant(p.tenant, p.account, f"{p.purchase_id}:{i}", "f" * 32, f"{p.purchase_id}-t{i}",
                    lot, amount, 50, None, "purchase", p.payment_reference, T0)
        for i, (lot, amount) in enumerate(zip(lots, (p.credits, p.bonus_credits), strict=True))
    ]  # fmt: skip


async def staged(ledger: Ledger, tenant: str) -> list[StagedGrant]:
    """The tenant's staged grants not yet applied (the PostgreSQL database is shared)."""
    found = [s for s in await ledger.unapplied_grants(T0 + DAY_MS, 1_000_000) if s.tenant == tenant]
    return sorted(found, key=lambda s: s.request_id)


async def test_purchase_round_trips_every_field(ledger: Ledger) -> None:
    t = fresh()
    done = purchase(t, "p1", reference="pay-1", create_ms=T0 + 5)
    pending = purchase(t, "p2", status="pending", expire_ms=T0 + 60_000)
    trial = purchase(t, "p3", trial=True, pack_id="trial")
    for p in (done, pending, trial):
        assert await ledger.create_purchase(p, []) == (p, True)
        assert await ledger.get_purchase(t, p.purchase_id) == p
    assert (done.lot_ids, pending.lot_ids) == ((f"{t}-p1-L1", f"{t}-p1-L2"), ())
    assert await ledger.get_purchase(t, "nope") is None
    assert await ledger.get_purchase(fresh(), f"{t}-p1") is None  # another tenant's


async def test_create_purchase_dedupes_by_request_id(ledger: Ledger) -> None:
    t = fresh()
    first = purchase(t, "p1", status="pending", request_id="r1", expire_ms=T0 + 1000)
    assert await ledger.create_purchase(first, purchase_grants(first)) == (first, True)
    retry = purchase(t, "p2", status="pending", request_id="r1", expire_ms=T0 + 2000)
    assert await ledger.create_purchase(retry, purchase_grants(retry)) == (first, False)
    assert await ledger.get_purchase(t, f"{t}-p2") is None
    assert await staged(ledger, t) == purchase_grants(first)  # the retry staged nothing
    # Pending purchases all have payment reference "": no conflict among them.
    other = purchase(t, "p3", status="pending", request_id="r2")
    assert await ledger.create_purchase(other, []) == (other, True)
    # Request ids are per tenant.
    elsewhere = purchase(fresh(), "p4", status="pending", request_id="r1")
    assert await ledger.create_purchase(elsewhere, []) == (elsewhere, True)


async def test_create_purchase_dedupes_by_payment_reference(ledger: Ledger) -> None:
    t = fresh()
    first = purchase(t, "p1", reference="pay-1")
    assert await ledger.create_purchase(first, purchase_grants(first)) == (first, True)
    again = purchase(t, "p2", reference="pay-1", account="b", pack_id="pack2")
    assert await ledger.create_purchase(again, purchase_grants(again)) == (first, False)
    assert await ledger.get_purchase(t, f"{t}-p2") is None
    assert await staged(ledger, t) == purchase_grants(first)
    # A request id match wins over a payment reference match.
    by_request = purchase(t, "p3", reference="pay-1", request_id=f"req-{t}-p1")
    second = purchase(t, "p4", reference="pay-2")
    assert await ledger.create_purchase(second, []) == (second, True)
    assert await ledger.create_purchase(
        dataclasses.replace(by_request, payment_reference="pay-2"), []
    ) == (first, False)
    # Payment references are per tenant.
    elsewhere = purchase(fresh(), "p5", reference="pay-1")
    assert await ledger.create_purchase(elsewhere, []) == (elsewhere, True)


async def test_trial_once_per_account_and_pack(ledger: Ledger) -> None:
    t = fresh()
    trial = purchase(t, "p1", pack_id="trial", trial=True)
    assert await ledger.create_purchase(trial, purchase_grants(trial)) == (trial, True)
    again = purchase(t, "p2", pack_id="trial", trial=True)
    assert await ledger.create_purchase(again, purchase_grants(again)) == (trial, False)
    assert await staged(ledger, t) == purchase_grants(trial)
    others = [
        purchase(t, "p3", pack_id="trial", trial=True, account="b"),  # another account
        purchase(t, "p4", pack_id="trial2", trial=True),  # another pack
        purchase(t, "p5", pack_id="trial", reference="pay-5"),  # not a trial purchase
    ]
    for p in others:
        assert await ledger.create_purchase(p, []) == (p, True)
    assert await ledger.create_purchase(purchase(fresh(), "p6", pack_id="trial", trial=True), [])


@pytest.mark.parametrize("clash", ["payment_reference", "request_id", "trial"])
async def test_racing_purchases_insert_once(ledger: Ledger, clash: str) -> None:
    """20 concurrent purchases sharing one key: one is inserted with its grants, every call
    returns it. (SQLite serializes them on its thread; PostgreSQL races them over the pool.)"""
    t = fresh()

    def contender(i: int) -> PurchaseRecord:
        return purchase(
            t, f"p{i:02d}", account=f"acct{i}" if clash != "trial" else "a",
            reference="pay-race" if clash == "payment_reference" else "",
            request_id="req-race" if clash == "request_id" else None, trial=clash == "trial",
        )  # fmt: skip

    contenders = [contender(i) for i in range(20)]
    results = await asyncio.gather(
        *(ledger.create_purchase(p, purchase_grants(p)) for p in contenders)
    )
    winners = [p for p, inserted in results if inserted]
    assert len(winners) == 1
    winner = winners[0]
    assert all(p == winner for p, _ in results)
    assert winner in contenders
    assert await ledger.list_purchases(t, None, None, 100, None) == [winner]
    assert await staged(ledger, t) == purchase_grants(winner)


async def test_complete_purchase(ledger: Ledger) -> None:
    t = fresh()
    pending = purchase(t, "p1", status="pending", expire_ms=T0 + 1000)
    await ledger.create_purchase(pending, [])
    assert await staged(ledger, t) == []
    lots = ("p1-L1", "p1-L2")
    grants = purchase_grants(dataclasses.replace(pending, payment_reference="pay-1"), lots)
    done = await ledger.complete_purchase(t, f"{t}-p1", "pay-1", lots, T0 + 999, grants)
    expected = dataclasses.replace(
        pending, status="completed", payment_reference="pay-1", lot_ids=lots, complete_ms=T0 + 999
    )
    assert done == expected
    assert await ledger.get_purchase(t, f"{t}-p1") == expected
    assert await staged(ledger, t) == grants
    # A replay (or a late second attempt) changes nothing and stages nothing more.
    other_grants = purchase_grants(pending, ("x1", "x2"))
    replay = await ledger.complete_purchase(
        t, f"{t}-p1", "pay-2", ("x1", "x2"), T0 + 5, other_grants
    )
    assert replay == expected
    assert await staged(ledger, t) == grants
    # No such purchase (in this tenant).
    assert await ledger.complete_purchase(t, "nope", "pay-3", lots, T0, []) is None
    assert await ledger.complete_purchase(fresh(), f"{t}-p1", "pay-3", lots, T0, []) is None


async def test_complete_purchase_after_expiry_expires_it(ledger: Ledger) -> None:
    t = fresh()
    pending = purchase(t, "p1", status="pending", expire_ms=T0 + 1000)
    await ledger.create_purchase(pending, [])
    late = await ledger.complete_purchase(
        t, pending.purchase_id, "pay-1", ("L1", "L2"), T0 + 1000, purchase_grants(pending)
    )
    assert late == dataclasses.replace(pending, status="expired")
    assert await ledger.get_purchase(t, f"{t}-p1") == late
    assert await staged(ledger, t) == []
    # The reference was not taken by the expired purchase.
    forever = purchase(t, "p2", status="pending", expire_ms=None)
    await ledger.create_purchase(forever, [])
    done = await ledger.complete_purchase(t, f"{t}-p2", "pay-1", ("L1", "L2"), T0 + 10**12, [])
    assert done is not None and (done.status, done.payment_reference) == ("completed", "pay-1")
    # A cancelled purchase stays cancelled.
    cancelled = purchase(t, "p3", status="cancelled")
    await ledger.create_purchase(cancelled, [])
    assert await ledger.complete_purchase(t, f"{t}-p3", "pay-3", ("L",), T0, []) == cancelled


async def test_complete_purchase_with_a_used_reference_is_rejected(ledger: Ledger) -> None:
    t = fresh()
    paid = purchase(t, "p1", reference="pay-1")  # PurchasePack: completed at creation
    pending = purchase(t, "p2", status="pending", expire_ms=T0 + 1000)
    for p in (paid, pending):
        await ledger.create_purchase(p, [])
    with pytest.raises(Rejected) as used:
        await ledger.complete_purchase(t, f"{t}-p2", "pay-1", ("L1",), T0, purchase_grants(pending))
    assert (used.value.reason, used.value.metadata) == ("PAYMENT_REFERENCE_USED",
                                                        {"purchase_id": f"{t}-p1"})  # fmt: skip
    assert await ledger.get_purchase(t, f"{t}-p2") == pending
    assert await staged(ledger, t) == []
    # The same reference in another tenant is no conflict.
    u = fresh()
    await ledger.create_purchase(purchase(u, "p2", status="pending", expire_ms=T0 + 1000), [])
    done = await ledger.complete_purchase(u, f"{u}-p2", "pay-1", ("L1",), T0, [])
    assert done is not None and done.status == "completed"


async def test_racing_completions_with_one_reference(ledger: Ledger) -> None:
    t = fresh()
    pending = [purchase(t, f"p{i}", status="pending", expire_ms=T0 + 1000) for i in range(10)]
    for p in pending:
        await ledger.create_purchase(p, [])

    async def complete(p: PurchaseRecord) -> PurchaseRecord | Rejected:
        lots = (f"{p.purchase_id}-L1", f"{p.purchase_id}-L2")
        grants = purchase_grants(dataclasses.replace(p, payment_reference="pay-race"), lots)
        try:
            done = await ledger.complete_purchase(t, p.purchase_id, "pay-race", lots, T0, grants)
        except Rejected as e:
            return e
        assert done is not None
        return done

    results = await asyncio.gather(*(complete(p) for p in pending))
    winners = [r for r in results if isinstance(r, PurchaseRecord)]
    assert len(winners) == 1 and winners[0].status == "completed"
    for r in results:
        if isinstance(r, Rejected):
            assert (r.reason, r.metadata) == ("PAYMENT_REFERENCE_USED",
                                              {"purchase_id": winners[0].purchase_id})  # fmt: skip
    assert len(await ledger.list_purchases(t, None, "pending", 100, None)) == 9
    assert await staged(ledger, t) == purchase_grants(winners[0])


async def test_update_purchase_status_compares_and_sets(ledger: Ledger) -> None:
    t = fresh()
    done = purchase(t, "p1", reference="pay-1")
    pending = purchase(t, "p2", status="pending", expire_ms=T0 + 1000)
    for p in (done, pending):
        await ledger.create_purchase(p, [])
    refunded = dataclasses.replace(done, status="refunded", refunded_credits=70, spent_credits=30)
    assert (
        await ledger.update_purchase_status(t, f"{t}-p1", "completed", "refunded", 70, 30)
        == refunded
    )
    # Refunding twice changes nothing.
    assert (
        await ledger.update_purchase_status(t, f"{t}-p1", "completed", "refunded", 1, 2) == refunded
    )
    assert await ledger.get_purchase(t, f"{t}-p1") == refunded
    cancelled = dataclasses.replace(pending, status="cancelled")
    assert await ledger.update_purchase_status(t, f"{t}-p2", "pending", "cancelled") == cancelled
    assert await ledger.update_purchase_status(t, f"{t}-p2", "pending", "expired") == cancelled
    assert await ledger.update_purchase_status(t, "nope", "pending", "cancelled") is None
    assert await ledger.update_purchase_status(fresh(), f"{t}-p2", "cancelled", "pending") is None
    # A refunded purchase keeps its payment reference: it is still redeemed.
    again = purchase(t, "p3", reference="pay-1")
    assert await ledger.create_purchase(again, []) == (refunded, False)


async def test_list_purchases_pages_with_filters(ledger: Ledger) -> None:
    t = fresh()
    statuses = ("completed", "pending", "cancelled")
    made: list[PurchaseRecord] = []
    for i in range(25):
        # Pairs share a create_ms; mixed-case ids: ties must break by byte order.
        pid = f"{'pP'[i % 2]}{i:02d}"
        made.append(
            purchase(
                t,
                pid,
                account=("a", "b")[i % 3 == 0],
                status=statuses[i % 3],
                reference=f"pay-{i}" if i % 3 == 0 else "",
                create_ms=T0 + i // 2,
            )
        )
    for p in made:
        await ledger.create_purchase(p, [])
    await ledger.create_purchase(purchase(fresh(), "p00"), [])  # another tenant's
    newest_first = sorted(made, key=lambda p: (p.create_ms, p.purchase_id), reverse=True)

    async def read_all(account: str | None, status: str | None) -> list[PurchaseRecord]:
        seen: list[PurchaseRecord] = []
        before: tuple[int, str] | None = None
        while True:
            page = await ledger.list_purchases(t, account, status, 4, before)
            assert len(page) <= 4
            seen.extend(page)
            if len(page) < 4:
                return seen
            before = (page[-1].create_ms, page[-1].purchase_id)

    assert await read_all(None, None) == newest_first
    for account in ("a", "b"):
        for status in (None, *statuses):
            assert await read_all(account, status) == [
                p for p in newest_first
                if p.account == account and status in (None, p.status)
            ]  # fmt: skip
    assert await read_all(None, "pending") == [p for p in newest_first if p.status == "pending"]
    assert await ledger.list_purchases(t, "nobody", None, 10, None) == []
    # At T0: p00 then P01 ("P" < "p" in byte order, unlike in most locales).
    assert newest_first[-2:] == [made[0], made[1]]
    assert await ledger.list_purchases(t, None, None, 10, (T0, made[1].purchase_id)) == []
    assert await ledger.list_purchases(t, None, None, 10, (T0, made[0].purchase_id)) == [made[1]]


# --- webhooks: notices and deliveries ------------------------------------------------------
def notice(tenant: str, n: int) -> Notice:
    return Notice(f"balance:{tenant}-{n}", tenant, NoticeKind.BALANCE, T0 + n, f'{{"n":{n}}}')


def delivery(tenant: str, n: int, **kw: object) -> Delivery:
    fields: dict[str, object] = {
        "delivery_id": f"whd_{tenant}_{n}", "tenant": tenant, "endpoint_id": "whe_1",
        "event_id": f"evt_{n}", "event_type": "balance.low", "body": "{}",
        "status": "pending", "attempts": 0, "create_ms": T0 + n, "next_attempt_ms": 0,
    }  # fmt: skip
    fields.update(kw)
    return Delivery(**fields)  # type: ignore[arg-type]


async def _mine(ledger: Ledger, tenant: str) -> list[Notice]:
    return [n for n in await ledger.pending_notices(10_000) if n.tenant == tenant]


async def test_notices_are_written_with_their_batch_once_and_fanned_out_once(
    ledger: Ledger,
) -> None:
    t = fresh()
    batch = [ev(t, "a", 1, "grant", lot="L1", amount=100, balance=100, priority=50)]
    await ledger.append(batch, [], [notice(t, 1), notice(t, 2)])
    await ledger.append(batch, [], [notice(t, 1)])  # a replayed batch: no second notice
    assert await _mine(ledger, t) == [notice(t, 1), notice(t, 2)]  # in order
    # Two workers fanning out the same notices make each delivery once.
    made = [delivery(t, 1), delivery(t, 2)]
    await asyncio.gather(
        ledger.fan_out([notice(t, 1).notice_id, notice(t, 2).notice_id], made),
        ledger.fan_out([notice(t, 1).notice_id, notice(t, 2).notice_id], made),
    )
    assert await _mine(ledger, t) == []
    listed = await ledger.list_deliveries(t, None, None, 100, None)
    assert sorted(d.delivery_id for d in listed) == [made[0].delivery_id, made[1].delivery_id]
    assert listed == sorted(made, key=lambda d: (d.create_ms, d.delivery_id), reverse=True)


async def test_racing_claims_take_each_delivery_once(ledger: Ledger) -> None:
    t = fresh()
    await ledger.fan_out([], [delivery(t, n, next_attempt_ms=T0) for n in range(40)])
    await ledger.fan_out([], [delivery(t, 99, next_attempt_ms=T0 + 10**9)])  # not due yet
    claims = await asyncio.gather(
        *(ledger.claim_deliveries(T0 + 1000, 60_000, 7) for _ in range(8))
    )
    mine = [d for claim in claims for d in claim if d.tenant == t]
    assert len(mine) == 40 and len({d.delivery_id for d in mine}) == 40
    # Held: none is due again until its lease lapses.
    assert [d for d in await ledger.claim_deliveries(T0 + 2000, 60_000, 100) if d.tenant == t] == []
    lapsed = await ledger.claim_deliveries(T0 + 1000 + 60_000, 60_000, 1000)
    assert len([d for d in lapsed if d.tenant == t]) == 40
    # An attempt recorded lets go of the lease and sets the next one.
    first = mine[0]
    after = dataclasses.replace(
        first, attempts=1, next_attempt_ms=T0 + 500_000, last_attempt_ms=T0 + 1000,
        last_status_code=500, last_error="HTTP 500",
    )  # fmt: skip
    await ledger.record_attempt(after)
    stored = await ledger.get_delivery(t, first.delivery_id)
    assert stored == dataclasses.replace(after, lease_until_ms=0)
    assert await ledger.get_delivery("other", first.delivery_id) is None
    await ledger.record_attempt(dataclasses.replace(after, status="delivered"))
    due = await ledger.claim_deliveries(T0 + 10**10, 60_000, 1000)
    assert first.delivery_id not in {d.delivery_id for d in due}


async def test_deliveries_list_newest_first_with_filters(ledger: Ledger) -> None:
    t = fresh()
    await ledger.fan_out([], [
        delivery(t, n, endpoint_id=f"whe_{n % 2}", status="failed" if n % 3 == 0 else "pending")
        for n in range(12)
    ])  # fmt: skip
    pages: list[str] = []
    before = None
    while True:
        page = await ledger.list_deliveries(t, "whe_0", None, 4, before)
        pages += [d.delivery_id for d in page]
        if len(page) < 4:
            break
        before = (page[-1].create_ms, page[-1].delivery_id)
    assert pages == [f"whd_{t}_{n}" for n in (10, 8, 6, 4, 2, 0)]
    failed = await ledger.list_deliveries(t, None, "failed", 100, None)
    assert [d.delivery_id for d in failed] == [f"whd_{t}_{n}" for n in (9, 6, 3, 0)]
    again = await ledger.add_delivery(delivery(t, 0, body="another"))
    assert again.body == "{}"  # present: the stored one
    # Pruning removes what is done and old, never a pending one.
    while await ledger.prune_deliveries(T0 + 7, 2):
        pass
    left = await ledger.list_deliveries(t, None, None, 100, None)
    assert sorted(int(d.delivery_id.rsplit("_", 1)[1]) for d in left) == [1, 2, 4, 5, *range(7, 12)]


async def test_purchase_changes_write_their_notices(ledger: Ledger) -> None:
    t = fresh()
    pending = PurchaseRecord(
        purchase_id=f"pur-{t}", tenant=t, account="a", pack_id="p", status="pending",
        payment_reference="", pack_name="P", price_minor=100, currency="EUR", credits=10,
        bonus_credits=0, lot_ids=(), request_id="r1", fingerprint="f", trial=False,
        create_ms=T0, expire_ms=T0 + 1000,
    )  # fmt: skip
    await ledger.create_purchase(pending, [])
    assert await _mine(ledger, t) == []  # pending: nothing to report
    done = await ledger.complete_purchase(t, pending.purchase_id, "pay", ("L1",), T0 + 10, [])
    assert done is not None and done.status == "completed"
    await ledger.update_purchase_status(t, pending.purchase_id, "completed", "refunded", 10, 0)
    await ledger.update_purchase_status(t, pending.purchase_id, "completed", "refunded", 10, 0)
    late = dataclasses.replace(pending, purchase_id=f"late-{t}", request_id="r2")
    await ledger.create_purchase(late, [])
    await ledger.expire_purchases(T0 + 999, 10_000)  # not yet past its expiry
    assert [n.notice_id for n in await _mine(ledger, t)] == [
        f"purchase:{pending.purchase_id}:completed", f"purchase:{pending.purchase_id}:refunded",
    ]  # fmt: skip
    assert await ledger.expire_purchases(T0 + 1000, 10_000) >= 1
    assert await ledger.expire_purchases(T0 + 1000, 10_000) == 0  # each once
    notices = await _mine(ledger, t)
    assert notices[-1].notice_id == f"purchase:{late.purchase_id}:expired"
    assert notices[-1].kind == NoticeKind.PURCHASE
    stored = await ledger.get_purchase(t, late.purchase_id)
    assert stored is not None and stored.status == "expired"
    assert json_loads(notices[0].data)["status"] == "completed"
