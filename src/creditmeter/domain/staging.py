"""Money in, ledger first: a grant, a SetBalance that adds, a purchase's lots and a
subscription period are staged in the ledger (staged_grants) before they reach Redis, so
no credit is ever in Redis that the ledger does not know was paid for.

One staged grant is applied by `apply_staged`, with the call that staged it (idempotent:
the same request id, transaction and lot id, so a retry replays the first reply); what
Redis refuses is withdrawn from the ledger. `reconcile` re-applies the ones that never
reached Redis (a server that died between the two writes): every server runs it.
Which script applies a staged grant is its `Operation`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum

from creditmeter.constants import RECONCILE_BATCH, STAGED_GRANT_RETRY_AFTER_MS
from creditmeter.domain.lots import LotSource, burn_key
from creditmeter.errors import Rejected, from_rejection
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import StagedGrant, Staging
from creditmeter.storage.redis_store import (
    Call,
    GrantRecord,
    NewLot,
    RedisStore,
    SetBalanceRecord,
)

log = logging.getLogger(__name__)


class OperationKind(StrEnum):
    #: Grant (and the lots of a purchase, the bonus lot of a period): grant.lua.
    GRANT = "grant"
    #: SetBalance adding credits, and SetBalance with reset: set_balance.lua.
    ADD = "add"
    RESET = "reset"
    #: A subscription period with its rollover: renew.lua (its lots roll over).
    RENEW = "renew"


@dataclass(frozen=True)
class Operation:
    """What applying a staged grant does; a renewal carries its rollover cap. Stored in
    the ledger's staged_grants.operation as "grant", "add", "reset" or "renew:<cap>"."""

    kind: OperationKind
    rollover_cap: int = 0

    @classmethod
    def grant(cls) -> Operation:
        return cls(OperationKind.GRANT)

    @classmethod
    def renew(cls, rollover_cap: int) -> Operation:
        return cls(OperationKind.RENEW, rollover_cap)

    @classmethod
    def parse(cls, stored: str) -> Operation:
        kind, _, cap = stored.partition(":")
        return cls(OperationKind(kind), int(cap) if cap else 0)

    def encode(self) -> str:
        if self.kind is OperationKind.RENEW:
            return f"{self.kind}:{self.rollover_cap}"
        return str(self.kind)


def staged_grant(keys: AccountKeys, call: Call, lot: NewLot, operation: Operation) -> StagedGrant:
    """The staged grant of a lot about to be granted by `call`."""
    return StagedGrant(
        tenant=keys.tenant,
        account=keys.account,
        request_id=call.request_id,
        fingerprint=call.fingerprint,
        txn=call.txn,
        lot_id=lot.lot_id,
        amount=lot.amount,
        priority=lot.priority,
        expires_at_ms=lot.expires_at_ms,
        source=lot.source,
        reference=lot.reference,
        created_ms=call.now_ms,
        operation=operation.encode(),
    )


async def apply_staged(
    store: RedisStore, ledger: Staging, staged: StagedGrant, now_ms: int
) -> GrantRecord | SetBalanceRecord:
    """Apply money-in staged in the ledger to Redis, with the call that staged it.

    Idempotent: it runs under the staged request id, transaction and lot id, so a retry
    (the client's, the reconciler's, or a rebuild's) replays the first reply. A grant Redis
    refuses is withdrawn from the ledger, so it never counts as credit.
    """
    call = Call(now_ms, staged.txn, staged.request_id, staged.fingerprint)
    lot = NewLot(
        lot_id=staged.lot_id,
        amount=staged.amount,
        priority=staged.priority,
        expires_at_ms=staged.expires_at_ms,
        source=staged.source,
        reference=staged.reference,
        burn_key=burn_key(
            staged.priority,
            staged.expires_at_ms,
            LotSource(staged.source),
            staged.created_ms,
            staged.lot_id,
        ),
    )
    keys = AccountKeys(staged.tenant, staged.account)
    operation = Operation.parse(staged.operation)
    try:
        if operation.kind is OperationKind.GRANT:
            return await store.grant(keys, call, lot)
        if operation.kind is OperationKind.RENEW:
            # The rollover lot's id derives from the period lot's, so a retry names the
            # same lot.
            rollover_id = f"{staged.lot_id}r"
            rollover = replace(
                lot,
                lot_id=rollover_id,
                source=str(LotSource.ROLLOVER),
                burn_key=burn_key(
                    staged.priority,
                    staged.expires_at_ms,
                    LotSource.ROLLOVER,
                    staged.created_ms,
                    rollover_id,
                ),
            )
            return await store.renew(keys, call, lot, operation.rollover_cap, rollover)
        return await store.set_balance(keys, call, operation.kind is OperationKind.RESET, lot)
    except Rejected as rejected:
        await ledger.withdraw_grant(staged)
        raise from_rejection(rejected) from None


async def reconcile(store: RedisStore, ledger: Staging, now_ms: int) -> int:
    """Re-apply money-in staged in the ledger that never reached Redis (staged more than
    STAGED_GRANT_RETRY_AFTER_MS ago with no event of its grant); returns how many."""
    found = await ledger.unapplied_grants(now_ms - STAGED_GRANT_RETRY_AFTER_MS, RECONCILE_BATCH)
    for staged in found:
        log.warning("re-applying staged grant %s", staged.lot_id)
        await apply_staged(store, ledger, staged, now_ms)
    return len(found)
