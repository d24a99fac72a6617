"""Backpressure from the ledger: metering keeps working while the outbox backlog is under
the cap, then fails closed (UNAVAILABLE) until the flusher brings it back down. Nothing
is dropped: refused calls change nothing and can be retried with the same request id."""

from __future__ import annotations

from creditmeter.constants import BACKLOG_RESUME_FRACTION, DEFAULT_BACKLOG_CAP
from creditmeter.errors import LedgerBacklog


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
