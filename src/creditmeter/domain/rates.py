"""The rate card: feature -> credits per unit, and how usage turns into units."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from creditmeter.constants import (
    BUILTIN_COUNT_FEATURES,
    BUILTIN_TIME_FEATURES,
    DEFAULT_BILLING_INCREMENT_S,
)


class RateUnit(StrEnum):
    COUNT = "count"
    TIME = "time"


@dataclass(frozen=True)
class Rate:
    feature: str
    credits_per_unit: int
    unit: RateUnit
    billing_increment_s: int
    builtin: bool
    updated_ms: int | None = None

    def units(self, quantity: int) -> int:
        """Units charged for a quantity: a count as is, seconds rounded up to increments."""
        if self.unit is RateUnit.TIME:
            return -(-quantity // self.billing_increment_s)
        return quantity


def builtin_rates() -> dict[str, Rate]:
    card = {
        f: Rate(f, price, RateUnit.COUNT, 0, True) for f, price in BUILTIN_COUNT_FEATURES.items()
    }
    card.update(
        (f, Rate(f, price, RateUnit.TIME, DEFAULT_BILLING_INCREMENT_S, True))
        for f, price in BUILTIN_TIME_FEATURES.items()
    )
    return card


def is_builtin(feature: str) -> bool:
    return feature in BUILTIN_COUNT_FEATURES or feature in BUILTIN_TIME_FEATURES


class RateBook:
    """Every tenant's rate card, held in memory and replaced whole on reload."""

    def __init__(self, cards: dict[str, dict[str, Rate]] | None = None) -> None:
        self._cards = cards or {}
        self._builtin = builtin_rates()

    def card(self, tenant: str) -> dict[str, Rate]:
        """The tenant's rate card: built-in defaults overlaid with what it has set."""
        return {**self._builtin, **self._cards.get(tenant, {})}

    def get(self, tenant: str, feature: str) -> Rate | None:
        return self._cards.get(tenant, {}).get(feature) or self._builtin.get(feature)

    def replace(self, cards: dict[str, dict[str, Rate]]) -> None:
        self._cards = cards

    def put(self, tenant: str, rate: Rate) -> None:
        self._cards.setdefault(tenant, {})[rate.feature] = rate
