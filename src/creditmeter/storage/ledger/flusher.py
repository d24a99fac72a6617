"""The flusher: drains the Redis Stream outboxes into the ledger.

Each bucket's outbox is read on its own (a cluster refuses one read of streams in several
slots), through one consumer group. Several flushers (in `serve`, `creditmeter flush`, on
several machines) share the buckets by leases (storage/leases.py): each reads the buckets
it holds, one XREADGROUP per bucket in one pipeline (one batch per node of a cluster),
a bucket that had nothing again after `block_ms`, then less and less often up to once a
second (storage/polling.py). A bucket taken over from a
flusher that died or gave it up comes with the entries it had read and not acknowledged:
they are claimed at once and flushed first. A batch is inserted in one ledger transaction
(idempotent on event id) and acknowledged only after the commit, so a crash between the
two re-delivers the batch and the ledger still holds each event once. A restarted flusher
first re-reads its own pending entries; entries pending on a consumer that has been idle
too long are claimed with XAUTOCLAIM.
With `replica_acks` (serve's `--replica-acks N`) a batch goes to the ledger only once its
node has it on N replicas (WAIT): an entry a failover can still take back never reaches the
ledger, where the retry of its call, charged again by the new primary, would make it twice.
Outboxes are trimmed only below the oldest entry not yet acknowledged, never by length,
and keep the flushed entries of the last `retention_ms` for balance watchers resuming from
a token (WatchBalance reads the outboxes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from redis.exceptions import ResponseError

from creditmeter import metrics
from creditmeter.constants import (
    BACKLOG_CHECK_BUCKETS,
    FLUSH_BLOCK_MS,
    FLUSH_CLAIM_IDLE_MS,
    FLUSH_CLEANUP_INTERVAL_S,
    FLUSH_GROUP,
    FLUSH_IDLE_POLL_MAX_MS,
    FLUSH_LEASE_MS,
    FLUSH_MAINTENANCE_INTERVAL_S,
    FLUSH_READ_COUNT,
    FLUSHERS_KEY,
    WATCH_RETENTION_S,
)
from creditmeter.storage import layout
from creditmeter.storage.deployment import restore_buckets
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.entries import ledger_records
from creditmeter.storage.functions import call_each
from creditmeter.storage.layout import flushed_key, outbox_key, trimmed_key
from creditmeter.storage.leases import BucketLeases
from creditmeter.storage.ledger.base import Event, Ledger, Notice, RequestRecord
from creditmeter.storage.ledger.connection import Backoff, failure_text, stopped_within
from creditmeter.storage.polling import IdleBackoff
from creditmeter.storage.redis_client import Client
from creditmeter.storage.replicas import ReplicaAcks

log = logging.getLogger(__name__)

Entry = tuple[str, dict[str, str]]
#: A bucket and entries read from its outbox.
Read = tuple[int, list[Entry]]
#: The webhook notices of one entry's events (creditmeter.domain.webhooks.notices_of),
#: written with the batch: a change is reported once it is in the ledger, and always.
NoticeSource = Callable[[Sequence[Mapping[str, str]]], list[Notice]]


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
        client: Client,
        ledger: Ledger,
        consumer: str | None = None,
        read_count: int = FLUSH_READ_COUNT,
        block_ms: int = FLUSH_BLOCK_MS,
        claim_idle_ms: int = FLUSH_CLAIM_IDLE_MS,
        retention_ms: int = WATCH_RETENTION_S * 1000,
        lease_ms: int = FLUSH_LEASE_MS,
        leases: bool = True,
        replica_acks: int = 0,
        notices: NoticeSource | None = None,
    ) -> None:
        """`leases=False` reads every bucket, sharing each with any other flusher through
        the consumer group alone (what tests that drive two flushers by hand want).
        `replica_acks`: the replicas an entry must be on before it is flushed.
        `notices`: what of each entry webhooks report (None: nothing)."""
        self.client = client
        self.notices = notices
        self.replica_acks = replica_acks
        self._acks = ReplicaAcks(client, replica_acks)
        self.ledger = ledger
        self.consumer = consumer or consumer_name()
        self.read_count = read_count
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.retention_ms = retention_ms
        self.leases = BucketLeases(client, "flush", self.consumer, lease_ms) if leases else None
        self.stats = FlushStats()
        #: Buckets whose entries delivered to this consumer and not acknowledged (after a
        #: start, an error, or a takeover) are read again before new ones.
        self._pending_first: set[int] = set()
        self._started = False
        self._leases_at = -math.inf
        #: When the run loop reads each bucket again.
        self._idle = IdleBackoff(block_ms / 1000, FLUSH_IDLE_POLL_MAX_MS / 1000)

    def buckets(self) -> list[int]:
        """The buckets this flusher reads: those it holds a lease on (or all)."""
        if self.leases is None:
            return list(range(layout.buckets()))
        return sorted(self.leases.owned)

    async def ensure_groups(self) -> None:
        """The consumer group on every bucket's outbox (any flusher may create them)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in range(layout.buckets()):
                pipe.xgroup_create(outbox_key(bucket), FLUSH_GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, ResponseError) and "BUSYGROUP" not in str(result):
                raise result
        await restore_buckets(self.client)

    async def refresh_leases(self) -> None:
        """Renew this flusher's leases, take or give up buckets (see storage/leases.py); a
        bucket taken over comes with the entries its last holder read and did not
        acknowledge, claimed now and flushed first."""
        self._leases_at = time.monotonic()
        if not self._started:
            self._started = True
            if self.leases is None:
                self._pending_first = set(self.buckets())
        if self.leases is None:
            return
        changes = await self.leases.refresh()
        self._pending_first.difference_update(changes.lost)
        self._pending_first.update(changes.gained)  # its own, from before a restart
        for read in await self._claim(changes.gained, 0):
            await self.commit([read])

    async def _claim(self, buckets: Sequence[int], idle_ms: int) -> list[Read]:
        """XAUTOCLAIM the buckets' entries pending on any consumer for `idle_ms`, one
        command per bucket in a pipeline (again for those with more): the entries still in
        the outbox (a trimmed one is only taken off the pending list)."""
        cursors = {bucket: "0-0" for bucket in buckets}
        found: dict[int, list[Entry]] = {}
        while cursors:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket, start in cursors.items():
                    pipe.xautoclaim(outbox_key(bucket), FLUSH_GROUP, self.consumer, idle_ms,
                                    start, count=self.read_count)  # fmt: skip
                replies = await pipe.execute()
            more = {}
            for bucket, (next_start, entries, *_) in zip(cursors, replies, strict=True):
                kept = [(i, f) for i, f in entries if f is not None]
                if kept:
                    found.setdefault(bucket, []).extend(kept)
                if next_start not in ("0-0", b"0-0"):
                    more[bucket] = next_start
            cursors = more
        return list(found.items())

    async def _read(self, buckets: Sequence[int], pending: bool) -> list[Read]:
        """One XREADGROUP per bucket, in one pipeline: their own pending entries, or new."""
        if not buckets:
            return []
        start = "0" if pending else ">"
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.xreadgroup(FLUSH_GROUP, self.consumer, {outbox_key(bucket): start},
                                count=self.read_count)  # fmt: skip
            replies = await pipe.execute()
        read = []
        for bucket, reply in zip(buckets, replies, strict=True):
            entries = cast(list[Entry], reply[0][1]) if reply else []
            if entries:
                read.append((bucket, entries))
            elif pending:
                self._pending_first.discard(bucket)
        return read

    async def _replicated(self, batch: Sequence[Read]) -> list[Read]:
        """The reads of `batch` whose node has them on `replica_acks` replicas; the others
        stay pending on this consumer and are read again first, next round.

        As RedisStore's acknowledgements (storage/replicas.py): per node, a write and a
        WAIT, which covers every write the node made before, the entries read included."""
        if not self.replica_acks or not batch:
            return list(batch)
        keys = [outbox_key(bucket) for bucket, _entries in batch]
        targets = self._acks.targets(keys)
        async with self.client.pipeline(transaction=False) as pipe:
            self._acks.request(pipe, targets)
            acked = self._acks.acked(targets, await pipe.execute(raise_on_error=False))
        names = [self._acks.node_of(key)[0] for key in keys]
        kept = []
        for read, name in zip(batch, names, strict=True):
            if name in acked:
                kept.append(read)
            else:
                self._pending_first.add(read[0])
        return kept

    async def commit(self, batch: Sequence[Read]) -> int:
        """Write a batch to the ledger, then acknowledge it. Returns events written."""
        batch = await self._replicated(batch)
        events: list[Event] = []
        requests: list[RequestRecord] = []
        notices: list[Notice] = []
        for _bucket, entries in batch:
            for _entry_id, fields in entries:
                if fields is None:
                    continue  # pending, but trimmed off meanwhile: nothing left to write
                found, request = ledger_records(fields)
                events.extend(found)
                if request is not None:
                    requests.append(request)
                if self.notices is not None:
                    notices.extend(self.notices(entry_events(fields)))
        if not batch:
            return 0
        if events or requests or notices:  # a batch of holds alone is only acknowledged
            await self.ledger.append(events, requests, notices)
        oldest = min(_ms_of(entries[0][0]) for _b, entries in batch)
        now_ms = int(time.time() * 1000)
        self.stats.events += len(events)
        self.stats.batches += 1
        self.stats.last_lag_ms = max(0, now_ms - oldest)
        acks = [
            ((outbox_key(bucket), flushed_key(bucket)), (FLUSH_GROUP, *(i for i, _ in entries)))
            for bucket, entries in batch
        ]
        for reply in await call_each(self.client, "ack", acks):
            if isinstance(reply, Exception):
                raise reply
        # The figures: whichever process flushes, the server reads them from here
        # (flusher_stats).
        await self.client.hset(
            FLUSHERS_KEY, self.consumer, f"{self.stats.events} {self.stats.last_lag_ms} {now_ms}"
        )
        metrics.record_flush(len(events), self.stats.last_lag_ms)
        return len(events)

    async def flush_once(self, idle_backoff: bool = False) -> int:
        """Read one batch from the buckets held (own pending entries first after a start
        or a takeover) and commit it; returns the entries read. Leases are renewed first
        when they are due.

        With `idle_backoff` (the run loop), a bucket that had nothing is read again after
        twice as long as the last time, up to FLUSH_IDLE_POLL_MAX_MS, and at once after it
        had something: an idle deployment of 1,024 buckets costs a read per bucket per
        second, not ten (a pipeline of 1,024 reads is ~18 ms of a server's CPU)."""
        if time.monotonic() - self._leases_at > FLUSH_MAINTENANCE_INTERVAL_S:
            await self.refresh_leases()
        held = self.buckets()
        now = time.monotonic()
        if idle_backoff:
            held = self._idle.due(held, now)
        again = [b for b in held if b in self._pending_first]
        batch = await self._read(again, pending=True)
        busy = {b for b, _ in batch} | self._pending_first
        batch += await self._read([b for b in held if b not in busy], pending=False)
        await self.commit(batch)
        if idle_backoff:
            self._idle.record(held, {b for b, _ in batch}, now)
        return sum(len(entries) for _, entries in batch)

    async def claim_dead(self) -> int:
        """Take over entries left pending, in the buckets held, by flushers that stopped
        (idle for `claim_idle_ms`); returns entries claimed."""
        claimed = 0
        for read in await self._claim(self.buckets(), self.claim_idle_ms):
            await self.commit([read])
            claimed += len(read[1])
        return claimed

    async def trim(self) -> None:
        """Drop flushed entries older than the retention window from the buckets held:
        everything below both the oldest pending or undelivered entry and
        `now - retention_ms`."""
        held = self.buckets()
        if not held:
            return
        # Redis's clock: stream ids are its milliseconds, not ours. (Not in the pipeline: a
        # cluster pipeline carries only commands with keys.)
        seconds, micros = await self.client.time()
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in held:
                pipe.xinfo_groups(outbox_key(bucket))
                pipe.xpending(outbox_key(bucket), FLUSH_GROUP)
            replies = await pipe.execute(raise_on_error=False)
        window_start = f"{max(0, seconds * 1000 + micros // 1000 - self.retention_ms)}-0"
        bounds: dict[int, str] = {}
        for i, bucket in enumerate(held):
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
                bounds[bucket] = bound
        # Only streams with an entry below their bound have anything to trim. Asked first,
        # with a forward read from the start (constant time): XREVRANGE from a bound below
        # every entry walks the whole stream before it finds nothing (18 to 33 ms at
        # 200,000 entries, measured twice; the XRANGE 1.9 us), and that is the usual case
        # while an outbox is younger than the retention window.
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket, bound in bounds.items():
                pipe.xrange(outbox_key(bucket), min="-", max=f"({bound}", count=1)
            firsts = await pipe.execute()
        bounds = {b: bound for (b, bound), first in zip(bounds.items(), firsts, strict=True)
                  if first}  # fmt: skip
        # The greatest entry each trim drops, recorded before it goes: a watcher's resume
        # position below it has lost entries. (No entry below a bound can appear meanwhile:
        # new ids are above every delivered one.)
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket, bound in bounds.items():
                pipe.xrevrange(outbox_key(bucket), max=f"({bound}", min="-", count=1)
            lasts = await pipe.execute()
        async with self.client.pipeline(transaction=False) as pipe:
            for (bucket, bound), last in zip(bounds.items(), lasts, strict=True):
                if last:
                    pipe.set(trimmed_key(bucket), last[0][0])
                    pipe.xtrim(outbox_key(bucket), minid=bound, approximate=False)
            await pipe.execute()

    async def release(self) -> None:
        """Give up this flusher's leases (a clean stop: its peers take the buckets at once,
        not after the leases lapse)."""
        if self.leases is not None:
            self.leases.owned.difference_update(self._pending_first)  # keep nothing half read
            await self.leases.release_all()

    async def backlog(self) -> int:
        """Outbox entries not yet acknowledged into the ledger (undelivered + pending)."""
        return await outbox_backlog(self.client)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Flush until stopped; survives Redis or ledger outages by retrying, with capped
        exponential backoff and one WARNING line per failed attempt."""
        stop = stop or asyncio.Event()
        await self.ensure_groups()
        last_leases = last_cleanup = -math.inf
        backoff = Backoff()
        while not stop.is_set():
            try:
                if time.monotonic() - last_leases > FLUSH_MAINTENANCE_INTERVAL_S:
                    last_leases = time.monotonic()
                    await self.refresh_leases()
                if time.monotonic() - last_cleanup > FLUSH_CLEANUP_INTERVAL_S:
                    last_cleanup = time.monotonic()
                    await self.claim_dead()
                    await self.trim()
                if not await self.flush_once(idle_backoff=True):
                    await stopped_within(stop, self.block_ms / 1000)
            except asyncio.CancelledError:
                raise
            except ResponseError as error:
                if "NOGROUP" in str(error):  # Redis lost its data: recreate the groups
                    await self.ensure_groups()
                    continue
                await _pause(stop, backoff, error)
            except Exception as error:  # ledger or Redis down: keep the entries, retry
                self._pending_first.update(self.buckets())  # re-read what was not acked
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


async def flusher_stats(client: Client) -> FlushFigures:
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


async def outbox_backlog(client: Client) -> int:
    """Entries of every outbox not yet acknowledged into the ledger: per bucket, the
    entries ever added (kept by Redis with the stream) less those acknowledged (ack.lua).
    Neither XLEN (the outboxes keep flushed entries for watchers) nor XINFO GROUPS' lag
    (Redis 7.0 lets it fall behind the group) would do. Each bucket's figure is worked
    out in Redis (backlog.lua) and comes back as one integer: parsing 64 XINFO STREAM
    replies in Python every BACKLOG_CHECK_INTERVAL_S cost a server a tenth of its time."""
    return sum(int(r) for r in await _bucket_backlogs(client, range(layout.buckets())))


async def _bucket_backlogs(client: Client, buckets: Iterable[int]) -> list[int]:
    replies = await call_each(
        client, "backlog", [((outbox_key(b), flushed_key(b)), ()) for b in buckets]
    )
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return [int(r) for r in replies]


class BacklogMeter:
    """A server's view of the outbox backlog, for backpressure: worked out in Redis per
    bucket (backlog.lua), at most `per_check` buckets a check, in turn, each bucket's last
    figure kept. Up to that many buckets (the 64 of one Redis) every check is exact; at
    1,024 a bucket's figure is up to 16 checks old (3.2 s), and a check costs a server
    1.5 ms rather than the 18 ms of all 1,024. The first check reads them all."""

    def __init__(self, client: Client, per_check: int = BACKLOG_CHECK_BUCKETS) -> None:
        self.client = client
        self.per_check = per_check
        self._seen: dict[int, int] = {}
        self._next = 0

    async def check(self) -> int:
        count = layout.buckets()
        if count <= self.per_check or not self._seen:
            buckets = list(range(count))
        else:
            buckets = [(self._next + i) % count for i in range(self.per_check)]
            self._next = (self._next + self.per_check) % count
        self._seen.update(zip(buckets, await _bucket_backlogs(self.client, buckets), strict=True))
        return sum(self._seen.get(b, 0) for b in range(count))
