"""Reading many buckets' streams where no blocking read spans them (a Redis Cluster): when
to read each one again."""

from __future__ import annotations

from collections.abc import Iterable


class IdleBackoff:
    """Per bucket: read again at once after it had something; after twice its last wait
    (from `first_s` up to `max_s`) after it had nothing. Many idle buckets then cost a
    read each per `max_s`, while a busy one is read as fast as it fills."""

    def __init__(self, first_s: float, max_s: float) -> None:
        self.first_s = first_s
        self.max_s = max_s
        #: Per idle bucket: when it is due, and the wait that led there.
        self._idle: dict[int, tuple[float, float]] = {}

    def due(self, buckets: Iterable[int], now: float) -> list[int]:
        return [b for b in buckets if self._idle.get(b, (0.0, 0.0))[0] <= now]

    def record(self, buckets: Iterable[int], found: set[int], now: float) -> None:
        """What a read of `buckets` at `now` found: entries in those of `found`."""
        for bucket in buckets:
            if bucket in found:
                self._idle.pop(bucket, None)
            else:
                last = self._idle.get(bucket, (0.0, 0.0))[1]
                wait = min(max(self.first_s, 2 * last), self.max_s)
                self._idle[bucket] = (now + wait, wait)
