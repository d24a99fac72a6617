"""Backpressure from the ledger: metering keeps working while the outbox backlog is under
the cap, then fails closed (UNAVAILABLE) until the flusher brings it back down. Nothing
is dropped: refused calls change nothing and can be retried with the same request id."""

from __future__ import annotations

from dataclasses import dataclass

from creditmeter.constants import BACKLOG_RESUME_FRACTION, DEFAULT_BACKLOG_CAP
from creditmeter.errors import LedgerBacklog
from creditmeter.storage.ledger.connection import LedgerLink
from creditmeter.storage.ledger.flusher import flusher_stats
from creditmeter.storage.redis_client import Client


class Backpressure:
    def __init__(self, cap: int = DEFAULT_BACKLOG_CAP) -> None:
        self.cap = cap
        self.backlog = 0
        self.refusing = False

    def update(self, backlog: int) -> bool:
        """Record the current backlog; True if the refusing state changed."""
        self.backlog = backlog
        was = self.refusing
        if backlog >= self.cap:
            self.refusing = True
        elif backlog < self.cap * BACKLOG_RESUME_FRACTION:
            self.refusing = False
        return was != self.refusing

    def check(self) -> None:
        """Raise if changes are being refused."""
        if self.refusing:
            raise LedgerBacklog(
                "the ledger is behind; changes are refused until it catches up",
                {"backlog": str(self.backlog), "cap": str(self.cap)},
            )


@dataclass(frozen=True)
class LedgerStatus:
    """How far the ledger trails Redis (GetLedgerStatus), as one server sees it."""

    backlog: int
    backlog_cap: int
    flush_lag_ms: int
    events_flushed: int
    accepting_changes: bool
    #: Whether this server reaches the ledger (its last open or ping answered).
    ledger_reachable: bool
    #: While it does not: since when (ms).
    unreachable_since_ms: int | None


async def ledger_status(gate: Backpressure, redis: Client, link: LedgerLink) -> LedgerStatus:
    """The gate's backlog and state, the flushers' figures (kept in Redis: a flusher may
    be another process) and this server's link to the ledger."""
    figures = await flusher_stats(redis)
    return LedgerStatus(
        backlog=gate.backlog,
        backlog_cap=gate.cap,
        flush_lag_ms=figures.last_lag_ms,
        events_flushed=figures.events,
        accepting_changes=not gate.refusing,
        ledger_reachable=link.reachable,
        unreachable_since_ms=link.down_since_ms,
    )
