"""Operator commands that work on the server's stores directly, beside a running server
or without one: `flush`, `audit`, `rebuild`. They find Redis and the ledger from the same
--data-dir (or URLs) that `serve` uses."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console
from rich.table import Table

from creditmeter.constants import CONFIG_RELOAD_INTERVAL_S, SHUTDOWN_GRACE_S
from creditmeter.domain.clock import SystemClock
from creditmeter.domain.limits import LimitBook, from_rows
from creditmeter.domain.recovery import Recovery
from creditmeter.domain.webhooks import FlushNotices
from creditmeter.storage.config_store import open_config_store
from creditmeter.storage.deployment import resolve_buckets
from creditmeter.storage.embedded_redis import EmbeddedRedis, endpoint_file
from creditmeter.storage.ledger import open_ledger
from creditmeter.storage.ledger.base import Ledger
from creditmeter.storage.ledger.connection import LedgerLink
from creditmeter.storage.ledger.flusher import Flusher, drain, outbox_backlog
from creditmeter.storage.redis_client import Client, connect
from creditmeter.storage.redis_store import RedisStore


@dataclass
class Stores:
    redis: Client
    ledger: Ledger


async def _answers(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=1.0)
    try:
        return bool(await client.ping())
    except (RedisConnectionError, OSError):
        return False
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def open_redis(data_dir: str, redis_url: str | None) -> AsyncIterator[Client]:
    """The server's Redis: given, the running embedded one, or the embedded one started
    just for this command; with the deployment's number of buckets in force."""
    directory = Path(data_dir)
    embedded: EmbeddedRedis | None = None
    url = redis_url
    if url is None:
        endpoint = endpoint_file(directory)
        if endpoint.exists() and await _answers(endpoint.read_text().strip()):
            url = endpoint.read_text().strip()
        else:
            embedded = EmbeddedRedis(directory)
            url = await embedded.start()
    client = connect(url)
    try:
        await resolve_buckets(client)
        yield client
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()


@contextlib.asynccontextmanager
async def open_stores(
    data_dir: str, redis_url: str | None, ledger_url: str | None
) -> AsyncIterator[Stores]:
    """The server's Redis (see `open_redis`) and its ledger."""
    async with open_redis(data_dir, redis_url) as client:
        ledger = open_ledger(ledger_url, Path(data_dir))
        await ledger.open()
        try:
            yield Stores(client, ledger)
        finally:
            await ledger.close()


async def run_flusher(
    data_dir: str, redis_url: str | None, ledger_url: str | None, replica_acks: int = 0
) -> int:
    """Flush until SIGTERM/SIGINT. A ledger that does not answer is waited for (tried
    again with backoff, a WARNING line per attempt), not a reason to exit: the outboxes
    hold the events meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_redis(data_dir, redis_url) as client:
        ledger = open_ledger(ledger_url, Path(data_dir))
        link = LedgerLink(ledger, "flusher")
        try:
            if not await link.start() and not await link.keep_opening(stop):
                return 0  # stopped before the ledger ever answered: nothing was read
            # The config store says which tenants' balance moves webhooks report.
            config = open_config_store(ledger_url, Path(data_dir))
            notices = FlushNotices(config)
            watching = asyncio.create_task(notices.watch(stop, CONFIG_RELOAD_INTERVAL_S))
            flusher = Flusher(client, ledger, replica_acks=replica_acks, notices=notices)
            try:
                await flusher.run(stop)
            finally:
                stop.set()
                await watching
                await asyncio.to_thread(config.close)
            # What was written up to the stop still goes in (a stopping server's last calls).
            with contextlib.suppress(Exception):
                await drain(flusher, SHUTDOWN_GRACE_S)
                await flusher.release()
        finally:
            await ledger.close()
    return 0


def _tenant_limits(data_dir: str, ledger_url: str | None) -> LimitBook:
    """The tenants' usage limits from the config store beside the ledger."""
    with open_config_store(ledger_url, Path(data_dir)) as config:
        rows = config.usage_limits()
    return LimitBook(from_rows(rows))


async def audit(
    data_dir: str,
    redis_url: str | None,
    ledger_url: str | None,
    tenant: str | None,
    wait_s: float,
    console: Console,
) -> int:
    """Print the drift of every account; exit status 1 on any drift."""
    async with open_stores(data_dir, redis_url, ledger_url) as stores:
        backlog = await outbox_backlog(stores.redis)
        store = RedisStore(stores.redis)
        await store.upgrade_layout()  # an older release's keys, before reading them
        recovery = Recovery(stores.ledger, store, _tenant_limits(data_dir, ledger_url))
        checked, drifts = await recovery.audit(tenant, wait_s, SystemClock().now_ms())
    if drifts:
        table = Table("tenant", "account", "drift")
        for d in drifts:
            table.add_row(d.tenant, d.account, "\n".join(d.problems))
        console.print(table)
    console.print(
        f"audited {checked} accounts: {len(drifts)} with drift (outbox backlog at start: {backlog})"
    )
    return 1 if drifts else 0


async def rebuild(
    data_dir: str, redis_url: str | None, ledger_url: str | None, replace: bool, console: Console
) -> int:
    """Restore Redis from the ledger."""
    async with open_stores(data_dir, redis_url, ledger_url) as stores:
        store = RedisStore(stores.redis)
        await store.upgrade_layout()
        recovery = Recovery(stores.ledger, store, _tenant_limits(data_dir, ledger_url))
        accounts, requests, skipped = await recovery.rebuild(SystemClock().now_ms(), replace)
    console.print(f"restored {accounts} accounts and {requests} idempotency records")
    if skipped:
        console.print(
            f"skipped {len(skipped)} accounts that have state in Redis (use --replace): "
            + ", ".join(skipped[:20])
        )
        return 1
    return 0
