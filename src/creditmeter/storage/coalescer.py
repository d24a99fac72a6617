"""Natural batching: concurrent calls share round trips without waiting for each other.

A call that finds the coalescer idle goes out at once, alone. Calls that arrive while a
round trip is in flight queue up, and all of them (up to `max_batch`) leave together as
the next round trip as soon as the current one returns. There are no timers: under light
load every call is sent immediately; under heavy load the batch size grows with the
load, so Redis sees a few pipelines instead of many single calls (the idea of
"group commit" in databases and of Nagle-free write coalescing).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

I = TypeVar("I")  # noqa: E741 - the item type, beside R the result type
R = TypeVar("R")

#: Sends one batch; returns one outcome per item, in order: a result, or the exception
#: that item's caller should see. Raising fails every item of the batch.
Send = Callable[[Sequence[I]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[I, R]):
    """Queues calls and sends them in batches, one round trip in flight at a time."""

    def __init__(self, send: Send[I, R], max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._send = send
        self.max_batch = max_batch
        self._queue: deque[tuple[I, asyncio.Future[R]]] = deque()
        self._drainer: asyncio.Task[None] | None = None
        #: Round trips made and items sent through them (for tests and metrics).
        self.batches = 0
        self.items = 0
        self.largest_batch = 0

    async def submit(self, item: I) -> R:
        """Send `item` with whatever else is waiting; its own result or exception."""
        return await self.enqueue(item)

    def enqueue(self, item: I) -> asyncio.Future[R]:
        """Queue `item` and return the future of its result (for a caller that keeps
        many in flight in order, as a Meter stream does). Cancelling the future before
        its batch leaves drops the item."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drainer is None:
            # Idle: start draining now. The task runs on the loop's next step, with no
            # delay; calls made in this same step join the first batch.
            self._drainer = asyncio.create_task(self._drain(), name="coalescer")
        return future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[I, asyncio.Future[R]]] = []
                while self._queue and len(batch) < self.max_batch:
                    item, future = self._queue.popleft()
                    if not future.done():  # a caller cancelled before sending: skip it
                        batch.append((item, future))
                if batch:
                    await self._send_batch(batch)
        finally:
            self._drainer = None

    async def _send_batch(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            outcomes = await self._send([item for item, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            # The drainer itself is being cancelled (shutdown): its callers must not hang.
            for _, future in batch:
                future.cancel()
            for _, future in self._queue:
                future.cancel()
            self._queue.clear()
            raise
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
