"""Call sessions run for the caller: StartSession when the call starts, UpdateSession before
the granted quota (or its validity) runs out, EndSession with the seconds used when it ends,
as a Diameter credit-control client does (RFC 4006).

`SessionMeter` holds the arithmetic (when to report, how many seconds, when the call must
end) with no I/O, so it is tested on its own; `CallSession` (a thread) and
`AsyncCallSession` (a task) drive it against the server.

Seconds are measured on this process's monotonic clock from the moment StartSession
answered. Updates report whole seconds and carry the fraction to the next report; the end
reports the rest rounded up, so the total reported is the call's length rounded up once.
The server's `valid_until` is a wall-clock time: it only ever brings a report forward, never
pushes it later than the granted quota allows, and a report never follows the previous one
by less than SESSION_MIN_REPORT_INTERVAL_S, so a skewed clock cannot make the helper spin."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Union

from google.protobuf.timestamp_pb2 import Timestamp

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.client import errors
from creditmeter.client.requests import TimeoutPolicyName
from creditmeter.constants import (
    SESSION_MIN_REPORT_INTERVAL_S,
    SESSION_REPORT_MARGIN_FRACTION,
    SESSION_REPORT_MARGIN_S,
)

if TYPE_CHECKING:
    from creditmeter.client.aio import AsyncClient
    from creditmeter.client.sync import Client

log = logging.getLogger(__name__)

#: Errors after which the session may still be alive on the server: the update is sent
#: again (same sequence, same seconds) at the next wake-up.
_TRANSIENT = (errors.Unavailable, errors.DeadlineExceeded)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Grant:
    """What the last Start/UpdateSession answer allows."""

    #: Monotonic time the answer arrived.
    received_at: float
    granted_seconds: int
    final_unit: bool
    #: Seconds from `received_at` until `valid_until`, by this process's wall clock.
    valid_for_s: float


class SessionMeter:
    """The pure bookkeeping of one call session (no I/O, clock passed in)."""

    def __init__(
        self,
        started_at: float,
        *,
        margin_s: float = SESSION_REPORT_MARGIN_S,
        margin_fraction: float = SESSION_REPORT_MARGIN_FRACTION,
        min_interval_s: float = SESSION_MIN_REPORT_INTERVAL_S,
    ) -> None:
        self.started_at = started_at
        self.margin_s = margin_s
        self.margin_fraction = margin_fraction
        self.min_interval_s = min_interval_s
        #: Whole seconds reported to the server so far (updates and end).
        self.reported_seconds = 0
        #: The sequence number of the last report made (0 = StartSession).
        self.sequence = 0
        self.grant: Grant | None = None

    def granted(
        self,
        now: float,
        granted_seconds: int,
        final_unit: bool,
        valid_until: Timestamp | None,
        wall_now: float,
    ) -> None:
        """Record a Start/UpdateSession answer received at monotonic `now`."""
        valid_for = math.inf
        if valid_until is not None and (valid_until.seconds or valid_until.nanos):
            valid_for = valid_until.seconds + valid_until.nanos / 1e9 - wall_now
        self.grant = Grant(now, granted_seconds, final_unit, valid_for)

    def must_end_at(self) -> float:
        """Monotonic time the granted seconds run out (final only if `final_unit`)."""
        assert self.grant is not None
        return self.grant.received_at + self.grant.granted_seconds

    def next_report_at(self) -> float | None:
        """Monotonic time of the next UpdateSession, or None when no further quota can come
        (final unit, and the validity lasts as long as the quota)."""
        g = self.grant
        assert g is not None
        window = min(float(g.granted_seconds), g.valid_for_s)
        margin = min(self.margin_s, self.margin_fraction * max(0.0, window))
        # valid_until usually is the quota's end as the server saw it, a network delay
        # ago: within the margin it counts as "as long as the quota".
        if g.final_unit and g.valid_for_s + margin >= g.granted_seconds:
            return None
        return g.received_at + max(self.min_interval_s, window - margin)

    def report(self, now: float, final: bool) -> tuple[int, int]:
        """The (sequence, used seconds) of the next report made at `now`: whole seconds since
        the last report, rounded down for an update and up for the end."""
        elapsed = max(0.0, now - self.started_at)
        whole = math.ceil(elapsed) if final else math.floor(elapsed)
        used = max(0, whole - self.reported_seconds)
        self.reported_seconds += used
        self.sequence += 1
        return self.sequence, used


def _wall_time(monotonic_at: float, clock: Clock) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=monotonic_at - clock())


FinalUnitCallback = Callable[["CallSession"], object]
AsyncFinalUnitCallback = Callable[["AsyncCallSession"], Union[Awaitable[object], object]]  # noqa: UP007


class _SessionBase:
    """State and properties shared by the sync and asyncio runners."""

    def __init__(
        self,
        account_id: str,
        feature: str,
        session_id: str | None,
        requested_seconds: int | None,
        timeout_policy: TimeoutPolicyName | None,
        clock: Clock,
    ) -> None:
        self.account_id = account_id
        self.feature = feature
        self.session_id = session_id or str(uuid.uuid4())
        self.requested_seconds = requested_seconds
        self.timeout_policy: TimeoutPolicyName | None = timeout_policy
        self._clock = clock
        self._meter: SessionMeter | None = None
        #: The last answer of StartSession or UpdateSession.
        self.last: pb.StartSessionResponse | pb.UpdateSessionResponse | None = None
        #: EndSession's answer, once the session has ended.
        self.end_response: pb.EndSessionResponse | None = None
        #: The error that stopped the updates (the session is then over on the server).
        self.error: errors.CreditmeterError | None = None
        #: An update sent without an answer: sent again as is before anything else.
        self._pending: pb.UpdateSessionRequest | None = None
        self._final_notified = False

    @property
    def meter(self) -> SessionMeter:
        if self._meter is None:
            raise RuntimeError("the session has not started")
        return self._meter

    @property
    def final_unit(self) -> bool:
        """True once the server said no further quota will follow."""
        return (
            self._meter is not None
            and self.meter.grant is not None
            and (self.meter.grant.final_unit)
        )

    @property
    def remaining_seconds(self) -> float:
        """Seconds the call may still run on what has been granted (0 when it ran out)."""
        return max(0.0, self.meter.must_end_at() - self._clock())

    @property
    def must_end_at(self) -> datetime:
        """When the granted seconds run out (UTC). Final when `final_unit` is set; otherwise
        the helper asks for more before then."""
        return _wall_time(self.meter.must_end_at(), self._clock)

    @property
    def used_seconds(self) -> float:
        """Seconds since the session started."""
        return max(0.0, self._clock() - self.meter.started_at)

    def _apply(self, resp: pb.StartSessionResponse | pb.UpdateSessionResponse) -> bool:
        """Record a quota; whether it is the first final one (to notify the caller)."""
        if self._meter is None:
            self._meter = SessionMeter(self._clock())
        self.meter.granted(
            self._clock(), resp.granted_seconds, resp.final_unit, resp.valid_until, time.time()
        )
        self.last = resp
        first_final = resp.final_unit and not self._final_notified
        self._final_notified = self._final_notified or resp.final_unit
        return first_final

    def _next_update(self, final: bool) -> pb.UpdateSessionRequest:
        if self._pending is None:
            sequence, used = self.meter.report(self._clock(), final)
            self._pending = pb.UpdateSessionRequest(
                account_id=self.account_id,
                session_id=self.session_id,
                sequence=sequence,
                used_seconds=used,
            )
            if self.requested_seconds is not None:
                self._pending.requested_seconds = self.requested_seconds
        return self._pending

    def _end_request(self) -> pb.EndSessionRequest:
        sequence, used = self.meter.report(self._clock(), final=True)
        return pb.EndSessionRequest(
            account_id=self.account_id,
            session_id=self.session_id,
            sequence=sequence,
            used_seconds=used,
        )

    def _wake_at(self) -> tuple[float, bool]:
        """When the runner next wakes, and whether it then reports (else: time is up)."""
        end = self.meter.must_end_at()
        report = self.meter.next_report_at()
        if self._pending is not None:  # an unanswered update: try again soon
            report = self._clock() + self.meter.min_interval_s
        if report is not None and report < end:
            return report, True
        return end, False


class CallSession(_SessionBase):
    """A call session run by a background thread; use as `with client.session(...) as s`.

    `must_end` is set when the call must stop: the last quota ran out, or the server closed
    the session. `on_final_unit(s)` is called (from the thread) once, when the server grants
    the last quota; `s.remaining_seconds` then says how long the call has left."""

    def __init__(
        self,
        client: Client,
        account_id: str,
        feature: str,
        *,
        session_id: str | None = None,
        requested_seconds: int | None = None,
        timeout_policy: TimeoutPolicyName | None = None,
        on_final_unit: FinalUnitCallback | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(account_id, feature, session_id, requested_seconds, timeout_policy, clock)
        self._client = client
        self._on_final_unit = on_final_unit
        self.must_end = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CallSession:
        resp = self._client.start_session(
            self.account_id,
            self.feature,
            self.session_id,
            requested_seconds=self.requested_seconds,
            timeout_policy=self.timeout_policy,
        )
        self._notify(self._apply(resp))
        self._thread = threading.Thread(
            target=self._run, name=f"session-{self.session_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            if exc is None:
                raise self.error
            return
        try:
            if self._pending is not None:  # its outcome is unknown: settle it first
                self._apply(self._client.update_session_request(self._pending))
                self._pending = None
            self.end_response = self._client.end_session_request(self._end_request())
        except errors.CreditmeterError:
            if exc is None:
                raise
            log.exception("EndSession of %s failed while the call failed", self.session_id)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the call must end (or `timeout`); whether it must."""
        return self.must_end.wait(timeout)

    def _notify(self, first_final: bool) -> None:
        if first_final and self._on_final_unit is not None:
            self._on_final_unit(self)

    def _run(self) -> None:
        while not self._stop.is_set():
            wake_at, report = self._wake_at()
            if self._stop.wait(max(0.0, wake_at - self._clock())):
                return
            if not report:
                self.must_end.set()
                self._stop.wait()
                return
            try:
                resp = self._client.update_session_request(self._next_update(final=False))
            except _TRANSIENT as error:
                log.warning("UpdateSession of %s failed, trying again: %s", self.session_id, error)
                continue
            except errors.CreditmeterError as error:
                self.error = error
                self.must_end.set()
                return
            self._pending = None
            self._notify(self._apply(resp))


class AsyncCallSession(_SessionBase):
    """A call session run by an asyncio task; use as `async with client.session(...) as s`.

    As CallSession, with `must_end` an asyncio.Event and `on_final_unit` a function or
    coroutine function."""

    def __init__(
        self,
        client: AsyncClient,
        account_id: str,
        feature: str,
        *,
        session_id: str | None = None,
        requested_seconds: int | None = None,
        timeout_policy: TimeoutPolicyName | None = None,
        on_final_unit: AsyncFinalUnitCallback | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(account_id, feature, session_id, requested_seconds, timeout_policy, clock)
        self._client = client
        self._on_final_unit = on_final_unit
        self.must_end = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncCallSession:
        resp = await self._client.start_session(
            self.account_id,
            self.feature,
            self.session_id,
            requested_seconds=self.requested_seconds,
            timeout_policy=self.timeout_policy,
        )
        await self._notify(self._apply(resp))
        self._task = asyncio.create_task(self._run(), name=f"session-{self.session_id}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            # Cancelling mid-update leaves its request in _pending: sent again below.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.error is not None:
            if exc is None:
                raise self.error
            return
        try:
            if self._pending is not None:
                self._apply(await self._client.update_session_request(self._pending))
                self._pending = None
            self.end_response = await self._client.end_session_request(self._end_request())
        except errors.CreditmeterError:
            if exc is None:
                raise
            log.exception("EndSession of %s failed while the call failed", self.session_id)

    async def wait(self) -> None:
        """Wait until the call must end."""
        await self.must_end.wait()

    async def _notify(self, first_final: bool) -> None:
        if first_final and self._on_final_unit is not None:
            result = self._on_final_unit(self)
            if inspect.isawaitable(result):
                await result

    async def _run(self) -> None:
        while True:
            wake_at, report = self._wake_at()
            await asyncio.sleep(max(0.0, wake_at - self._clock()))
            if not report:
                self.must_end.set()
                return
            try:
                resp = await self._client.update_session_request(self._next_update(final=False))
            except _TRANSIENT as error:
                log.warning("UpdateSession of %s failed, trying again: %s", self.session_id, error)
                continue
            except errors.CreditmeterError as error:
                self.error = error
                self.must_end.set()
                return
            self._pending = None
            await self._notify(self._apply(resp))
