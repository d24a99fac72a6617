"""Usage limits per period: "100 text messages a day, 30 voice minutes a month".

A limit caps one feature's usage in each calendar period -- a day, a week (from Monday)
or a month -- of the account's time zone (UTC unless the account sets one), counted in
units (messages, billing increments) or in credits. A tenant sets default limits; an
account's own limit for a (feature, period) wins over the tenant's; an exempt account
has none. Unlimited accounts respect limits unless exempt.

Where each part lives:
- the tenant's limits: the config store (usage_limits), held here in a `LimitBook`
  reloaded with the keys and rates (domain/configuration.py);
- an account's own limits, time zone, exemption and its counters: the account's hash,
  changed only by the scripts (storage/limits.py spells the fields);
- the decision: the scripts, atomically with the balance (usage limits in _lib.lua).
  Every metering call carries the tenant's rules and the bounds of the current day,
  week and month in the time zone the server believes the account has; a script that
  finds another zone on the account refuses with WRONG_TIME_ZONE before changing
  anything, and the call is made again with that zone (`Limits.run`), which the server
  then remembers. A period's counter restarts when a charge finds a later period start
  than the one it counted in: usage resets at the boundary without a sweep.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from enum import StrEnum
from functools import lru_cache
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from creditmeter.constants import LIMIT_ZONE_CACHE_SIZE, MAX_CREDITS, MAX_TIME_ZONE_LENGTH
from creditmeter.domain.recharge import RechargeBook
from creditmeter.domain.validation import Violations
from creditmeter.errors import Rejected
from creditmeter.storage.config_store import LimitRow
from creditmeter.storage.limits import (
    WRONG_TIME_ZONE,
    Counter,
    LimitArgs,
    OwnLimit,
    encode_rules,
    encode_windows,
)

T = TypeVar("T")


class LimitPeriod(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


class LimitUnit(StrEnum):
    #: Units charged: messages, or billing increments of a time feature.
    UNITS = "units"
    CREDITS = "credits"


@dataclass(frozen=True)
class UsageLimit:
    feature: str
    period: LimitPeriod
    #: The most units (or credits) the feature may use in one period; 0 blocks it.
    limit: int
    unit: LimitUnit
    #: When it was last set (ms); None for an account's own limit (the ledger has it).
    updated_ms: int | None = None


@dataclass(frozen=True)
class LimitStatus:
    """A limit as it applies to one account now (GetUsage, ListUsageLimits)."""

    limit: UsageLimit
    #: True for the account's own limit, False for the tenant's.
    own: bool
    #: Usage counted in the current period, in the limit's unit.
    used: int
    #: What open call sessions hold against the limit, in its unit.
    reserved: int
    period_start_ms: int
    period_end_ms: int


# --- periods ---------------------------------------------------------------------------
def zone_info(zone: str) -> tzinfo:
    return UTC if not zone else _zone(zone)


@lru_cache(maxsize=512)
def _zone(zone: str) -> ZoneInfo:
    return ZoneInfo(zone)


def check_time_zone(zone: str, v: Violations, field: str = "time_zone") -> str:
    """A time zone name as stored ('' for UTC); adds a violation for an unknown one."""
    if zone in ("", "UTC", "Etc/UTC"):
        return ""
    if len(zone) > MAX_TIME_ZONE_LENGTH or zone.startswith(("/", ".")) or ".." in zone:
        v.add(field, "must be an IANA time zone name such as Europe/Paris, or empty for UTC")
        return zone
    try:
        _zone(zone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        v.add(field, f"unknown time zone {zone!r}: use an IANA name such as Europe/Paris")
    return zone


def _start(day: date, tz: tzinfo) -> int:
    return int(datetime.combine(day, time(0), tz).timestamp() * 1000)


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


def period_bounds(zone: str, now_ms: int) -> dict[LimitPeriod, tuple[int, int]]:
    """Start and end (ms, end excluded) of the day, week and month holding `now_ms` in
    the zone ('' = UTC): calendar periods, weeks from Monday, at local midnight."""
    tz = zone_info(zone)
    today = datetime.fromtimestamp(now_ms / 1000, tz).date()
    monday = today - timedelta(days=today.weekday())
    first = today.replace(day=1)
    return {
        LimitPeriod.DAY: (_start(today, tz), _start(today + timedelta(days=1), tz)),
        LimitPeriod.WEEK: (_start(monday, tz), _start(monday + timedelta(days=7), tz)),
        LimitPeriod.MONTH: (_start(first, tz), _start(_next_month(first), tz)),
    }


class _Windows:
    """The encoded bounds per zone, kept until the soonest of them ends."""

    def __init__(self) -> None:
        self._cached: dict[str, tuple[int, int, str]] = {}

    def get(self, zone: str, now_ms: int) -> str:
        hit = self._cached.get(zone)
        if hit is not None and hit[0] <= now_ms < hit[1]:
            return hit[2]
        bounds = period_bounds(zone, now_ms)
        flat = [b for period in LimitPeriod for b in bounds[period]]
        valid_from = max(start for start, _ in bounds.values())
        valid_until = min(end for _, end in bounds.values())
        encoded = encode_windows(flat)
        if len(self._cached) > 1024:
            self._cached.clear()
        self._cached[zone] = (valid_from, valid_until, encoded)
        return encoded


_PERIOD_ORDER = {period: i for i, period in enumerate(LimitPeriod)}


def _in_order(limit: UsageLimit) -> tuple[str, int]:
    """Limits by feature, then period (day, week, month)."""
    return limit.feature, _PERIOD_ORDER[limit.period]


def applying(
    tenant_limits: Iterable[UsageLimit], own: Iterable[OwnLimit], exempt: bool
) -> list[tuple[UsageLimit, bool]]:
    """The limits that apply to an account, each with whether it is the account's own: the
    rule limit_state of _lib.lua enforces (none when exempt; an own limit wins over the
    tenant's for its feature and period), by feature then period."""
    if exempt:
        return []
    found: dict[tuple[str, LimitPeriod], tuple[UsageLimit, bool]] = {
        (limit.feature, limit.period): (limit, False) for limit in tenant_limits
    }
    for o in own:
        period = LimitPeriod(o.period)
        limit = UsageLimit(o.feature, period, o.limit, LimitUnit(o.measure))
        found[o.feature, period] = (limit, True)
    return sorted(found.values(), key=lambda item: _in_order(item[0]))


# --- the tenant's limits ---------------------------------------------------------------
class LimitBook:
    """Every tenant's limits, held in memory and replaced whole on reload."""

    def __init__(self, limits: Iterable[tuple[str, UsageLimit]] = ()) -> None:
        self._limits: dict[str, dict[tuple[str, LimitPeriod], UsageLimit]] = {}
        self._rules: dict[tuple[str, str | None], str] = {}
        self.replace(limits)

    def replace(self, limits: Iterable[tuple[str, UsageLimit]]) -> None:
        book: dict[str, dict[tuple[str, LimitPeriod], UsageLimit]] = {}
        for tenant, limit in limits:
            book.setdefault(tenant, {})[limit.feature, limit.period] = limit
        self._limits = book
        self._rules = {}

    def put(self, tenant: str, limit: UsageLimit) -> None:
        self._limits.setdefault(tenant, {})[limit.feature, limit.period] = limit
        self._rules = {}

    def remove(self, tenant: str, feature: str, period: LimitPeriod) -> None:
        self._limits.get(tenant, {}).pop((feature, period), None)
        self._rules = {}

    def of(self, tenant: str) -> list[UsageLimit]:
        """The tenant's limits, by feature then period."""
        return sorted(self._limits.get(tenant, {}).values(), key=_in_order)

    def get(self, tenant: str, feature: str, period: LimitPeriod) -> UsageLimit | None:
        return self._limits.get(tenant, {}).get((feature, period))

    def rules(self, tenant: str, feature: str | None) -> str:
        """The scripts' rules argument: the tenant's limits on `feature` (None: on every
        feature, for session steps, whose feature the script knows)."""
        key = (tenant, feature)
        encoded = self._rules.get(key)
        if encoded is None:
            encoded = encode_rules(
                (limit.feature, str(limit.period), limit.limit, str(limit.unit))
                for limit in self.of(tenant)
                if feature is None or limit.feature == feature
            )
            self._rules[key] = encoded
        return encoded


def from_rows(rows: Iterable[LimitRow]) -> list[tuple[str, UsageLimit]]:
    """The config store's rows as (tenant, limit), what a LimitBook holds."""
    return [
        (r.tenant, UsageLimit(r.feature, LimitPeriod(r.period), r.max_usage, LimitUnit(r.unit),
                              r.updated_ms))
        for r in rows
    ]  # fmt: skip


# --- per call --------------------------------------------------------------------------
class Limits:
    """What metering and sessions need of the limits for each script call: its limit
    args (with the tenant's default recharge policy), and the retry in the account's own
    time zone."""

    def __init__(self, book: LimitBook | None = None) -> None:
        self.book = book or LimitBook()
        #: The tenants' default recharge policies, which ride with the limit args.
        self.recharges = RechargeBook()
        self._windows = _Windows()
        #: (tenant, account) -> time zone, for accounts not in UTC, learned from the
        #: scripts (least recently used forgotten first).
        self._zones: OrderedDict[tuple[str, str], str] = OrderedDict()

    def zone(self, tenant: str, account: str) -> str:
        return self._zones.get((tenant, account), "") if self._zones else ""

    def args(self, tenant: str, account: str, feature: str | None, now_ms: int) -> LimitArgs:
        zone = self.zone(tenant, account)
        return LimitArgs(
            self.book.rules(tenant, feature), zone, self._windows.get(zone, now_ms),
            self.recharges.arg(tenant),
        )  # fmt: skip

    def learn(self, tenant: str, account: str, zone: str) -> None:
        key = (tenant, account)
        if not zone:
            self._zones.pop(key, None)
            return
        self._zones[key] = zone
        self._zones.move_to_end(key)
        while len(self._zones) > LIMIT_ZONE_CACHE_SIZE:
            self._zones.popitem(last=False)

    def learned(self, tenant: str, account: str, rejected: Rejected) -> bool:
        """Whether `rejected` is a script's WRONG_TIME_ZONE (then its zone is learned: the
        call is to be made again with new limit args)."""
        if rejected.reason != WRONG_TIME_ZONE:
            return False
        self.learn(tenant, account, rejected.metadata.get("time_zone", ""))
        return True

    async def run(
        self,
        tenant: str,
        account: str,
        feature: str | None,
        now_ms: int,
        call: Callable[[LimitArgs], Awaitable[T]],
    ) -> T:
        """`call(limit args)`, made again once in the account's own zone if it had
        another than the one assumed."""
        try:
            return await call(self.args(tenant, account, feature, now_ms))
        except Rejected as rejected:
            if not self.learned(tenant, account, rejected):
                raise
        return await call(self.args(tenant, account, feature, now_ms))


def check_limit(
    feature: str, period: LimitPeriod | None, limit: int | None, v: Violations, prefix: str
) -> None:
    v.feature(feature, f"{prefix}.feature")
    if period is None:
        v.add(f"{prefix}.period", "must be day, week or month")
    if limit is not None and not 0 <= limit <= MAX_CREDITS:
        v.add(f"{prefix}.limit", "must be from 0 to 2^53-1")


def status(
    limit: UsageLimit,
    own: bool,
    counter: Counter | None,
    bounds: dict[LimitPeriod, tuple[int, int]],
) -> LimitStatus:
    """A limit's standing from its counter (None: nothing counted yet)."""
    start, end = bounds[limit.period]
    used = reserved = 0
    if counter is not None:
        credits = limit.unit is LimitUnit.CREDITS
        if counter.start_ms == start:
            used = counter.credits if credits else counter.units
        reserved = counter.held_credits if credits else counter.held_units
    return LimitStatus(limit, own, used, reserved, start, end)
