"""An account's figures as its hash holds them (see the fields in _lib.lua): the running
totals granted, used, expired, removed, refunded, per feature `used:<feature>` (credits)
and `units:<feature>`; and whether it is unlimited and what sessions hold. The domain
reads them through these functions (and a rebuild writes them through `totals_fields`),
never by field name."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: The prefixes of the per-feature fields.
USED = "used:"
UNITS = "units:"


@dataclass(frozen=True)
class Totals:
    granted: int
    used: int
    expired: int
    removed: int
    refunded: int
    #: feature -> (credits, units) charged, by feature name.
    features: dict[str, tuple[int, int]]

    def counts(self) -> dict[str, int]:
        """The five running totals by name (granted, used, expired, removed, refunded)."""
        return {
            "granted": self.granted, "used": self.used, "expired": self.expired,
            "removed": self.removed, "refunded": self.refunded,
        }  # fmt: skip


def totals(fields: Mapping[str, str]) -> Totals:
    def n(name: str) -> int:
        return int(fields.get(name, "0"))

    features = {
        name[len(USED) :]: (int(value), n(UNITS + name[len(USED) :]))
        for name, value in sorted(fields.items())
        if name.startswith(USED)
    }
    return Totals(n("granted"), n("used"), n("expired"), n("removed"), n("refunded"), features)


def totals_fields(t: Totals) -> dict[str, str]:
    """The account fields of `t`, as `totals` reads them back."""
    fields = {name: str(n) for name, n in t.counts().items()}
    for feature, (credits, units) in t.features.items():
        fields[USED + feature] = str(credits)
        fields[UNITS + feature] = str(units)
    return fields


def unlimited(fields: Mapping[str, str]) -> bool:
    return fields.get("unlimited") == "1"


def reserved(fields: Mapping[str, str]) -> int:
    """Credit held by open call sessions."""
    return int(fields.get("reserved", "0"))
