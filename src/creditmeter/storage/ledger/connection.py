"""Reaching the ledger across outages.

A process that needs the ledger (the server, a flusher) must not depend on it answering
when it starts: metering goes on into the outboxes while the ledger is down. `LedgerLink`
makes one attempt to open the ledger at start, then keeps trying with capped exponential
backoff (each open creates or checks the schema) and, once it is open, pings it, so the
process always knows whether it reaches the ledger. Each failed attempt logs one WARNING
line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from creditmeter.constants import (
    LEDGER_CHECK_INTERVAL_S,
    LEDGER_PING_TIMEOUT_S,
    LEDGER_RETRY_INITIAL_S,
    LEDGER_RETRY_MAX_S,
    LEDGER_RETRY_MULTIPLIER,
)
from creditmeter.errors import BackendUnavailable
from creditmeter.storage.ledger.base import Ledger

log = logging.getLogger(__name__)


class Backoff:
    """Capped exponential backoff: each `next()` pause is `multiplier` times the one before,
    up to `max_s`; `reset()` after a success starts again from `initial_s`."""

    def __init__(
        self,
        initial_s: float = LEDGER_RETRY_INITIAL_S,
        max_s: float = LEDGER_RETRY_MAX_S,
        multiplier: float = LEDGER_RETRY_MULTIPLIER,
    ) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.multiplier = multiplier
        self._pause_s = initial_s

    def next(self) -> float:
        """The pause before the next attempt (and lengthen the one after)."""
        pause = self._pause_s
        self._pause_s = min(self.max_s, pause * self.multiplier)
        return pause

    def reset(self) -> None:
        self._pause_s = self.initial_s


def failure_text(error: BaseException) -> str:
    """What went wrong, in one line for a log: the driver's error underneath a
    BackendUnavailable (whose own message is the fixed one clients get)."""
    root = error.__cause__ if isinstance(error, BackendUnavailable) and error.__cause__ else error
    return str(root).strip() or type(root).__name__  # TimeoutError() says nothing


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds`; True if `stop` was set meanwhile (or already)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _wall_ms() -> int:
    return int(time.time() * 1000)


class LedgerLink:
    """Whether this process reaches its ledger, and the attempts that keep it reached.

    `start()` makes the first attempt; `watch()` (a background task) keeps opening the
    ledger until it is open, then pings it every LEDGER_CHECK_INTERVAL_S, with backoff
    while it does not answer. `reachable` is the outcome of the last attempt."""

    def __init__(
        self,
        ledger: Ledger,
        who: str,
        now_ms: Callable[[], int] = _wall_ms,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.ledger = ledger
        #: Names the process in log lines ("server", "flusher"): a server and its flusher
        #: child both log their attempts to the same stream.
        self.who = who
        self._now_ms = now_ms
        self._on_change = on_change
        self._opened = asyncio.Event()
        self._backoff = Backoff()
        #: The pause before the next attempt: the backoff's while the ledger does not
        #: answer, the check interval while it does, none before the first attempt.
        self._pause_s = 0.0
        self._failures = 0
        self.reachable = False
        #: When (this process's clock, ms) the ledger stopped answering, or was first found
        #: not answering; None while it answers.
        self.down_since_ms: int | None = None

    @property
    def is_open(self) -> bool:
        """Whether the ledger has been opened (its schema created or checked)."""
        return self._opened.is_set()

    async def start(self) -> bool:
        """The first attempt to open the ledger. False when it does not answer (the process
        goes on; `watch` or `keep_opening` tries again). Any other failure, such as refused
        credentials or a missing database, raises: that is a configuration to fix, not an
        outage to wait out."""
        try:
            await self.ledger.open()
        except BackendUnavailable as error:
            await self._failed(error)
            return False
        self._opened.set()
        await self._succeeded(opened=True)
        return True

    async def keep_opening(self, stop: asyncio.Event) -> bool:
        """Try to open the ledger, with backoff, until it opens (True) or `stop` (False)."""
        while not self.is_open:
            if await stopped_within(stop, self._pause_s):
                return False
            await self._attempt()
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Until `stop`: open the ledger (keep_opening), then ping it, recording whether it
        answers."""
        if not await self.keep_opening(stop):
            return
        while not await stopped_within(stop, self._pause_s):
            await self._attempt()

    async def wait_open(self, stop: asyncio.Event) -> bool:
        """Wait (while another task keeps opening it) until the ledger is open (True) or
        `stop` (False)."""
        waits = [asyncio.ensure_future(self._opened.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return self.is_open and not stop.is_set()

    async def _attempt(self) -> None:
        """Open the ledger if it is not open yet, else ping it; record the outcome."""
        opening = not self.is_open
        try:
            if opening:
                await self.ledger.open()
                self._opened.set()
            else:
                await asyncio.wait_for(self.ledger.ping(), LEDGER_PING_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the ledger, not this process, is at fault: try again
            await self._failed(error)
            return
        await self._succeeded(opening)

    async def _failed(self, error: BaseException) -> None:
        self._failures += 1
        self._pause_s = self._backoff.next()
        log.warning(
            "%s: ledger unreachable%s (attempt %d): %s; retrying in %.1f s",
            self.who,
            "" if self.is_open else ", schema not checked yet",
            self._failures,
            failure_text(error),
            self._pause_s,
        )
        if self._failures == 1:  # it answered until now, or had never been tried
            self.reachable = False
            self.down_since_ms = self._now_ms()
            await self._changed()

    async def _succeeded(self, opened: bool) -> None:
        self._backoff.reset()
        self._pause_s = LEDGER_CHECK_INTERVAL_S
        if self.reachable:
            return
        if self._failures:
            log.info(
                "%s: ledger reachable after %d failed attempts%s",
                self.who,
                self._failures,
                "; schema created or checked" if opened else "",
            )
        self._failures = 0
        self.reachable = True
        self.down_since_ms = None
        await self._changed()

    async def _changed(self) -> None:
        if self._on_change is not None:
            await self._on_change(self.reachable)
