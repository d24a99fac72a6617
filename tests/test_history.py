"""History and usage reports over gRPC, read from the ledger the flusher fills."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.transport.server import App
from tests.conftest import Tenant, rid
from tests.helpers import fails

DAY_MS = 86_400_000


async def caught_up(app: App) -> None:
    """Wait until the flusher has written everything to the ledger."""
    assert app.flusher is not None
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the flusher did not catch up")


async def history(t: Tenant, account: str, **kw: object) -> list[pb.Transaction]:
    out: list[pb.Transaction] = []
    token = ""
    while True:
        page = await t.read.ListTransactions(
            pb.ListTransactionsRequest(account_id=account, page_token=token, **kw)  # type: ignore[arg-type]
        )
        out.extend(page.transactions)
        token = page.next_page_token
        if not token:
            return out


@pytest.mark.flusher
async def test_history_reads_every_change_newest_first(app: App, tenant: Tenant) -> None:
    g = await tenant.admin.Grant(pb.GrantRequest(account_id="h", amount=10, request_id=rid()))
    bonus = await tenant.admin.Grant(
        pb.GrantRequest(account_id="h", amount=5, source=pb.LOT_SOURCE_BONUS, request_id=rid())
    )
    c1 = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="h", feature="text", quantity=7, request_id=rid())
    )
    c2 = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="h", feature="voice", quantity=61, request_id=rid())
    )
    reset = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="h", amount=3, reset=True, request_id=rid())
    )
    await caught_up(app)

    txns = await history(tenant, "h", page_size=2)
    kinds = [pb.TransactionKind.Name(t.kind) for t in txns]
    assert kinds == [
        "TRANSACTION_KIND_GRANT",
        "TRANSACTION_KIND_RESET",
        "TRANSACTION_KIND_CONSUME",
        "TRANSACTION_KIND_CONSUME",
        "TRANSACTION_KIND_GRANT",
        "TRANSACTION_KIND_GRANT",
    ]
    assert txns[0].lots[0].lot_id == reset.lot.lot_id and txns[0].balance == 3
    assert txns[1].amount == 6 and txns[1].balance == 0  # what the reset removed
    # The first charge spanned both lots: one transaction with its breakdown.
    first_charge = txns[3]
    assert first_charge.transaction_id == c1.transaction_id
    assert [(x.lot_id, x.amount) for x in first_charge.lots] == [
        (bonus.lot.lot_id, 5),
        (g.lot.lot_id, 2),
    ]
    assert (first_charge.feature, first_charge.units, first_charge.balance) == ("text", 7, 8)
    assert txns[2].transaction_id == c2.transaction_id and txns[2].units == 2
    assert all(t.request_id for t in txns)

    voice = await history(tenant, "h", filter=pb.TransactionFilter(features=["voice"]))
    assert [t.transaction_id for t in voice] == [c2.transaction_id]
    grants = await history(
        tenant, "h", filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_GRANT])
    )
    assert len(grants) == 3


@pytest.mark.flusher
async def test_page_tokens_are_tied_to_their_query(app: App, tenant: Tenant) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id="p", amount=100, request_id=rid()))
    for _ in range(5):
        await tenant.meter.Consume(
            pb.ConsumeRequest(account_id="p", feature="text", request_id=rid())
        )
    await caught_up(app)
    page = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(account_id="p", page_size=2)
    )
    assert len(page.transactions) == 2 and page.next_page_token
    f = await fails(
        tenant.read.ListTransactions(
            pb.ListTransactionsRequest(
                account_id="other", page_size=2, page_token=page.next_page_token
            )
        )
    )
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in f.violations
    everything = await history(tenant, "p", page_size=0)
    assert len(everything) == 6  # 0 means the default page size


@pytest.mark.flusher
async def test_usage_report_per_day_and_month(app: App, tenant: Tenant, clock: ManualClock) -> None:
    start = clock.now_ms()
    await tenant.admin.Grant(pb.GrantRequest(account_id="r", amount=1000, request_id=rid()))
    await tenant.admin.Grant(pb.GrantRequest(account_id="s", amount=1000, request_id=rid()))
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="r", feature="text", quantity=3, request_id=rid())
    )
    clock.advance(DAY_MS)
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="r", feature="voice", quantity=120, request_id=rid())
    )
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="s", feature="text", quantity=4, request_id=rid())
    )
    await caught_up(app)
    span = {
        "start_time": timestamp_pb2.Timestamp(seconds=start // 1000 - 1),
        "end_time": timestamp_pb2.Timestamp(seconds=clock.now_ms() // 1000 + 1),
    }
    by_day = await tenant.read.GetUsageReport(pb.GetUsageReportRequest(account_id="r", **span))
    assert [(r.feature, r.credits, r.units) for r in by_day.rows] == [
        ("text", 3, 3),
        ("voice", 2, 2),
    ]
    assert by_day.rows[0].period != by_day.rows[1].period
    tenant_wide = await tenant.read.GetUsageReport(
        pb.GetUsageReportRequest(group_by=pb.USAGE_PERIOD_MONTH, feature="text", **span)
    )
    assert sum(r.credits for r in tenant_wide.rows) == 7
    assert all(len(r.period) == 7 for r in tenant_wide.rows)


async def test_history_of_an_unknown_account_is_not_found(
    tenant: Tenant, clock: ManualClock
) -> None:
    """As GetBalance: an account with no state anywhere is NOT_FOUND (it once answered an
    empty page); one that exists in Redis but has nothing in the ledger yet (no flusher
    runs here) answers an empty page."""
    now_s = clock.now_ms() // 1000
    span = {
        "start_time": timestamp_pb2.Timestamp(seconds=now_s - 86_400),
        "end_time": timestamp_pb2.Timestamp(seconds=now_s + 86_400),
    }
    reads = {
        "GetBalance": lambda a: tenant.read.GetBalance(pb.GetBalanceRequest(account_id=a)),
        "ListTransactions": lambda a: tenant.read.ListTransactions(
            pb.ListTransactionsRequest(account_id=a)
        ),
        "ListTransactions filtered": lambda a: tenant.read.ListTransactions(
            pb.ListTransactionsRequest(
                account_id=a, filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_CONSUME])
            )
        ),
        "GetUsageReport": lambda a: tenant.read.GetUsageReport(
            pb.GetUsageReportRequest(account_id=a, **span)
        ),
    }
    for name, read in reads.items():
        f = await fails(read("ghost"))
        assert (f.code, f.reason, f.metadata) == (
            grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", {"account_id": "ghost"}
        ), name  # fmt: skip

    await tenant.admin.Grant(pb.GrantRequest(account_id="fresh", amount=5, request_id=rid()))
    page = await tenant.read.ListTransactions(pb.ListTransactionsRequest(account_id="fresh"))
    assert (list(page.transactions), page.next_page_token) == ([], "")
    report = await tenant.read.GetUsageReport(pb.GetUsageReportRequest(account_id="fresh", **span))
    assert list(report.rows) == []
    # The whole tenant is never unknown.
    everyone = await tenant.read.GetUsageReport(pb.GetUsageReportRequest(**span))
    assert list(everyone.rows) == []


@pytest.mark.flusher
async def test_history_of_an_account_lost_from_redis_is_still_read(
    app: App, tenant: Tenant, redis_client: Any
) -> None:
    """After a Redis loss (before a rebuild), the ledger still knows the account: its
    history answers, and a filter that matches nothing answers an empty page."""
    from creditmeter.storage.layout import AccountKeys

    g = await tenant.admin.Grant(pb.GrantRequest(account_id="lost", amount=5, request_id=rid()))
    await caught_up(app)
    redis_client.delete(AccountKeys(tenant.name, "lost").account_key)
    f = await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id="lost")))
    assert f.reason == "ACCOUNT_NOT_FOUND"  # gone from Redis
    txns = await history(tenant, "lost")
    assert [(t.kind, t.amount) for t in txns] == [(pb.TRANSACTION_KIND_GRANT, 5)]
    assert txns[0].lots[0].lot_id == g.lot.lot_id
    consumes = await history(
        tenant, "lost", filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_CONSUME])
    )
    assert consumes == []


@pytest.mark.flusher
async def test_ledger_status_reports_lag(app: App, tenant: Tenant) -> None:
    await tenant.admin.Grant(pb.GrantRequest(account_id="l", amount=10, request_id=rid()))
    await caught_up(app)
    status = await tenant.admin.GetLedgerStatus(pb.GetLedgerStatusRequest())
    assert status.events_flushed >= 1 and status.accepting_changes
    assert status.backlog_cap > 0 and status.flush_lag.ToMilliseconds() < 5_000


@pytest.mark.flusher
async def test_backlog_counts_only_unflushed_entries_while_flushed_ones_are_kept(
    app: App, tenant: Tenant, redis_client: Any
) -> None:
    """The outboxes keep flushed entries for balance watchers: the backlog (and so the
    backpressure gate) counts what is not in the ledger yet, never what is kept."""
    from creditmeter.storage.layout import bucket_of, outbox_key

    await tenant.admin.Grant(pb.GrantRequest(account_id="kept", amount=100, request_id=rid()))
    for _ in range(30):
        await tenant.meter.Consume(
            pb.ConsumeRequest(account_id="kept", feature="text", request_id=rid())
        )
    assert app.flusher is not None
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            break
        await asyncio.sleep(0.02)
    assert await app.flusher.backlog() == 0
    assert redis_client.xlen(outbox_key(bucket_of(tenant.name, "kept"))) >= 31  # still kept
    for _ in range(100):  # the server's monitor reads the same figure every 0.2 s
        status = await tenant.admin.GetLedgerStatus(pb.GetLedgerStatusRequest())
        if status.backlog == 0:
            break
        await asyncio.sleep(0.05)
    assert status.backlog == 0 and status.events_flushed >= 31
