"""Call sessions: per-increment charging of voice and video with reservations, the way
telecom online charging does it (Diameter credit control, RFC 4006 / RFC 8506).

A session reserves credit for a quota of time; each report charges the increments the
whole call has used beyond those already charged (rounded up over the call, never per
report) and reserves the next quota. Every step is one session.lua call, idempotent on
(session id, sequence) through the usual request-id record, so a retried step returns its
first answer. A session whose call server goes silent is closed by whichever server
process's closer gets to it first; the script's state check makes the close happen once.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum

from creditmeter import metrics
from creditmeter.constants import (
    DEFAULT_SESSION_GRACE_S,
    DEFAULT_SESSION_QUOTA_UNITS,
    MAX_SESSION_QUOTA_S,
    MAX_SESSION_REPORT_S,
)
from creditmeter.domain import balances
from creditmeter.domain.backpressure import Backpressure
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import SESSION_TXN_PREFIX, fingerprint, new_id
from creditmeter.domain.limits import Limits
from creditmeter.domain.rates import RateBook, RateUnit
from creditmeter.domain.validation import Violations
from creditmeter.errors import (
    IdempotencyKeyReused,
    Rejected,
    SessionExists,
    SessionNotFound,
    applied,
)
from creditmeter.storage.layout import AccountKeys, session_request_id
from creditmeter.storage.limits import LimitArgs
from creditmeter.storage.redis_store import (
    Call,
    CloseStep,
    RedisStore,
    ReportStep,
    SessionFields,
    SessionRecord,
    SessionStepArgs,
    StartStep,
)


class TimeoutPolicy(StrEnum):
    #: Charge the whole quota granted: the call may have gone on.
    CHARGE_QUOTA = "charge_quota"
    #: Charge only what was reported.
    RELEASE = "release"


class SessionState(StrEnum):
    OPEN = "open"
    ENDED = "ended"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class SessionView:
    session_id: str
    account_id: str
    feature: str
    state: SessionState
    sequence: int
    used_seconds: int
    charged_units: int
    charged_amount: int
    reserved_amount: int
    granted_seconds: int
    final_unit: bool
    billing_increment_s: int
    credits_per_unit: int
    timeout_policy: TimeoutPolicy
    start_ms: int
    valid_until_ms: int
    end_ms: int | None
    uncollected_amount: int

    @classmethod
    def of(cls, account_id: str, session_id: str, s: SessionFields) -> SessionView:
        return cls(
            session_id=session_id,
            account_id=account_id,
            feature=s.feature,
            state=SessionState(s.state),
            sequence=s.sequence,
            used_seconds=s.used_s,
            charged_units=s.units,
            charged_amount=s.charged,
            reserved_amount=s.reserved,
            granted_seconds=s.granted_s,
            final_unit=s.final_unit,
            billing_increment_s=s.increment_s,
            credits_per_unit=s.rate,
            timeout_policy=TimeoutPolicy(s.policy),
            start_ms=s.started_ms,
            valid_until_ms=s.valid_until_ms,
            end_ms=s.ended_ms or None,
            uncollected_amount=s.uncollected,
        )


@dataclass(frozen=True)
class SessionStep:
    """The outcome of one step: the session afterwards, what the step charged and
    released, and the account's spendable balance (-1 unlimited)."""

    session: SessionView
    charged: int
    released: int
    balance: int


def _request_id(session_id: str, sequence: int) -> str:
    return session_request_id(session_id, str(sequence))


class Sessions:
    """The session RPCs' rules, independent of gRPC."""

    def __init__(
        self,
        store: RedisStore,
        rates: RateBook,
        clock: Clock,
        gate: Backpressure | None = None,
        grace_s: float = DEFAULT_SESSION_GRACE_S,
        limits: Limits | None = None,
    ) -> None:
        self.store = store
        self.rates = rates
        #: The tenants' usage limits: a quota is capped by what they leave.
        self.limits = limits or Limits()
        self.clock = clock
        self.gate = gate or Backpressure()
        self.grace_ms = int(grace_s * 1000)

    def _call(
        self, session_id: str, sequence: int, operation: str, /, **params: object
    ) -> Call:
        now = self.clock.now_ms()
        return Call(
            now_ms=now,
            txn=new_id(SESSION_TXN_PREFIX, now),
            request_id=_request_id(session_id, sequence),
            fingerprint=fingerprint(operation, params),
        )

    @staticmethod
    def _check_quota(requested_s: int | None, v: Violations) -> None:
        if requested_s is not None and not 1 <= requested_s <= MAX_SESSION_QUOTA_S:
            v.add("requested_seconds", f"must be from 1 to {MAX_SESSION_QUOTA_S} seconds")

    async def _run(
        self,
        keys: AccountKeys,
        call: Call,
        step: SessionStepArgs,
        session_id: str,
        feature: str | None = None,
    ) -> SessionRecord | None:
        """One session.lua call, with the limit args of `feature` (None: of every feature
        of the tenant, for a step whose feature only the session knows)."""

        def run(limits: LimitArgs) -> Awaitable[SessionRecord | None]:
            return self.store.session_step(keys, call, step, session_id, limits)

        return await self.limits.run(keys.tenant, keys.account, feature, call.now_ms, run)

    async def _step(
        self,
        keys: AccountKeys,
        call: Call,
        step: SessionStepArgs,
        session_id: str,
        feature: str | None = None,
    ) -> SessionStep:
        record = await applied(self._run(keys, call, step, session_id, feature))
        assert record is not None  # only a close can find a session not due
        return self._result(keys, session_id, record)

    @staticmethod
    def _result(keys: AccountKeys, session_id: str, record: SessionRecord) -> SessionStep:
        return SessionStep(
            session=SessionView.of(keys.account, session_id, record.session),
            charged=record.charged,
            released=record.released,
            balance=balances.after(record.holdings),
        )

    async def start(
        self,
        tenant: str,
        account_id: str,
        feature: str,
        session_id: str,
        *,
        requested_s: int | None = None,
        policy: TimeoutPolicy = TimeoutPolicy.CHARGE_QUOTA,
        violations: Violations | None = None,
    ) -> SessionStep:
        """Open a session and reserve its first quota."""
        v = Violations(violations)
        v.account_id(account_id)
        v.session_id(session_id)
        v.feature(feature)
        self._check_quota(requested_s, v)
        rate = self.rates.get(tenant, feature) if not v.items else None
        if rate is None and not v.items:
            v.add("feature", f"unknown feature {feature!r}: set a rate for it first")
        elif rate is not None and rate.unit is not RateUnit.TIME:
            v.add("feature", f"{feature!r} is not a time feature: sessions meter time")
        v.raise_if_any()
        assert rate is not None
        self.gate.check()
        call = self._call(
            session_id,
            0,
            "StartSession",
            account_id=account_id,
            feature=feature,
            requested_s=requested_s,
            policy=str(policy),
        )
        try:
            return await self._step(
                AccountKeys(tenant, account_id),
                call,
                StartStep(
                    feature, rate.credits_per_unit, rate.billing_increment_s, requested_s or 0,
                    DEFAULT_SESSION_QUOTA_UNITS, str(policy), self.grace_ms,
                ),
                session_id,
                feature,
            )
        except IdempotencyKeyReused:
            raise SessionExists(
                "a session with this id was started with other parameters",
                {"session_id": session_id},
            ) from None

    async def update(
        self,
        tenant: str,
        account_id: str,
        session_id: str,
        sequence: int,
        used_s: int,
        *,
        requested_s: int | None = None,
    ) -> SessionStep:
        """Charge the seconds used since the last report and reserve the next quota."""
        v = self._check_report(account_id, session_id, sequence, used_s)
        self._check_quota(requested_s, v)
        v.raise_if_any()
        self.gate.check()
        call = self._call(
            session_id,
            sequence,
            "UpdateSession",
            sequence=sequence,
            used_s=used_s,
            requested_s=requested_s,
        )
        # The script turns the seconds asked into increments of the session's own
        # billing increment (fixed at its start), as at the start; 0 asks for the default.
        return await self._step(
            AccountKeys(tenant, account_id),
            call,
            ReportStep(False, sequence, used_s, requested_s or 0, DEFAULT_SESSION_QUOTA_UNITS),
            session_id,
        )

    async def end(
        self, tenant: str, account_id: str, session_id: str, sequence: int, used_s: int
    ) -> SessionStep:
        """Charge the last seconds used and release the rest of the reservation."""
        v = self._check_report(account_id, session_id, sequence, used_s)
        v.raise_if_any()
        # Ending releases credit: it is allowed even while the ledger backlog refuses
        # new charges, so a call never holds credit longer because of it.
        call = self._call(session_id, sequence, "EndSession", sequence=sequence, used_s=used_s)
        return await self._step(
            AccountKeys(tenant, account_id), call, ReportStep(True, sequence, used_s), session_id
        )

    @staticmethod
    def _check_report(account_id: str, session_id: str, sequence: int, used_s: int) -> Violations:
        v = Violations()
        v.account_id(account_id)
        v.session_id(session_id)
        if sequence < 1:
            v.add("sequence", "must be 1 or more (0 is StartSession)")
        elif sequence > 2**31:
            v.add("sequence", "must be at most 2^31")
        if not 0 <= used_s <= MAX_SESSION_REPORT_S:
            v.add("used_seconds", f"must be from 0 to {MAX_SESSION_REPORT_S}")
        return v

    async def get(self, tenant: str, account_id: str, session_id: str) -> SessionView:
        """A session's state."""
        v = Violations()
        v.account_id(account_id)
        v.session_id(session_id)
        v.raise_if_any()
        found = await self.store.session(AccountKeys(tenant, account_id), session_id)
        if found is None:
            raise SessionNotFound("no such session on this account", {"session_id": session_id})
        return SessionView.of(account_id, session_id, found)

    async def close_due(self) -> int:
        """Close every session whose call server went silent past its validity and grace;
        returns how many this process closed."""
        now = self.clock.now_ms()
        closed = 0
        for keys, session_id in await self.store.due_sessions(now):
            call = Call(
                now_ms=now,
                txn=new_id(SESSION_TXN_PREFIX, now),
                request_id=session_request_id(session_id, "timeout"),
            )
            try:
                record = await self._run(keys, call, CloseStep(), session_id)
            except Rejected:
                continue  # closed or ended meanwhile (by another process): nothing to do
            closed += record is not None
        metrics.set_sessions_open(await self.store.open_sessions())
        return closed
