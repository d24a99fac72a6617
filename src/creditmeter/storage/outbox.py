"""Reading the bucket outboxes from a position, for balance watchers (WatchBalance).

The outbox streams are the flusher's queue, but every entry is also a committed change of
an account, in order per bucket. A watcher reads them with plain XREAD (no consumer group:
it takes nothing from the flusher) from positions of its own, on a connection of its own
(a blocking read would hold a connection of the shared pool for its whole duration).

Entries are returned with their events (see `entries`): a script appends all its events in
one entry, so they are all present as soon as any of them is.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from creditmeter.constants import (
    WATCH_BLOCK_MS,
    WATCH_IDLE_POLL_MAX_MS,
    WATCH_POLL_MS,
    WATCH_READ_COUNT,
)
from creditmeter.storage.entries import events as entry_events
from creditmeter.storage.entries import header
from creditmeter.storage.layout import outbox_key, trimmed_key
from creditmeter.storage.polling import IdleBackoff
from creditmeter.storage.redis_client import Client, connect, is_cluster_client, reachable

Entry = tuple[str, dict[str, str]]

#: A stream entry id: milliseconds and a sequence number.
STREAM_ID = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
#: The position before every entry of a stream.
STREAM_START = "0-0"


def stream_id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (ids compare numerically, not as strings)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class OutboxTxn:
    """What one call did to one account, in one bucket's outbox: one entry (or, written by
    0.1.0, the consecutive entries of one transaction). Its events can belong to more than
    one transaction: the expiries a call swept first are a transaction of their own."""

    bucket: int
    #: The id of its last entry: the position once it is processed.
    last_id: str
    txn: str
    tenant: str
    account: str
    #: The events, in outbox order (balance events and the closing `request`).
    events: tuple[dict[str, str], ...]


def _same_txn(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two entries hold events of one transaction (entries of 0.1.0, one event
    each, follow each other; an entry of this release holds a whole call alone)."""
    return "event_id" in a and "event_id" in b and header(a) == header(b)


def _group(bucket: int, entries: Sequence[Entry]) -> list[OutboxTxn]:
    groups: list[list[Entry]] = []
    for entry in entries:
        if groups and _same_txn(groups[-1][-1][1], entry[1]):
            groups[-1].append(entry)
        else:
            groups.append([entry])
    txns = []
    for group in groups:
        txn, tenant, account = header(group[0][1])
        txns.append(
            OutboxTxn(
                bucket=bucket,
                last_id=group[-1][0],
                txn=txn,
                tenant=tenant,
                account=account,
                events=tuple(e for _id, fields in group for e in entry_events(fields)),
            )
        )
    return txns


class OutboxReader:
    """Reads some buckets' outboxes from given positions (exclusive), blocking briefly."""

    def __init__(
        self,
        client: Client,
        buckets: Sequence[int],
        block_ms: int = WATCH_BLOCK_MS,
        count: int = WATCH_READ_COUNT,
    ) -> None:
        self.client = client
        self.buckets = list(buckets)
        self.block_ms = block_ms
        self.count = count
        self._bucket_of = {outbox_key(b): b for b in self.buckets}
        #: When a read of several buckets on a cluster reads each again (see _poll).
        self._idle = IdleBackoff(WATCH_POLL_MS / 1000, WATCH_IDLE_POLL_MAX_MS / 1000)

    @classmethod
    def connect(cls, redis_url: str, buckets: Sequence[int]) -> OutboxReader:
        """A reader on a dedicated connection to `redis_url` (a cluster client of its own
        for a cluster), closed by `aclose`."""
        return cls(connect(redis_url, single_connection=True), buckets)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _infos(self, buckets: Sequence[int]) -> dict[int, dict[str, object] | None]:
        """XINFO STREAM of each bucket's outbox; None for an outbox that does not exist."""
        async with reachable(), self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.xinfo_stream(outbox_key(bucket))
            replies = await pipe.execute(raise_on_error=False)
        infos: dict[int, dict[str, object] | None] = {}
        for bucket, reply in zip(buckets, replies, strict=True):
            if isinstance(reply, Exception):
                if "no such key" not in str(reply).lower():
                    raise reply
                infos[bucket] = None
            else:
                infos[bucket] = cast(dict[str, object], reply)
        return infos

    async def ends(self) -> dict[int, str]:
        """The current end of every bucket's outbox: reading from there sees only what
        comes next."""
        return {
            bucket: STREAM_START if info is None else str(info["last-generated-id"])
            for bucket, info in (await self._infos(self.buckets)).items()
        }

    async def trimmed_past(self, positions: Mapping[int, str]) -> list[int]:
        """The buckets whose outbox has dropped entries after the given position (trimmed
        by the flusher past its retention window): reading from there would miss them."""
        buckets = list(positions)
        async with reachable(), self.client.pipeline(transaction=False) as pipe:
            for bucket in buckets:
                pipe.get(trimmed_key(bucket))
            trimmed: list[str | None] = await pipe.execute()
        return [
            bucket
            for bucket, last in zip(buckets, trimmed, strict=True)
            if last is not None and stream_id_key(last) > stream_id_key(positions[bucket])
        ]

    async def read(self, positions: Mapping[int, str]) -> list[OutboxTxn]:
        """The transactions after `positions` (exclusive), waiting up to `block_ms` for the
        first; ordered by entry id across buckets (each bucket's own order is kept).

        One outbox, or several on a single Redis: one blocking XREAD. Several on a cluster,
        which refuses a read of streams in several slots: one XREAD per outbox, in one
        pipeline (a batch per node), every `WATCH_POLL_MS` until something comes."""
        async with reachable():
            if len(self.buckets) == 1 or not is_cluster_client(self.client):
                streams: dict[bytes | str | memoryview[int], int | bytes | str | memoryview[int]]
                streams = {outbox_key(b): positions[b] for b in self.buckets}
                reply = await self.client.xread(streams, count=self.count, block=self.block_ms)
                found = cast(list[tuple[str, list[Entry]]], reply or [])
            else:
                found = await self._poll(positions)
            txns: list[OutboxTxn] = []
            for stream, entries in found:
                if not entries:
                    continue
                if len(entries) >= self.count:
                    entries = [*entries, *await self._rest_of_txn(stream, entries[-1])]
                txns.extend(_group(self._bucket_of[stream], entries))
        txns.sort(key=lambda t: stream_id_key(t.last_id))
        return txns

    async def _poll(self, positions: Mapping[int, str]) -> list[tuple[str, list[Entry]]]:
        """One XREAD per bucket that is due (see IdleBackoff: an idle bucket is read once
        a second, a busy one every WATCH_POLL_MS), until something comes or `block_ms`."""
        deadline = time.monotonic() + self.block_ms / 1000
        while True:
            now = time.monotonic()
            due = self._idle.due(self.buckets, now)
            found: list[tuple[str, list[Entry]]] = []
            if due:
                async with self.client.pipeline(transaction=False) as pipe:
                    for bucket in due:
                        pipe.xread({outbox_key(bucket): positions[bucket]}, count=self.count)
                    replies = await pipe.execute()
                found = [cast(tuple[str, list[Entry]], r[0]) for r in replies if r]
                self._idle.record(due, {self._bucket_of[stream] for stream, _ in found}, now)
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(WATCH_POLL_MS / 1000)

    async def _rest_of_txn(self, stream: str, last: Entry) -> list[Entry]:
        """The entries after `last` of its transaction, when a read stopped at its count in
        the middle of one (all of them are there: a script appends atomically)."""
        rest: list[Entry] = []
        after = last[0]
        while True:
            more = cast(
                list[Entry],
                await self.client.xrange(stream, min=f"({after}", max="+", count=self.count),
            )
            # Consecutive: the transaction ends at the first entry of another.
            end = next((i for i, e in enumerate(more) if not _same_txn(last[1], e[1])), len(more))
            same = more[:end]
            rest.extend(same)
            if len(same) < self.count:
                return rest
            after = same[-1][0]
