"""Two servers sharing one configuration: each App has its own data directory and port, both
share one Redis and one PostgreSQL ledger (whose database holds the config store). A key
created in the store, a key revoked through one server's store, a rate set through one
server's API: the other server acts on it within CONFIG_PROPAGATION_S, measured."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import CONFIG_RELOAD_INTERVAL_S
from creditmeter.domain import keys as api_keys
from creditmeter.storage.config_store import open_config_store
from creditmeter.transport.server import App, Settings
from tests.conftest import Caller, rid, tenant_keys
from tests.test_auth import key_id

#: What the README promises: a change reaches every server within a second.
CONFIG_PROPAGATION_S = 1.0
#: On top of it, for the last check's own round trip (a gRPC call, on a machine shared
#: with both servers, Redis and PostgreSQL) and the sleep between checks.
MARGIN_S = 0.25
POLL_S = 0.02


@pytest.fixture
async def servers(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[list[App]]:
    apps = [
        App(
            Settings(
                listen="127.0.0.1:0",
                data_dir=tmp_path / f"server-{n}",
                redis_url=redis_url,
                ledger_url=fresh_postgres_url,
                flusher=False,
                shutdown_grace_s=1.0,
            )
        )
        for n in range(2)
    ]
    started: list[App] = []
    try:
        for app in apps:
            await app.start()
            started.append(app)
        yield apps
    finally:
        for app in started:
            await app.stop()
            # App.stop does not close the config store (yet): its pool and thread.
            assert app.live is not None
            app.live.store.close()


@pytest.fixture
async def connect(servers: list[App]) -> AsyncIterator[Callable[[str], list[Caller]]]:
    """For a key: a caller on each server, each on a channel of its own."""
    channels: list[grpc.aio.Channel] = []

    def callers(key: str) -> list[Caller]:
        made = [grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") for a in servers]
        channels.extend(made)
        return [Caller(pb_grpc.CreditsStub(c), key) for c in made]

    yield callers
    for channel in channels:
        await channel.close()


async def accepted(caller: Caller) -> bool:
    """Whether the server takes the key (ListRates needs any role, and never fails else)."""
    try:
        await caller.ListRates(pb.ListRatesRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False
    return True


async def refused(caller: Caller) -> bool:
    return not await accepted(caller)


async def within_deadline(what: str, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll `check` from now until it holds; the seconds it took. Fails once
    CONFIG_PROPAGATION_S + MARGIN_S have passed without it."""
    start = time.monotonic()
    while True:
        if await check():
            took = time.monotonic() - start
            assert took <= CONFIG_PROPAGATION_S + MARGIN_S, f"{what}: {took:.3f} s"
            return took
        if time.monotonic() - start > CONFIG_PROPAGATION_S + MARGIN_S:
            raise AssertionError(f"{what}: not within {CONFIG_PROPAGATION_S} s + {MARGIN_S} s")
        await asyncio.sleep(POLL_S)


def test_the_deadline_leaves_room_for_the_reload_interval() -> None:
    # A change lands just after a poll: the next poll, one interval later, reloads.
    assert CONFIG_RELOAD_INTERVAL_S * 2 <= CONFIG_PROPAGATION_S


async def test_keys_created_and_revoked_reach_both_servers_within_a_second(
    servers: list[App],
    connect: Callable[[str], list[Caller]],
    fresh_postgres_url: str,
    tmp_path: Path,
) -> None:
    def create() -> dict[api_keys.Role, str]:
        # As `creditmeter keys create --ledger-url` does, from a third machine.
        with open_config_store(fresh_postgres_url, tmp_path / "cli") as cli_store:
            return tenant_keys(cli_store)[1]

    # Off the loop the servers run on, as everything blocking.
    keys = await asyncio.to_thread(create)
    admin = keys[api_keys.Role.ADMIN]
    on_a, on_b = connect(admin)
    took = await asyncio.gather(
        within_deadline("key accepted by A", lambda: accepted(on_a)),
        within_deadline("key accepted by B", lambda: accepted(on_b)),
    )
    print(f"new key accepted after {took[0]:.3f} s (A), {took[1]:.3f} s (B)")

    # Revoked through server A's store: B refuses it, and A too.
    assert servers[0].live is not None
    assert await asyncio.to_thread(
        servers[0].live.store.revoke_key, key_id(admin), int(time.time() * 1000)
    )
    took = await asyncio.gather(
        within_deadline("revoked key refused by B", lambda: refused(on_b)),
        within_deadline("revoked key refused by A", lambda: refused(on_a)),
    )
    print(f"revoked key refused after {took[0]:.3f} s (B), {took[1]:.3f} s (A)")
    # The tenant's other keys still work on both.
    assert all([await accepted(c) for c in connect(keys[api_keys.Role.READ])])


async def test_a_rate_set_through_one_server_is_charged_by_the_other_within_a_second(
    servers: list[App], connect: Callable[[str], list[Caller]]
) -> None:
    a = servers[0]
    assert a.live is not None
    # In A's store: B sees it through the shared database.
    _, keys = await asyncio.to_thread(tenant_keys, a.live.store)
    admin = keys[api_keys.Role.ADMIN]
    on_a, on_b = connect(admin)
    await within_deadline("key accepted by B", lambda: accepted(on_b))
    await on_a.Grant(pb.GrantRequest(account_id="acct", amount=100_000, request_id=rid()))

    async def charge(caller: Caller) -> int:
        reply = await caller.Consume(
            pb.ConsumeRequest(account_id="acct", feature="text", quantity=1, request_id=rid()),
            timeout=5,
        )
        return int(reply.amount)

    assert await charge(on_b) == 1  # the built-in price
    await on_a.SetRate(
        pb.SetRateRequest(rate=pb.Rate(feature="text", credits_per_unit=7), request_id=rid())
    )
    assert await charge(on_a) == 7  # the server that set it: at once

    async def b_charges_7() -> bool:
        return await charge(on_b) == 7

    took = await within_deadline("B charges the new rate", b_charges_7)
    print(f"new rate charged by B after {took:.3f} s")
    rates = await on_b.ListRates(pb.ListRatesRequest())
    assert {r.feature: r.credits_per_unit for r in rates.rates}["text"] == 7
