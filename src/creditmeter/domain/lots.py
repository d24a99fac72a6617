"""Lots (grants) and the burn-down order.

Every deduction burns lots in this order: priority ascending, then soonest expiry
(never-expiring last), then promotional credit (bonus, promotion, trial) before the rest,
then oldest first. The order is encoded in a fixed-width string, the burn key, so Redis
keeps lots sorted lexicographically and a script walks them without decoding anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from creditmeter.constants import NEVER_EXPIRES_MS
from creditmeter.storage.layout import BurnKey
from creditmeter.storage.redis_store import LotRecord


class LotSource(StrEnum):
    PURCHASE = "purchase"
    BONUS = "bonus"
    PROMOTION = "promotion"
    TRIAL = "trial"
    MANUAL = "manual"
    REFUND = "refund"
    #: Unused credits of a subscription period carried into the next one.
    ROLLOVER = "rollover"


PROMOTIONAL = frozenset({LotSource.BONUS, LotSource.PROMOTION, LotSource.TRIAL})


def burn_key(
    priority: int, expires_at_ms: int | None, source: LotSource, created_ms: int, lot_id: str
) -> str:
    """The lot's place in the burn-down order (storage.layout.BurnKey spells it): by
    priority, then the soonest expiry, then promotional lots first, then the oldest."""
    expiry = NEVER_EXPIRES_MS if expires_at_ms is None else expires_at_ms
    rank = 0 if source in PROMOTIONAL else 1
    return BurnKey(priority, expiry, rank, created_ms, lot_id).encode()


@dataclass(frozen=True)
class Lot:
    lot_id: str
    amount: int
    remaining: int
    priority: int
    expires_at_ms: int | None
    source: LotSource
    created_ms: int
    reference: str

    @classmethod
    def from_record(cls, record: LotRecord) -> Lot:
        """The lot as storage read it."""
        return cls(
            lot_id=record.lot_id,
            amount=record.amount,
            remaining=record.remaining,
            priority=record.priority,
            expires_at_ms=record.expires_at_ms,
            source=LotSource(record.source),
            created_ms=record.created_ms,
            reference=record.reference,
        )

    def live(self, now_ms: int) -> bool:
        """Expired credit is never spendable, whether or not its expiry was swept yet."""
        return self.expires_at_ms is None or self.expires_at_ms > now_ms
