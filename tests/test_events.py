"""The outbox: every balance change appends an event complete enough to rebuild balances."""

from __future__ import annotations

import json

import redis
from google.protobuf import duration_pb2

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.entries import ledger_records
from creditmeter.storage.layout import bucket_of, outbox_key
from creditmeter.storage.ledger.base import Event, RequestRecord
from tests.conftest import Tenant, rid


def rebuild(events: list[dict[str, str]]) -> dict[str, int]:
    """Remaining credit per lot, from the events alone."""
    lots: dict[str, int] = {}
    for e in events:
        if e["kind"] == "grant":
            lots[e["lot"]] = int(e["amount"])
        elif e["kind"] in ("consume", "expire", "reset") and e["lot"]:
            lots[e["lot"]] -= int(e["amount"])
    return {lot: rem for lot, rem in lots.items() if rem}


async def test_events_rebuild_every_balance(
    tenant: Tenant, clock: ManualClock, redis_client: redis.Redis
) -> None:
    accounts = ["a", "b", "c"]
    for i, account in enumerate(accounts):
        await tenant.admin.Grant(
            pb.GrantRequest(account_id=account, amount=50 + i, request_id=rid())
        )
        await tenant.admin.Grant(
            pb.GrantRequest(
                account_id=account,
                amount=20,
                valid_for=duration_pb2.Duration(seconds=30),
                source=pb.LOT_SOURCE_PROMOTION,
                request_id=rid(),
            )
        )
        await tenant.admin.Grant(
            pb.GrantRequest(account_id=account, amount=9, priority=1, request_id=rid())
        )
    for account in accounts:
        await tenant.meter.Consume(
            pb.ConsumeRequest(account_id=account, feature="text", quantity=15, request_id=rid())
        )
    clock.advance(30_000)
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="a", feature="voice", quantity=600, request_id=rid())
    )
    await tenant.admin.SetBalance(
        pb.SetBalanceRequest(account_id="b", amount=11, reset=True, request_id=rid())
    )

    for account in accounts:
        stream = outbox_key(bucket_of(tenant.name, account))
        events = [
            f
            for _, fields in redis_client.xrange(stream)
            for f in entry_events(fields)
            if f["tenant"] == tenant.name and f["account"] == account
        ]
        assert len({e["event_id"] for e in events}) == len(events)
        for e in events:
            assert e["request_id"] and e["txn"] and int(e["ts"]) > 0
        balance = await tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account))
        live = {lot.lot_id: lot.remaining for lot in balance.lots}
        rebuilt = rebuild(events)
        # "c" was never touched after its promotion expired: its expiry is not swept yet,
        # so the events still hold it while the read already leaves it out.
        if account == "c":
            promo = [e["lot"] for e in events if e.get("source") == "promotion"]
            assert rebuilt.pop(promo[0]) == 20 - 6  # 9 came from the priority-1 lot first
        assert rebuilt == live
        changes = [e for e in events if e["kind"] != "request"]
        assert int(changes[-1]["balance"]) == balance.balance or account == "c"
        # Every event has its place in the account's sequence, with no gaps.
        assert sorted(int(e["seq"]) for e in changes) == list(range(1, len(changes) + 1))
        # The durable copy of each idempotency record: one per mutating request.
        requests = [e for e in events if e["kind"] == "request"]
        assert len(requests) == len({e["request_id"] for e in events})
        for e in requests:
            assert len(e["fp"]) == 32 and json.loads(e["reply"])[0] in ("OK", "OK2")


async def test_the_flushers_decoding_is_the_watchers(
    tenant: Tenant, redis_client: redis.Redis
) -> None:
    """The flusher builds a consume's ledger rows straight from its entry (no event dicts);
    they are the rows the general decoding gives, for charges over one lot or several,
    with or without a request id, and on an unlimited account."""
    for amount, priority in ((5, 1), (100, 50)):
        await tenant.admin.Grant(
            pb.GrantRequest(account_id="dec", amount=amount, priority=priority,
                            request_id=rid())
        )  # fmt: skip
    await tenant.admin.SetAccountOptions(
        pb.SetAccountOptionsRequest(account_id="free", unlimited=True, request_id=rid())
    )
    for account, amount in (("dec", 3), ("dec", 4), ("dec", 1), ("free", 7)):
        await tenant.meter.Consume(
            pb.ConsumeRequest(account_id=account, feature="text", quantity=amount,
                              request_id=rid())
        )  # fmt: skip
    seen = 0
    for account in ("dec", "free"):
        for _id, fields in redis_client.xrange(outbox_key(bucket_of(tenant.name, account))):
            if fields.get("t") != tenant.name or "c" not in fields:
                continue
            general = entry_events(fields)
            found, request = ledger_records(fields)
            assert found == [Event.from_fields(e) for e in general if e["kind"] == "consume"]
            [record] = [e for e in general if e["kind"] == "request"]
            assert request == RequestRecord.from_fields(record)
            # Without a request id: no request record, the same events.
            anonymous = {k: v for k, v in fields.items() if k != "fp"}
            assert ledger_records(anonymous) == (found, None)
            seen += 1
    assert seen == 4


def test_a_grant_of_0_1_0_in_the_outbox_says_whether_it_rolls_over() -> None:
    """0.1.0 wrote no rolls_over: its grants referenced by a bare subscription id (a
    period's lots) roll over, others not."""
    for reference, rolls_over in (("sub_01ABC", True), ("sub_01ABC:bonus", False), ("", False)):
        entry = {
            "event_id": "txn_1:1", "tenant": "t", "account": "a", "kind": "grant",
            "txn": "txn_1", "seq": "1", "request_id": "", "ts": "5", "lot": "lot_1",
            "amount": "10", "priority": "50", "expires_at": "0", "source": "purchase",
            "reference": reference,
        }  # fmt: skip
        [event], request = ledger_records(entry)
        assert request is None and event.rolls_over is rolls_over
