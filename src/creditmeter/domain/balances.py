"""The balance an account reports: the one definition of spendable credit.

An account's credit lives in its lots (acct.balance in Redis: grants less charges,
expiries, resets and refunds). Open call sessions hold some of it (acct.reserved): held
credit stays in the lots, but neither Consume nor another session may spend it. Every
figure the API reports as a balance or as remaining credit (the answers of Grant,
Consume, SetBalance, VoidGrant, the session steps and purchases, GetBalance,
GetUsage.remaining) and the balances that WatchBalance alerts follow are the spendable
credit defined here.

An account with a credit line (an overdraft limit) may be charged past its lots, down to
-limit: the part past the lots is its debt, and every grant or purchase repays the debt
before any of it becomes spendable. The balance reported stays the spendable credit
(never below 0, -1 meaning unlimited) and the debt is reported beside it: what is left
of the credit line is limit - debt (less what sessions hold past the lots).

The scripts apply the same rule when they charge or hold credit (`available()` in
_lib.lua), since that check has to be atomic with the change; what they report are the
raw figures (`Holdings`), turned into the reported balance here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from creditmeter.domain.lots import Lot
from creditmeter.errors import AccountNotFound
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.redis_store import AccountSnapshot, Holdings, RedisStore

#: What an unlimited account reports for its balance (and GetUsage for its total).
UNLIMITED = -1


def spendable(credit: int, reserved: int, unlimited: bool) -> int:
    """Credit the account can spend: its credit in live lots (less its debt) less what
    open call sessions hold, never below 0; -1 for an unlimited account.

    Held credit can exceed what is left when a held lot expires or is voided during the
    call (the session then reports what it could not collect): the balance is 0 then.
    """
    if unlimited:
        return UNLIMITED
    return max(0, credit - reserved)


def after(holdings: Holdings) -> int:
    """The spendable balance a script left: what the RPC that ran it answers."""
    return spendable(holdings.balance, holdings.reserved, holdings.unlimited)


@dataclass(frozen=True)
class AccountRead:
    """An account as Redis holds it: its live lots in burn-down order, and the rest of
    what storage read (`snap`: its options, totals, credit line and limits, typed)."""

    lots: list[Lot]
    snap: AccountSnapshot

    @property
    def unlimited(self) -> bool:
        return self.snap.unlimited

    @property
    def reserved(self) -> int:
        """Credit held by open call sessions."""
        return self.snap.reserved

    @property
    def debt(self) -> int:
        """Credits charged past the lots on the credit line, not yet repaid."""
        return self.snap.debt

    @property
    def overdraft_limit(self) -> int:
        """How far past its lots the account may be charged (0: no credit line)."""
        return self.snap.overdraft_limit

    @property
    def balance(self) -> int:
        """The spendable balance now."""
        credit = sum(lot.remaining for lot in self.lots) - self.debt
        return spendable(credit, self.reserved, self.unlimited)


async def read(store: RedisStore, keys: AccountKeys, now_ms: int) -> AccountRead:
    """Read an account (one consistent snapshot); AccountNotFound if it has no state.

    Lots already expired but not swept yet are left out: expired credit is never spendable.
    """
    snap = await store.snapshot(keys)
    if not snap.exists:
        raise AccountNotFound.of(keys.account)
    lots = [lot for lot in map(Lot.from_record, snap.lots) if lot.live(now_ms)]
    return AccountRead(lots, snap)
