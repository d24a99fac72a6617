"""Call sessions: reservations, per-increment charging over the whole call, idempotent
steps, final-unit quotas, and the server closing sessions whose call server went silent."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.model import TxnQuery
from creditmeter.domain.recovery import Recovery
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.layout import bucket_of, outbox_key
from creditmeter.storage.redis_store import RedisStore
from creditmeter.transport.server import App
from tests.conftest import Tenant, another_server, rid
from tests.helpers import fails

#: Every test here runs on a single Redis and on a Redis Cluster (tests/conftest.py).
ON_CLUSTER = True

MINUTE = 60


async def grant(t: Tenant, account: str, amount: int) -> None:
    await t.admin.Grant(pb.GrantRequest(account_id=account, amount=amount, request_id=rid()))


async def balance(t: Tenant, account: str) -> pb.GetBalanceResponse:
    response: pb.GetBalanceResponse = await t.read.GetBalance(
        pb.GetBalanceRequest(account_id=account)
    )
    return response


async def start(t: Tenant, account: str, session: str, **kw: Any) -> pb.StartSessionResponse:
    kw.setdefault("feature", "voice")
    response: pb.StartSessionResponse = await t.meter.StartSession(
        pb.StartSessionRequest(account_id=account, session_id=session, **kw)
    )
    return response


async def update(
    t: Tenant, account: str, session: str, seq: int, used: int, **kw: Any
) -> pb.UpdateSessionResponse:
    response: pb.UpdateSessionResponse = await t.meter.UpdateSession(
        pb.UpdateSessionRequest(
            account_id=account, session_id=session, sequence=seq, used_seconds=used, **kw
        )
    )
    return response


async def end(t: Tenant, account: str, session: str, seq: int, used: int) -> pb.EndSessionResponse:
    response: pb.EndSessionResponse = await t.meter.EndSession(
        pb.EndSessionRequest(
            account_id=account, session_id=session, sequence=seq, used_seconds=used
        )
    )
    return response


# --- charging over the whole call ----------------------------------------------------------
@pytest.mark.parametrize(
    "reports",
    [
        [185],  # everything at the end
        [60, 60, 60, 5],  # on each increment
        [59, 2, 59, 65],  # straddling increments
        [1] * 185,  # every second
        [0, 120, 0, 65],  # empty reports
        [184, 1],
    ],
    ids=["end-only", "per-minute", "straddling", "per-second", "empty-reports", "late-second"],
)
async def test_185_seconds_cost_four_increments_whatever_the_reports(
    tenant: Tenant, reports: list[int]
) -> None:
    await grant(tenant, "caller", 100)
    started = await start(tenant, "caller", "call-1")
    assert started.granted_seconds == 3 * MINUTE and not started.final_unit
    assert started.session.reserved_amount == 3
    assert started.balance == 97  # 3 held

    *updates, last = reports
    total_charged = 0
    for seq, used in enumerate(updates, start=1):
        reply = await update(tenant, "caller", "call-1", seq, used)
        total_charged += reply.charged_amount
        # A repeat of the step returns the first answer and changes nothing.
        again = await update(tenant, "caller", "call-1", seq, used)
        assert again == reply
    done = await end(tenant, "caller", "call-1", len(reports), last)
    total_charged += done.charged_amount
    assert await end(tenant, "caller", "call-1", len(reports), last) == done

    assert total_charged == 4
    assert done.session.charged_units == 4 and done.session.charged_amount == 4
    assert done.session.used_seconds == 185
    assert done.session.state == pb.SESSION_STATE_ENDED
    assert done.session.reserved_amount == 0
    view = await balance(tenant, "caller")
    assert (view.balance, view.reserved) == (96, 0)
    usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="caller"))
    voice = {f.feature: (f.credits, f.units) for f in usage.features}["voice"]
    assert voice == (4, 4)


async def test_rates_and_increments_are_fixed_at_start(tenant: Tenant) -> None:
    """A price change during a call does not reprice it; a 30 s increment rounds per 30 s."""
    await tenant.admin.SetRate(
        pb.SetRateRequest(
            rate=pb.Rate(feature="video", credits_per_unit=5, billing_increment={"seconds": 30}),
            request_id=rid(),
        )
    )
    await grant(tenant, "v", 1000)
    started = await start(tenant, "v", "vid", feature="video", requested_seconds=70)
    assert started.granted_seconds == 90  # 70 s rounds up to three 30 s increments
    assert started.session.reserved_amount == 15
    await tenant.admin.SetRate(
        pb.SetRateRequest(rate=pb.Rate(feature="video", credits_per_unit=50), request_id=rid())
    )
    done = await end(tenant, "v", "vid", 1, 61)  # 61 s = three 30 s increments
    assert done.charged_amount == 15
    assert done.released_amount == 0
    assert (await balance(tenant, "v")).balance == 985


# --- reservations -----------------------------------------------------------------------
async def test_reserved_credit_is_not_spendable_by_other_consumption(tenant: Tenant) -> None:
    await grant(tenant, "r", 5)
    started = await start(tenant, "r", "s1")
    assert started.session.reserved_amount == 3 and started.balance == 2
    view = await balance(tenant, "r")
    assert (view.balance, view.reserved, sum(lot.remaining for lot in view.lots)) == (2, 3, 5)

    failed = await fails(
        tenant.meter.Consume(
            pb.ConsumeRequest(account_id="r", feature="text", quantity=3, request_id=rid())
        )
    )
    assert failed.code == grpc.StatusCode.FAILED_PRECONDITION
    assert failed.reason == "INSUFFICIENT_CREDITS"
    assert failed.metadata == {"balance": "2", "required": "3"}
    # A second session can only hold what is not held already.
    second = await start(tenant, "r", "s2")
    assert second.session.reserved_amount == 2 and second.final_unit
    assert second.granted_seconds == 2 * MINUTE
    refused = await fails(start(tenant, "r", "s3"))
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.reason == "INSUFFICIENT_CREDITS"
    assert refused.metadata == {"balance": "0", "required": "1"}

    ended = await end(tenant, "r", "s1", 1, 30)  # one increment of the three held
    assert (ended.charged_amount, ended.released_amount) == (1, 2)
    assert ended.balance == 2  # 4 left, 2 still held by s2


async def test_every_rpc_reports_the_spendable_balance_while_credit_is_held(
    tenant: Tenant,
) -> None:
    """Held credit is not spendable, so no figure counts it: GetUsage.remaining and the
    answers of Consume, ConsumeBatch, Grant, SetBalance, VoidGrant and the session steps
    are all GetBalance.balance (once, GetUsage said 757 while GetBalance said 755)."""
    await grant(tenant, "n", 760)
    started = await start(tenant, "n", "call", requested_seconds=2 * MINUTE)
    assert (started.session.reserved_amount, started.balance) == (2, 758)

    async def figures() -> tuple[int, int, int]:
        view = await balance(tenant, "n")
        usage = await tenant.read.GetUsage(pb.GetUsageRequest(account_id="n"))
        return view.balance, usage.remaining, view.reserved

    consumed = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="n", feature="text", quantity=3, request_id=rid())
    )
    assert consumed.balance == 755
    assert await figures() == (755, 755, 2)
    batch = await tenant.meter.ConsumeBatch(
        pb.ConsumeBatchRequest(
            items=[pb.ConsumeRequest(account_id="n", feature="text", request_id=rid())]
        )
    )
    assert batch.results[0].response.balance == 754
    granted = await tenant.admin.Grant(
        pb.GrantRequest(account_id="n", amount=10, request_id=rid())
    )
    assert granted.balance == 764
    assert await figures() == (764, 764, 2)
    added = await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="n", amount=5, request_id=rid())
    )
    assert added.balance == 769
    assert await figures() == (769, 769, 2)
    voided = await tenant.admin.VoidGrant(
        pb.VoidGrantRequest(
            account_id="n", lot_id=granted.lot.lot_id, reason="test", request_id=rid()
        )
    )
    assert (voided.voided, voided.balance) == (10, 759)
    assert await figures() == (759, 759, 2)
    # One increment charged, the default quota of three held again.
    stepped = await update(tenant, "n", "call", 1, MINUTE)
    assert (stepped.charged_amount, stepped.session.reserved_amount) == (1, 3)
    assert stepped.balance == 757
    assert await figures() == (757, 757, 3)
    done = await end(tenant, "n", "call", 2, 0)
    assert (done.charged_amount, done.released_amount, done.balance) == (0, 3, 760)
    assert await figures() == (760, 760, 0)


async def test_partial_quota_sets_the_final_unit_and_the_call_can_use_it(tenant: Tenant) -> None:
    await grant(tenant, "p", 4)
    started = await start(tenant, "p", "call")
    assert started.granted_seconds == 180 and not started.final_unit  # 3 of 4 held
    step = await update(tenant, "p", "call", 1, 150)  # 3 increments due, 30 s of them unused
    assert step.charged_amount == 3
    # One credit is left: one more increment, plus the 30 s already paid.
    assert step.final_unit and step.granted_seconds == 30 + 60
    last = await update(tenant, "p", "call", 2, 90)  # 240 s: exactly 4 increments
    assert last.charged_amount == 1 and last.final_unit and last.granted_seconds == 0
    done = await end(tenant, "p", "call", 3, 0)
    assert done.charged_amount == 0 and done.session.charged_units == 4
    assert done.session.uncollected_amount == 0
    assert (await balance(tenant, "p")).balance == 0


async def test_usage_past_the_quota_is_charged_from_free_credit_only(tenant: Tenant) -> None:
    """A call server that overruns its grant is charged from credit nobody holds; what it
    cannot pay is reported as uncollected, never taken from another session's hold."""
    await grant(tenant, "o", 5)
    await start(tenant, "o", "a", requested_seconds=60)  # holds 1
    await start(tenant, "o", "b", requested_seconds=240)  # holds 4
    done = await end(tenant, "o", "a", 1, 300)  # 5 increments due, only its own 1 is free
    assert done.charged_amount == 1 and done.session.uncollected_amount == 4
    view = await balance(tenant, "o")
    assert (view.balance, view.reserved) == (0, 4)


async def test_unlimited_accounts_are_always_granted_and_charged(tenant: Tenant) -> None:
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="vip", unlimited=True, request_id=rid())
    )
    started = await start(tenant, "vip", "call", requested_seconds=600)
    assert started.granted_seconds == 600 and not started.final_unit and started.balance == -1
    done = await end(tenant, "vip", "call", 1, 61)
    assert done.charged_amount == 2 and done.balance == -1


# --- errors -------------------------------------------------------------------------------
async def test_step_errors(tenant: Tenant) -> None:
    await grant(tenant, "e", 100)
    missing = await fails(update(tenant, "e", "nope", 1, 10))
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")

    await start(tenant, "e", "c")
    assert await start(tenant, "e", "c") is not None  # same parameters: a replay
    exists = await fails(start(tenant, "e", "c", feature="video"))
    assert (exists.code, exists.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS")

    skipped = await fails(update(tenant, "e", "c", 2, 10))
    assert skipped.code == grpc.StatusCode.FAILED_PRECONDITION
    assert skipped.reason == "SESSION_OUT_OF_SEQUENCE"
    assert skipped.metadata["expected"] == "1"

    await update(tenant, "e", "c", 1, 10)
    reused = await fails(update(tenant, "e", "c", 1, 11))  # same sequence, other usage
    assert reused.reason == "IDEMPOTENCY_KEY_REUSED"
    await end(tenant, "e", "c", 2, 5)
    closed = await fails(update(tenant, "e", "c", 3, 5))
    assert (closed.code, closed.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_CLOSED")
    assert closed.metadata["state"] == "ended"
    assert (await balance(tenant, "e")).balance == 99


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"feature": "text"}, "feature"),  # a count feature
        ({"feature": "fax"}, "feature"),  # unknown
        ({"session_id": ""}, "session_id"),
        ({"session_id": "a|b"}, "session_id"),
        ({"session_id": "x" * 129}, "session_id"),
        ({"account_id": "bad account"}, "account_id"),
        ({"requested_seconds": 0}, "requested_seconds"),
        ({"requested_seconds": 86_401}, "requested_seconds"),
        ({"timeout_policy": 99}, "timeout_policy"),
    ],
)
async def test_invalid_start_changes_nothing(
    tenant: Tenant, request_kw: dict[str, Any], field: str
) -> None:
    await grant(tenant, "iv", 10)
    kw: dict[str, Any] = {"account_id": "iv", "session_id": "s", "feature": "voice"}
    kw.update(request_kw)
    failed = await fails(tenant.meter.StartSession(pb.StartSessionRequest(**kw)))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT and failed.reason == "INVALID_REQUEST"
    assert field in failed.violations
    view = await balance(tenant, "iv")
    assert (view.balance, view.reserved) == (10, 0)


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"sequence": 0}, "sequence"),
        ({"sequence": -1}, "sequence"),
        ({"used_seconds": -1}, "used_seconds"),
        ({"used_seconds": 86_401}, "used_seconds"),
        ({"requested_seconds": 0}, "requested_seconds"),
    ],
)
async def test_invalid_update_changes_nothing(
    tenant: Tenant, request_kw: dict[str, Any], field: str
) -> None:
    await grant(tenant, "iu", 10)
    await start(tenant, "iu", "s")
    kw: dict[str, Any] = {"account_id": "iu", "session_id": "s", "sequence": 1, "used_seconds": 5}
    kw.update(request_kw)
    failed = await fails(tenant.meter.UpdateSession(pb.UpdateSessionRequest(**kw)))
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT and field in failed.violations
    session = (
        await tenant.read.GetSession(pb.GetSessionRequest(account_id="iu", session_id="s"))
    ).session
    assert (session.sequence, session.used_seconds, session.reserved_amount) == (0, 0, 3)


async def test_read_key_cannot_meter_sessions(tenant: Tenant) -> None:
    await grant(tenant, "rk", 10)
    denied = await fails(
        tenant.read.StartSession(
            pb.StartSessionRequest(account_id="rk", session_id="s", feature="voice")
        )
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED


# --- concurrency ------------------------------------------------------------------------
async def test_concurrent_sessions_and_a_message_flood_never_overspend(tenant: Tenant) -> None:
    """Balance of 10 increments; 3 calls that each use exactly what they are granted and end
    when told the quota is final, and 300 messages at once: together they never spend more
    than the balance, and every call hears of its last quota before it runs out."""
    await grant(tenant, "busy", 10)

    async def call(name: str) -> pb.Session:
        reply: Any = await start(tenant, "busy", name, requested_seconds=60)
        seq = 0
        while True:
            seq += 1
            use = reply.granted_seconds  # the call runs exactly as long as it may
            if reply.final_unit or use == 0:
                done = await end(tenant, "busy", name, seq, use)
                return done.session
            reply = await update(tenant, "busy", name, seq, use, requested_seconds=60)

    async def message() -> bool:
        try:
            await tenant.meter.Consume(
                pb.ConsumeRequest(account_id="busy", feature="text", request_id=rid())
            )
            return True
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            return False

    calls = [asyncio.create_task(call(f"c{i}")) for i in range(3)]
    messages = await asyncio.gather(*(message() for _ in range(300)))
    sessions = await asyncio.gather(*calls, return_exceptions=True)
    started = [s for s in sessions if isinstance(s, pb.Session)]
    for s in sessions:
        if not isinstance(s, pb.Session):  # only a refusal to start: nothing left to hold
            assert isinstance(s, grpc.aio.AioRpcError), s
            assert s.code() == grpc.StatusCode.FAILED_PRECONDITION

    spent = sum(messages) + sum(s.charged_amount for s in started)
    view = await balance(tenant, "busy")
    assert view.balance >= 0 and view.reserved == 0
    assert spent == 10 - view.balance
    assert spent <= 10
    for s in started:
        # Every call stopped within what it was granted: the final quota came in time.
        assert s.uncollected_amount == 0
        assert s.used_seconds == s.charged_units * MINUTE
        assert s.state == pb.SESSION_STATE_ENDED


# --- silent call servers -------------------------------------------------------------------
async def test_silent_session_is_closed_once_by_racing_servers(
    app: App,
    tenant: Tenant,
    clock: ManualClock,
    redis_client: Any,
    tmp_path: Path,
) -> None:
    """Server processes' closers race for sessions past their validity and grace (this
    test's two, and the app's own background closer): each session is closed once, charged
    as its policy says, and the rest of its hold released."""
    await grant(tenant, "quiet", 20)
    await start(tenant, "quiet", "gone", requested_seconds=120)  # holds 2
    # 1 increment charged; 30 s of it left plus a new quota of 2: valid for 150 s.
    await update(tenant, "quiet", "gone", 1, 30, requested_seconds=120)
    # RELEASE policy, valid for 180 s.
    await start(tenant, "quiet", "other", requested_seconds=180, timeout_policy=2)

    async with another_server(app, tmp_path / "second") as second:
        assert app.sessions is not None and second.sessions is not None
        clock.advance(179_000)  # "gone" is silent past 150 s, but its 30 s grace is not over
        await app.sessions.close_due()
        for name in ("gone", "other"):
            session = await tenant.read.GetSession(
                pb.GetSessionRequest(account_id="quiet", session_id=name)
            )
            assert session.session.state == pb.SESSION_STATE_OPEN
        clock.advance(32_000)  # both past validity and grace
        await asyncio.gather(
            *(s.close_due() for s in (app.sessions, second.sessions, app.sessions))
        )

    gone = (
        await tenant.read.GetSession(pb.GetSessionRequest(account_id="quiet", session_id="gone"))
    ).session
    assert gone.state == pb.SESSION_STATE_TIMED_OUT
    assert gone.charged_units == 3 and gone.charged_amount == 3  # 1 used + 2 granted
    assert gone.reserved_amount == 0
    other = (
        await tenant.read.GetSession(pb.GetSessionRequest(account_id="quiet", session_id="other"))
    ).session
    assert other.state == pb.SESSION_STATE_TIMED_OUT and other.charged_amount == 0
    view = await balance(tenant, "quiet")
    assert (view.balance, view.reserved) == (17, 0)
    # Exactly one close charged "gone": one transaction of session events in the outbox.
    closes = {
        f["txn"]
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "quiet")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["request_id"] == "gone#timeout"
    }
    assert len(closes) == 1
    late = await fails(update(tenant, "quiet", "gone", 2, 10))
    assert late.reason == "SESSION_CLOSED" and late.metadata["state"] == "timed_out"


async def test_the_servers_closer_runs_on_its_own(
    app: App, tenant: Tenant, clock: ManualClock
) -> None:
    await grant(tenant, "auto", 10)
    await start(tenant, "auto", "s", requested_seconds=60)
    clock.advance(60_000 + 30_001)
    for _ in range(100):  # the closer runs every second
        session = (
            await tenant.read.GetSession(pb.GetSessionRequest(account_id="auto", session_id="s"))
        ).session
        if session.state != pb.SESSION_STATE_OPEN:
            break
        await asyncio.sleep(0.05)
    assert session.state == pb.SESSION_STATE_TIMED_OUT and session.charged_amount == 1
    assert (await balance(tenant, "auto")).balance == 9


# --- the ledger -----------------------------------------------------------------------------
@pytest.mark.flusher
async def test_session_charges_reach_the_ledger_one_transaction_per_step(
    app: App, tenant: Tenant
) -> None:
    await grant(tenant, "led", 100)
    await start(tenant, "led", "call")
    await update(tenant, "led", "call", 1, 61)  # 2 increments
    await update(tenant, "led", "call", 2, 0)  # nothing due: no transaction
    await end(tenant, "led", "call", 3, 60)  # 121 s: 3 increments, 1 more
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="led", feature="text", request_id=rid())
    )
    assert app.flusher is not None and app.ledger is not None
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            break
        await asyncio.sleep(0.02)

    page = await tenant.read.ListTransactions(
        pb.ListTransactionsRequest(
            account_id="led", filter=pb.TransactionFilter(kinds=[pb.TRANSACTION_KIND_SESSION])
        )
    )
    steps = [(t.amount, t.units, t.request_id) for t in page.transactions]
    assert steps == [(1, 1, "call#3"), (2, 2, "call#1")]  # newest first
    now_s = app.settings.clock.now_ms() // 1000
    report = await tenant.read.GetUsageReport(
        pb.GetUsageReportRequest(
            account_id="led",
            start_time={"seconds": now_s - 86_400},
            end_time={"seconds": now_s + 86_400},
        )
    )
    assert {(r.feature, r.credits, r.units) for r in report.rows} == {
        ("voice", 3, 3),
        ("text", 1, 1),
    }
    assert app.metering is not None
    checked, drifts = await Recovery(app.ledger, RedisStore(app.metering.store.client)).audit(
        tenant.name, 1.0
    )
    assert checked == 1 and drifts == []


@pytest.mark.flusher
async def test_holds_go_to_watchers_but_never_to_the_ledger(
    app: App, tenant: Tenant, redis_client: Any
) -> None:
    """A step that changes its hold appends one hold or release entry for balance watchers;
    the flusher acknowledges it without writing it (holds are hot state) and it takes no
    place in the account's sequence, so the audit still agrees."""
    await grant(tenant, "hw", 10)
    await start(tenant, "hw", "call")  # holds 3
    await update(tenant, "hw", "call", 1, MINUTE)  # 1 charged, 3 held again: no change
    await update(tenant, "hw", "call", 2, 0, requested_seconds=MINUTE)  # holds 1: 2 let go
    await end(tenant, "hw", "call", 3, 0)  # lets the last 1 go
    entries = [
        f
        for _, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, "hw")))
        for f in entry_events(fields)
        if f["tenant"] == tenant.name and f["account"] == "hw"
    ]
    holds = [
        (f["kind"], f["amount"], f["reserved"])
        for f in entries
        if f["kind"] in ("hold", "release")
    ]
    assert holds == [("hold", "3", "3"), ("release", "2", "1"), ("release", "1", "0")]
    assert app.flusher is not None and app.ledger is not None
    for _ in range(200):
        if await app.flusher.backlog() == 0:
            break
        await asyncio.sleep(0.02)
    assert await app.flusher.backlog() == 0
    txns = await app.ledger.transactions(tenant.name, "hw", TxnQuery(), 100, None)
    assert {t.kind for t in txns} == {"grant", "session"}
    assert app.metering is not None
    checked, drifts = await Recovery(app.ledger, RedisStore(app.metering.store.client)).audit(
        tenant.name, 1.0
    )
    assert checked == 1 and drifts == []


async def test_open_sessions_are_a_metric(app: App, tenant: Tenant) -> None:
    from prometheus_client import REGISTRY

    assert app.sessions is not None and app.metering is not None
    await grant(tenant, "gauge", 10)
    await app.sessions.close_due()
    before = REGISTRY.get_sample_value("creditmeter_sessions_open")
    await start(tenant, "gauge", "g1")
    await start(tenant, "gauge", "g2")
    await app.sessions.close_due()
    assert REGISTRY.get_sample_value("creditmeter_sessions_open") == before + 2
    assert await app.metering.store.open_sessions() == before + 2
    await end(tenant, "gauge", "g1", 1, 10)
    await app.sessions.close_due()
    assert REGISTRY.get_sample_value("creditmeter_sessions_open") == before + 1
