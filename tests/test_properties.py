"""Property: against a simple model, the balance is grants minus spends minus expiries,
charges follow the burn-down order, and the balance is never negative."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditmeter.domain.clock import ManualClock
from creditmeter.domain.lots import PROMOTIONAL, LotSource
from creditmeter.domain.metering import Metering
from creditmeter.domain.rates import RateBook
from creditmeter.errors import InsufficientCredits
from creditmeter.storage.config_store.sqlite import SqliteConfigStore
from creditmeter.storage.redis_store import RedisStore


@dataclass
class ModelLot:
    lot_id: str
    remaining: int
    priority: int
    expires_at: int | None
    promotional: bool
    created: int

    def order(self) -> tuple[int, float, int, int, str]:
        expiry = float("inf") if self.expires_at is None else self.expires_at
        return (self.priority, expiry, 0 if self.promotional else 1, self.created, self.lot_id)


grants = st.tuples(
    st.just("grant"),
    st.integers(1, 1000),
    st.sampled_from([0, 10, 50, 50, 50]),
    st.one_of(st.none(), st.integers(1, 5_000)),
    st.sampled_from(list(LotSource)),
)
consumes = st.tuples(st.just("consume"), st.integers(1, 700))
advances = st.tuples(st.just("advance"), st.integers(1, 3_000))
resets = st.tuples(st.just("reset"), st.integers(0, 300))
operations = st.lists(st.one_of(grants, consumes, consumes, advances, resets), max_size=30)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("config") / "config.db"


async def run(redis_url: str, config_path: Path, ops: list[tuple[Any, ...]]) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    clock = ManualClock()
    metering = Metering(RedisStore(client), SqliteConfigStore(config_path), RateBook(), clock)
    tenant, account = "prop", uuid.uuid4().hex
    model: list[ModelLot] = []
    try:
        for op in ops:
            now = clock.now_ms()
            if op[0] == "grant":
                _, amount, priority, valid_for, source = op
                g = await metering.grant(
                    tenant,
                    account,
                    amount,
                    request_id=uuid.uuid4().hex,
                    priority=priority,
                    source=source,
                    valid_for_ms=valid_for,
                )
                model.append(
                    ModelLot(
                        g.lot.lot_id,
                        amount,
                        priority,
                        None if valid_for is None else now + valid_for,
                        source in PROMOTIONAL,
                        now,
                    )
                )
            elif op[0] == "consume":
                amount = op[1]
                live = sorted(
                    (lot for lot in model if lot.expires_at is None or lot.expires_at > now),
                    key=ModelLot.order,
                )
                available = sum(lot.remaining for lot in live)
                if available < amount:
                    with pytest.raises(InsufficientCredits):
                        await metering.consume(
                            tenant,
                            account,
                            "text",
                            request_id="r" + uuid.uuid4().hex,
                            amount=amount,
                        )
                    continue
                c = await metering.consume(
                    tenant, account, "text", request_id=uuid.uuid4().hex, amount=amount
                )
                expected = []
                need = amount
                for lot in live:
                    take = min(lot.remaining, need)
                    if take:
                        expected.append((lot.lot_id, take))
                        lot.remaining -= take
                        need -= take
                assert c.charges == expected
                assert c.balance == available - amount
            elif op[0] == "advance":
                clock.advance(op[1])
            elif op[0] == "reset":
                r = await metering.set_balance(
                    tenant, account, op[1], reset=True, request_id=uuid.uuid4().hex
                )
                live_before = sum(
                    lot.remaining for lot in model if lot.expires_at is None or lot.expires_at > now
                )
                assert r.removed == live_before
                model = []
                if op[1]:
                    assert r.lot is not None
                    model.append(ModelLot(r.lot.lot_id, op[1], 50, None, False, now))
            now = clock.now_ms()
            if not model and op[0] != "grant":
                continue
            view = await metering.get_balance(tenant, account)
            live = sorted(
                (lot for lot in model if lot.expires_at is None or lot.expires_at > now),
                key=ModelLot.order,
            )
            assert view.balance == sum(lot.remaining for lot in live) >= 0
            assert [(lot.lot_id, lot.remaining) for lot in view.lots] == [
                (lot.lot_id, lot.remaining) for lot in live if lot.remaining
            ]
    finally:
        await client.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_balance_matches_model(
    redis_url: str, config_path: Path, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run(redis_url, config_path, ops))


# --- the credit line ---------------------------------------------------------------------
line_ops = st.lists(
    st.one_of(
        st.tuples(st.just("grant"), st.integers(1, 300)),
        st.tuples(st.just("consume"), st.integers(1, 200)),
        st.tuples(st.just("consume"), st.integers(1, 200)),
        st.tuples(st.just("limit"), st.integers(0, 400)),
    ),
    max_size=30,
)


async def run_line(redis_url: str, config_path: Path, ops: list[tuple[str, int]]) -> None:
    """Credit in lots C, debt D, overdraft limit L: a charge of a is taken iff
    a <= C - D + L, from the lots first (the rest is debt); a grant repays debt first."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    metering = Metering(
        RedisStore(client), SqliteConfigStore(config_path), RateBook(), ManualClock()
    )
    tenant, account = "prop", uuid.uuid4().hex
    credit = debt = limit = 0
    try:
        await metering.set_account_options(
            tenant, account, request_id=uuid.uuid4().hex, unlimited=None, overdraft_limit=0
        )
        for op, n in ops:
            if op == "grant":
                g = await metering.grant(tenant, account, n, request_id=uuid.uuid4().hex)
                repaid = min(debt, n)
                debt, credit = debt - repaid, credit + n - repaid
                assert g.balance == max(0, credit - debt)
            elif op == "limit":
                await metering.set_account_options(
                    tenant, account, request_id=uuid.uuid4().hex, unlimited=None,
                    overdraft_limit=n,
                )  # fmt: skip
                limit = n
            elif n > credit - debt + limit:
                with pytest.raises(InsufficientCredits):
                    await metering.consume(
                        tenant, account, "text", request_id=uuid.uuid4().hex, amount=n
                    )
            else:
                c = await metering.consume(
                    tenant, account, "text", request_id=uuid.uuid4().hex, amount=n
                )
                taken = min(n, credit)
                credit, debt = credit - taken, debt + n - taken
                assert sum(amount for _, amount in c.charges) == taken
                assert c.balance == max(0, credit - debt)
            view = await metering.get_balance(tenant, account)
            assert (view.balance, view.debt, view.overdraft_limit) == (
                max(0, credit - debt), debt, limit
            )
            assert sum(lot.remaining for lot in view.lots) == credit
    finally:
        await client.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=line_ops)
def test_credit_line_matches_model(
    redis_url: str, config_path: Path, ops: list[tuple[str, int]]
) -> None:
    asyncio.run(run_line(redis_url, config_path, ops))
