"""When and how long the SDK waits before sending a failed call again.

Which failures are retried:

- UNAVAILABLE, on every call: the server (or its Redis, or the ledger's backlog) refused or
  never got the call, or the connection broke. Reads are safe to repeat; every mutating RPC
  carries an idempotency key (the request id, or a session's id and sequence) that the SDK
  keeps the same on every attempt, so a repeat of a call that did reach the server replays
  its first answer instead of charging twice.
- DEADLINE_EXCEEDED, only on calls with an idempotency key: the call may or may not have
  been applied, and only a repeat with the same key tells which (and never applies it
  twice). A read that ran out of time is not repeated: nothing about it is unknown, and a
  slow read (a report over years of ledger) would only be slowed down further by repeats.

Nothing else is retried: every other error is the server's final answer.

The loop is written here rather than left to gRPC's service-config retry policy because that
policy puts all attempts under one deadline (so it can never retry DEADLINE_EXCEEDED) and
cannot tell the caller how many attempts were made."""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from creditmeter.constants import (
    CLIENT_RETRY_BACKOFF_MULTIPLIER,
    CLIENT_RETRY_INITIAL_BACKOFF_S,
    CLIENT_RETRY_MAX_ATTEMPTS,
    CLIENT_RETRY_MAX_BACKOFF_S,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with full jitter (each wait is uniform between 0 and
    the exponential cap, so clients that failed together do not retry together)."""

    #: Attempts in all, the first included; 1 disables retries.
    max_attempts: int = CLIENT_RETRY_MAX_ATTEMPTS
    initial_backoff_s: float = CLIENT_RETRY_INITIAL_BACKOFF_S
    max_backoff_s: float = CLIENT_RETRY_MAX_BACKOFF_S
    multiplier: float = CLIENT_RETRY_BACKOFF_MULTIPLIER

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff_s <= max_backoff_s")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")

    def backoff_cap_s(self, attempt: int) -> float:
        """The longest wait after failed attempt number `attempt` (1-based)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """A jittered wait after failed attempt number `attempt` (1-based)."""
        return (rng or random).uniform(0, self.backoff_cap_s(attempt))

    def should_retry(self, code: grpc.StatusCode, attempt: int, idempotent: bool) -> bool:
        """Whether failed attempt number `attempt` (1-based) with `code` is sent again."""
        if attempt >= self.max_attempts:
            return False
        if code == grpc.StatusCode.UNAVAILABLE:
            return True
        return code == grpc.StatusCode.DEADLINE_EXCEEDED and idempotent


#: A policy that never retries.
NO_RETRY = RetryPolicy(max_attempts=1)
