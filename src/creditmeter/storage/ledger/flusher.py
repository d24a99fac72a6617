"""The flusher: drains the Redis Stream outboxes into the ledger.

Every flusher reads all bucket outboxes through one consumer group, so several flushers
(in `serve` and in `creditmeter flush` processes) share the work. A batch is inserted in
one ledger transaction (idempotent on event id) and acknowledged only after the commit,
so a crash between the two re-delivers the batch and the ledger still holds each event
once. A restarted flusher first re-reads its own pending entries; entries pending on a
consumer that has been idle too long (a dead flusher) are claimed with XAUTOCLAIM.
Outboxes are trimmed only below the oldest entry not yet acknowledged, never by length,
and keep the flushed entries of the last `retention_ms` for balance watchers resuming from
a token (WatchBalance reads the outboxes).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from creditmeter import metrics
from creditmeter.constants import (
    BUCKETS,
    FLUSH_BLOCK_MS,
    FLUSH_CLAIM_IDLE_MS,
    FLUSH_GROUP,
    FLUSH_MAINTENANCE_INTERVAL_S,
    FLUSH_READ_COUNT,
    FLUSHERS_KEY,
    WATCH_RETENTION_S,
)
from creditmeter.storage.entries import ledger_records
from creditmeter.storage.layout import flushed_key, outbox_key, trimmed_key
from creditmeter.storage.ledger.base import Event, Ledger, RequestRecord
from creditmeter.storage.ledger.connection import Backoff, failure_text, stopped_within
from creditmeter.storage.scripts import standalone

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]


def consumer_name() -> str:
    """A name unique to this process (host and pid)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _ms_of(entry_id: str) -> int:
    return int(entry_id.split("-", 1)[0])


@dataclass
class FlushStats:
    events: int = 0
    batches: int = 0
    #: Age of the oldest entry in the last batch when it was committed (ms).
    last_lag_ms: int = 0


class Flusher:
    def __init__(
        self,
        client: aioredis.Redis,
        ledger: Ledger,
        consumer: str | None = None,
        read_count: int = FLUSH_READ_COUNT,
        block_ms: int = FLUSH_BLOCK_MS,
        claim_idle_ms: int = FLUSH_CLAIM_IDLE_MS,
        retention_ms: int = WATCH_RETENTION_S * 1000,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.consumer = consumer or consumer_name()
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retention_ms = retention_ms
        self.streams = [outbox_key(b) for b in range(BUCKETS)]
        self._bucket = {stream: b for b, stream in enumerate(self.streams)}
        # Not one of scripts.SCRIPT_NAMES (those take an account's keys and the prelude).
        # Sent with EVAL: Redis caches it by digest, and a SCRIPT FLUSH cannot fail an ack.
        self._ack = (resources.files("creditmeter.storage") / "lua" / "ack.lua").read_text(
            "utf-8"
        )
        self.stats = FlushStats()
        self._own_pending_done = False

    async def ensure_groups(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xgroup_create(stream, FLUSH_GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise result

    async def _read(self, new: bool) -> list[tuple[str, list[Entry]]]:
        start = ">" if new else "0"
        reply = await self.client.xreadgroup(
            FLUSH_GROUP,
            self.consumer,
            {s: start for s in self.streams},
            count=self.read_count,
            block=self.block_ms if new else None,
        )
        streams = cast(list[tuple[str, list[Entry]]], reply or [])
        return [(stream, entries) for stream, entries in streams if entries]

    async def commit(self, batch: Sequence[tuple[str, list[Entry]]]) -> int:
        """Write a batch to the ledger, then acknowledge it. Returns events written."""
        events: list[Event] = []
        requests: list[RequestRecord] = []
        for _stream, entries in batch:
            for _entry_id, fields in entries:
                found, request = ledger_records(fields)
                events.extend(found)
                if request is not None:
                    requests.append(request)
        if not batch:
            return 0
        if events or requests:  # a batch of holds alone is only acknowledged
            await self.ledger.append(events, requests)
        oldest = min(_ms_of(entries[0][0]) for _s, entries in batch)
        now_ms = int(time.time() * 1000)
        self.stats.events += len(events)
        self.stats.batches += 1
        self.stats.last_lag_ms = max(0, now_ms - oldest)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, entries in batch:
                pipe.eval(
                    self._ack,
                    2,
                    stream,
                    flushed_key(self._bucket[stream]),
                    FLUSH_GROUP,
                    *(entry_id for entry_id, _ in entries),
                )
            # The figures go with the acknowledgement: whichever process flushes, the
            # server reads them from here (flusher_stats).
            pipe.hset(
                FLUSHERS_KEY,
                self.consumer,
                f"{self.stats.events} {self.stats.last_lag_ms} {now_ms}",
            )
            await pipe.execute()
        metrics.record_flush(len(events), self.stats.last_lag_ms)
        return len(events)

    async def flush_once(self) -> int:
        """Read one batch (own pending entries first after a start) and commit it."""
        if not self._own_pending_done:
            batch = await self._read(new=False)
            if not batch:
                self._own_pending_done = True
                return 0
        else:
            batch = await self._read(new=True)
        return await self.commit(batch)

    async def claim_dead(self) -> int:
        """Take over entries left pending by flushers that stopped; returns entries claimed."""
        claimed = 0
        for stream in self.streams:
            start = "0-0"
            while True:
                next_start, entries, *_ = await self.client.xautoclaim(
                    stream, FLUSH_GROUP, self.consumer, self.claim_idle_ms, start,
                    count=self.read_count,
                )  # fmt: skip
                entries = [(i, f) for i, f in entries if f is not None]
                if entries:
                    await self.commit([(stream, entries)])
                    claimed += len(entries)
                if next_start in ("0-0", b"0-0"):
                    break
                start = next_start
        return claimed

    async def trim(self) -> None:
        """Drop flushed entries older than the retention window: everything below both the
        oldest pending or undelivered entry and `now - retention_ms`."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.time()  # Redis's clock: stream ids are its milliseconds, not ours
            for stream in self.streams:
                pipe.xinfo_groups(stream)
                pipe.xpending(stream, FLUSH_GROUP)
            now, *replies = await pipe.execute(raise_on_error=False)
        if isinstance(now, Exception):
            return
        seconds, micros = now
        window_start = f"{max(0, seconds * 1000 + micros // 1000 - self.retention_ms)}-0"
        bounds: dict[int, str] = {}
        for i in range(len(self.streams)):
            groups, pending = replies[2 * i], replies[2 * i + 1]
            if isinstance(groups, Exception) or isinstance(pending, Exception):
                continue
            group = next((g for g in groups if g["name"] == FLUSH_GROUP), None)
            if group is None:
                continue
            # Entries up to last-delivered-id were read; the unacknowledged ones among them
            # are in the pending list. Trim strictly below both bounds, and below the start
            # of the watchers' window.
            bound = min(group["last-delivered-id"], window_start, key=_id_key)
            if pending["pending"]:
                bound = min(bound, pending["min"], key=_id_key)
            if _id_key(bound) > (0, 0):
                bounds[i] = bound
        # Only streams with an entry below their bound have anything to trim. Asked first,
        # with a forward read from the start (constant time): XREVRANGE from a bound below
        # every entry walks the whole stream before it finds nothing (18 to 33 ms at
        # 200,000 entries, measured twice; the XRANGE 1.9 us), and that is the usual case
        # while an outbox is younger than the retention window.
        async with self.client.pipeline(transaction=False) as pipe:
            for i, bound in bounds.items():
                pipe.xrange(self.streams[i], min="-", max=f"({bound}", count=1)
            firsts = await pipe.execute()
        bounds = {i: b for (i, b), first in zip(bounds.items(), firsts, strict=True) if first}
        # The greatest entry each trim drops, recorded before it goes: a watcher's resume
        # position below it has lost entries. (No entry below a bound can appear meanwhile:
        # new ids are above every delivered one.)
        async with self.client.pipeline(transaction=False) as pipe:
            for i, bound in bounds.items():
                pipe.xrevrange(self.streams[i], max=f"({bound}", min="-", count=1)
            lasts = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for (i, bound), last in zip(bounds.items(), lasts, strict=True):
                if last:
                    pipe.set(trimmed_key(i), last[0][0])
                    pipe.xtrim(self.streams[i], minid=bound, approximate=False)
            await pipe.execute()

    async def backlog(self) -> int:
        """Outbox entries not yet acknowledged into the ledger (undelivered + pending)."""
        return await outbox_backlog(self.client)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Flush until stopped; survives Redis or ledger outages by retrying, with capped
        exponential backoff and one WARNING line per failed attempt."""
        stop = stop or asyncio.Event()
        await self.ensure_groups()
        last_maintenance = 0.0
        backoff = Backoff()
        while not stop.is_set():
            try:
                if time.monotonic() - last_maintenance > FLUSH_MAINTENANCE_INTERVAL_S:
                    last_maintenance = time.monotonic()
                    await self.claim_dead()
                    await self.trim()
                await self.flush_once()
            except asyncio.CancelledError:
                raise
            except ResponseError as error:
                if "NOGROUP" in str(error):  # Redis lost its data: recreate the groups
                    await self.ensure_groups()
                    continue
                await _pause(stop, backoff, error)
            except Exception as error:  # ledger or Redis down: keep the entries, retry
                self._own_pending_done = False  # re-read what was delivered but not acked
                await _pause(stop, backoff, error)
            else:
                backoff.reset()


async def _pause(stop: asyncio.Event, backoff: Backoff, error: Exception) -> None:
    pause = backoff.next()
    log.warning("flush failed: %s; retrying in %.1f s", failure_text(error), pause)
    await stopped_within(stop, pause)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class FlushFigures:
    #: Events every flusher has committed (summed over the flushers on record).
    events: int
    #: Age of the oldest entry of the most recent batch any flusher committed (ms).
    last_lag_ms: int


async def flusher_stats(client: aioredis.Redis) -> FlushFigures:
    """What the flushers (in this process, children, or `creditmeter flush` elsewhere)
    last published with their acknowledgements."""
    published = await client.hgetall(FLUSHERS_KEY)
    events, latest_ms, lag_ms = 0, -1, 0
    for value in published.values():
        count, lag, at = (int(x) for x in str(value).split())
        events += count
        if at > latest_ms:
            latest_ms, lag_ms = at, lag
    return FlushFigures(events, lag_ms)


async def drain(flusher: Flusher, deadline_s: float) -> None:
    """Flush until the outboxes are empty or the time is up (a stopping server's last
    writes reach the ledger before it exits)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while await flusher.flush_once() and loop.time() < end:
        pass


@functools.cache
def _backlog_script() -> tuple[str, str]:
    """backlog.lua and its SHA1 digest (what SCRIPT LOAD would answer), worked out once."""
    source = standalone("backlog")
    return source, hashlib.sha1(source.encode()).hexdigest()


async def outbox_backlog(client: aioredis.Redis) -> int:
    """Entries of every outbox not yet acknowledged into the ledger: per bucket, the
    entries ever added (kept by Redis with the stream) less those acknowledged (ack.lua).
    Neither XLEN (the outboxes keep flushed entries for watchers) nor XINFO GROUPS' lag
    (Redis 7.0 lets it fall behind the group) would do. Each bucket's figure is worked
    out in Redis (backlog.lua) and comes back as one integer: parsing 64 XINFO STREAM
    replies in Python every BACKLOG_CHECK_INTERVAL_S cost a server a tenth of its time."""
    source, sha = _backlog_script()
    for _ in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for bucket in range(BUCKETS):
                pipe.evalsha(sha, 2, outbox_key(bucket), flushed_key(bucket))
            replies = await pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in replies):
            break
        await client.script_load(source)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return sum(int(r) for r in replies)
