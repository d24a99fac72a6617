"""Usage limits as Redis holds them: the arguments every metering script takes and the
account hash's limit fields (the format is in _lib.lua, "usage limits").

The rules themselves (which periods, how counted, what a period is in a time zone) are
the domain's (creditmeter.domain.limits); this module only spells them for the scripts
and reads back what the scripts wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: Periods and measures, by name (the domain's enums' values), as the scripts spell them.
PERIOD_CODES = {"day": "d", "week": "w", "month": "m"}
MEASURE_CODES = {"units": "u", "credits": "c"}
_PERIOD_NAMES = {code: name for name, code in PERIOD_CODES.items()}
_MEASURE_NAMES = {code: name for name, code in MEASURE_CODES.items()}

#: Account hash fields: its own limits (`L:<feature>:<period>`), their count, its time
#: zone, its exemption, and the counters (`U:<feature>:<period>`).
OWN_LIMIT = "L:"
OWN_LIMITS_COUNT = "limits"
TIME_ZONE = "tz"
EXEMPT = "nolimits"
COUNTER = "U:"

#: The refusal reason of a script that found the account in another time zone than the
#: one its limit args assumed (metadata: time_zone); nothing was changed.
WRONG_TIME_ZONE = "TIME_ZONE"


@dataclass(frozen=True, slots=True)
class LimitArgs:
    """The four limit arguments of consume, check and session steps: the tenant's rules
    for the call (its usage limits in `rules`, `zone` and `windows`, and its default
    recharge policy; see creditmeter.storage.recharge)."""

    #: "<feature>:<period>:<max>:<measure>,...": the tenant's limits ('' = none).
    rules: str
    #: The time zone the windows are in ('' = UTC).
    zone: str
    #: "<day start>,<day end>,<week start>,<week end>,<month start>,<month end>" (ms).
    windows: str
    #: "<threshold>:<pack id>": the tenant's default recharge policy ('' = none).
    recharge: str = ""

    def argv(self) -> list[str]:
        return [self.rules, self.zone, self.windows, self.recharge]


def encode_rules(rules: Iterable[tuple[str, str, int, str]]) -> str:
    """(feature, period name, max, measure name) tuples as the scripts' rules argument."""
    return ",".join(
        f"{feature}:{PERIOD_CODES[period]}:{limit}:{MEASURE_CODES[measure]}"
        for feature, period, limit, measure in rules
    )


def encode_windows(bounds: Sequence[int]) -> str:
    """Start and end (ms) of the day, week and month of now, in that order."""
    assert len(bounds) == 6, bounds
    return ",".join(str(b) for b in bounds)


def own_limit_args(period: str, limit: int | None, measure: str) -> list[str]:
    """set_limit.lua's period, max ('' removes) and measure arguments."""
    return [PERIOD_CODES[period], "" if limit is None else str(limit), MEASURE_CODES[measure]]


@dataclass(frozen=True)
class OwnLimit:
    """An account's own limit (an `L:` field): feature, period and measure by name."""

    feature: str
    period: str
    limit: int
    measure: str


@dataclass(frozen=True)
class Counter:
    """A limit counter (a `U:` field): usage in the period starting at `start_ms`, and
    what open sessions hold against the limit."""

    feature: str
    period: str
    start_ms: int
    units: int
    credits: int
    held_units: int
    held_credits: int


def _feature_period(name: str, prefix: str) -> tuple[str, str]:
    feature, _, code = name[len(prefix) :].rpartition(":")
    return feature, _PERIOD_NAMES[code]


def own_limits(fields: Mapping[str, str]) -> list[OwnLimit]:
    """The account's own limits, from its hash."""
    if OWN_LIMITS_COUNT not in fields:
        return []
    out = []
    for name, value in fields.items():
        if name.startswith(OWN_LIMIT):
            feature, period = _feature_period(name, OWN_LIMIT)
            limit, _, code = value.partition(":")
            out.append(OwnLimit(feature, period, int(limit), _MEASURE_NAMES[code]))
    return out


def counters(fields: Mapping[str, str]) -> dict[tuple[str, str], Counter]:
    """The account's limit counters by (feature, period name), from its hash."""
    out = {}
    for name, value in fields.items():
        if name.startswith(COUNTER):
            feature, period = _feature_period(name, COUNTER)
            start, units, credits, held_units, held_credits = (int(v) for v in value.split())
            out[feature, period] = Counter(
                feature, period, start, units, credits, held_units, held_credits
            )
    return out


def counter_field(c: Counter) -> tuple[str, str]:
    """A counter as its field name and value (what a rebuild writes back)."""
    return (
        f"{COUNTER}{c.feature}:{PERIOD_CODES[c.period]}",
        f"{c.start_ms} {c.units} {c.credits} {c.held_units} {c.held_credits}",
    )


def own_limit_field(own: OwnLimit) -> tuple[str, str]:
    """An account's own limit as its field name and value (what a rebuild writes back)."""
    return (
        f"{OWN_LIMIT}{own.feature}:{PERIOD_CODES[own.period]}",
        f"{own.limit}:{MEASURE_CODES[own.measure]}",
    )


def time_zone(fields: Mapping[str, str]) -> str:
    """The account's time zone ('' = UTC)."""
    return fields.get(TIME_ZONE, "")


def exempt(fields: Mapping[str, str]) -> bool:
    return fields.get(EXEMPT) == "1"


#: Limit args that carry no tenant limit, for callers that know none applies (the
#: benchmarks' accounts): an account's own limits would still count, in windows at 0.
NO_LIMITS = LimitArgs("", "", "0,0,0,0,0,0")


# --- the ledger's record of them ------------------------------------------------------
def limit_event(feature: str, amount: int, reference: str) -> tuple[str, str, OwnLimit | None]:
    """A `usage_limit` event's (feature, period name, the limit set or None when it was
    removed): set_limit.lua writes the limit in `amount` and "<period>:<measure>" (no
    measure: removed) in `reference`."""
    code, _, measure = reference.partition(":")
    period = _PERIOD_NAMES[code]
    if not measure:
        return feature, period, None
    return feature, period, OwnLimit(feature, period, amount, _MEASURE_NAMES[measure])


def options_event(reference: str) -> tuple[str, bool]:
    """An `options` event's time zone and exemption, which set_options.lua writes in its
    reference as JSON ('' before usage limits: UTC, not exempt)."""
    if not reference:
        return "", False
    found = json.loads(reference)
    return str(found.get("tz", "")), found.get("nolimits") == "1"


def options_overdraft(reference: str) -> int:
    """An `options` event's overdraft limit (absent before the credit line, and on an
    account without one: 0)."""
    if not reference:
        return 0
    return int(json.loads(reference).get("overdraft", "0"))
