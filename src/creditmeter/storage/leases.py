"""Sharing the buckets' work among the processes that do it (the flushers), with leases in
Redis.

Each bucket has one lease key per role (`cm:{bNN}:lease:<role>`, in the bucket's own slot)
holding its owner's name with a time to live. A process works only on the buckets it holds.
Every round it says it is alive (a peers sorted set, in Redis's own clock), learns how many
peers there are, renews its leases, gives up those beyond its fair share (a newcomer then
takes them) and takes free ones up to it. A process that dies stops renewing: its leases
lapse after `lease_ms` and its peers take its buckets, with the work it left half done
(for the flusher: its pending entries, claimed at once).

A lease is not a lock: a process paused past its lease may still finish a batch of a bucket
another now holds. The work must be idempotent (the ledger's writes are, by event id).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from creditmeter.constants import KEY_PREFIX
from creditmeter.storage import layout
from creditmeter.storage.functions import call, call_each
from creditmeter.storage.redis_client import Client


def lease_key(bucket: int, role: str) -> str:
    return f"{layout.bucket_tag(bucket)}:lease:{role}"


def peers_key(role: str) -> str:
    return f"{KEY_PREFIX}:peers:{role}"


@dataclass
class Changes:
    gained: list[int] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)


class BucketLeases:
    """The buckets one process holds for one role (e.g. "flush")."""

    def __init__(self, client: Client, role: str, owner: str, lease_ms: int) -> None:
        self.client = client
        self.role = role
        self.owner = owner
        self.lease_ms = lease_ms
        self.owned: set[int] = set()
        #: Live peers at the last round, this process included.
        self.peers = 0

    async def refresh(self) -> Changes:
        """One round: renew, give up or take leases towards this process's fair share."""
        changes = Changes()
        word = [self.owner, self.lease_ms]
        self.peers = max(1, int(await call(self.client, "peers", [peers_key(self.role)], word)))
        count = layout.buckets()
        share = math.ceil(count / self.peers)
        held = sorted(self.owned)
        kept = await self._each("renew", held)
        changes.lost = [b for b, ok in zip(held, kept, strict=True) if not ok]
        self.owned.difference_update(changes.lost)
        if len(self.owned) > share:
            extra = sorted(self.owned)[share:]
            await self._each("release", extra)
            self.owned.difference_update(extra)
            changes.lost.extend(extra)
        elif len(self.owned) < share:
            changes.gained = await self._take(share - len(self.owned))
        return changes

    async def _each(self, op: str, buckets: Sequence[int]) -> list[bool]:
        if not buckets:
            return []
        replies = await call_each(
            self.client,
            "lease",
            [((lease_key(b, self.role),), (op, self.owner, self.lease_ms)) for b in buckets],
        )
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [reply == 1 for reply in replies]

    async def _take(self, wanted: int) -> list[int]:
        """Take up to `wanted` free leases (in random order, so peers starting together
        rarely reach for the same ones). Leases already in this owner's name (a process
        that restarted under the same name before they lapsed) are its own again."""
        candidates = [b for b in range(layout.buckets()) if b not in self.owned]
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in candidates:
                pipe.get(lease_key(bucket, self.role))
            holders = await pipe.execute()
        mine = [b for b, h in zip(candidates, holders, strict=True) if h == self.owner]
        mine = [b for b, ok in zip(mine, await self._each("renew", mine), strict=True) if ok]
        free = [b for b, h in zip(candidates, holders, strict=True) if h is None]
        random.shuffle(free)
        free = free[: max(0, wanted - len(mine))]
        won: list[bool] = []
        if free:
            async with self.client.pipeline(transaction=False) as pipe:
                for bucket in free:
                    pipe.set(lease_key(bucket, self.role), self.owner, nx=True, px=self.lease_ms)
                won = [bool(ok) for ok in await pipe.execute()]
        gained = mine + [b for b, ok in zip(free, won, strict=True) if ok]
        self.owned.update(gained)
        return gained

    async def release_all(self) -> None:
        """Give up every lease and leave the peers (a clean stop: peers take over at once)."""
        await self._each("release", sorted(self.owned))
        self.owned.clear()
        await call(self.client, "peers", [peers_key(self.role)], [self.owner, 0])
