"""One suite, every ledger backend: SQLite and PostgreSQL (a real local server)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from creditmeter.errors import Rejected
from creditmeter.storage.ledger import open_ledger
from creditmeter.storage.ledger.base import (
    Event,
    Ledger,
    Period,
    RequestRecord,
    StagedGrant,
    TxnQuery,
)

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
