"""Automatic recharge: "when a balance falls below 100 credits, offer the 500-credit pack".

A recharge policy is a threshold and (optionally) a one-time pack. A tenant sets a
default for every account; an account's own policy wins over it, or turns recharges off
for the account. When a change takes an account's spendable balance from at or above
the threshold to below it -- a crossing -- the script that made the change records one
`recharge_due` event (recharges in _lib.lua): exactly one per crossing whatever races,
since each script call is atomic and sees the balance before and after it; a new
crossing needs the balance back at or above the threshold first.

Where each part lives:
- the tenant's defaults: the config store (recharge_policies), held here in a
  `RechargeBook` reloaded with the keys, rates and limits (domain/configuration.py) and
  handed to the scripts that charge (consume, session steps) as the fourth limit arg;
- an account's own policy: its hash (`R`, storage/recharge.py), set by set_recharge.lua,
  whose `recharge_policy` event keeps it in the ledger for a rebuild;
- the crossing: the `recharge_due` event, in the outbox (WatchBalance sends it as a
  RECHARGE_DUE alert) and then in the ledger (history);
- the pending purchase: `RechargePurchases`, a worker of every server, reads the
  ledger's recent `recharge_due` events and creates one pending purchase of the policy's
  pack per event, its request id derived from the event (so any number of servers and
  restarts create it once); the platform completes it with its payment provider.

The scripts that charge (consume, session steps) and the expiry sweeper's are given the
tenant's default; a crossing made by another (a reset, a refund, a voided grant) counts
only an account's own policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from creditmeter.constants import (
    MAX_CREDITS,
    RECHARGE_BATCH,
    RECHARGE_LOOKBACK_MS,
    RECHARGE_RECENT_MS,
    RECHARGE_SWEEP_S,
)
from creditmeter.domain.clock import Clock
from creditmeter.domain.ids import fingerprint
from creditmeter.domain.packs import Catalog, Sale
from creditmeter.domain.validation import Violations
from creditmeter.errors import CreditError, PackNotActive, PackNotFound, applied
from creditmeter.storage.config_store import ConfigStore, RechargeRow
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import Event, EventLog
from creditmeter.storage.recharge import (
    DUE_KIND,
    POLICY_KIND,
    OwnPolicy,
    Policy,
    encode,
    policy_event,
)
from creditmeter.storage.redis_store import Call, RedisStore

log = logging.getLogger(__name__)

#: What makes a script call (Metering._call), and what creates a pending purchase
#: (Purchases.create: tenant, account, pack id, request id).
CallMaker = Callable[..., Call]
CreatePurchase = Callable[[str, str, str, str], Awaitable[object]]


@dataclass(frozen=True)
class RechargePolicy:
    """A threshold and a pack ('' = none); `updated_ms` for the tenant's default."""

    threshold: int
    pack_id: str
    updated_ms: int | None = None


@dataclass(frozen=True)
class Applying:
    """The policy that applies to an account (or the tenant's default): None when none
    does; `account_override` when it is the account's own; `disabled` when the account
    turned recharges off."""

    policy: RechargePolicy | None
    account_override: bool = False
    disabled: bool = False


def applying(tenant_default: RechargePolicy | None, own: OwnPolicy | None) -> Applying:
    """The rule recharge_watch of _lib.lua applies: the account's own setting wins."""
    if own is None:
        return Applying(tenant_default)
    if own.policy is None:
        return Applying(None, account_override=True, disabled=True)
    return Applying(RechargePolicy(own.policy.threshold, own.policy.pack_id), True)


class RechargeBook:
    """Every tenant's default policy, held in memory and replaced whole on reload."""

    def __init__(self) -> None:
        self._defaults: dict[str, RechargePolicy] = {}
        self._encoded: dict[str, str] = {}

    def replace(self, rows: list[RechargeRow]) -> None:
        self._defaults, self._encoded = {}, {}
        for r in rows:
            self.put(r.tenant, RechargePolicy(r.threshold, r.pack_id, r.updated_ms))

    def put(self, tenant: str, policy: RechargePolicy | None) -> None:
        if policy is None:
            self._defaults.pop(tenant, None)
            self._encoded.pop(tenant, None)
        else:
            self._defaults[tenant] = policy
            self._encoded[tenant] = encode(Policy(policy.threshold, policy.pack_id))

    def of(self, tenant: str) -> RechargePolicy | None:
        return self._defaults.get(tenant)

    def arg(self, tenant: str) -> str:
        """The scripts' recharge argument: the tenant's default ('' = none)."""
        return self._encoded.get(tenant, "")


class Recharges:
    """SetRechargePolicy and GetRechargePolicy."""

    def __init__(
        self,
        store: RedisStore,
        config: ConfigStore,
        catalog: Catalog,
        book: RechargeBook,
        clock: Clock,
        call: CallMaker,
    ) -> None:
        self.store = store
        self.config = config
        self.catalog = catalog
        self.book = book
        self.clock = clock
        self._call = call

    async def _check_pack(self, tenant: str, pack_id: str, v: Violations) -> None:
        """A policy's pack must be one CreatePurchase sells: one-time, active, no trial."""
        if not pack_id or v.items:
            return
        try:
            await self.catalog.for_sale(tenant, pack_id, Sale.RECHARGE, v, "policy.pack_id")
        except (PackNotFound, PackNotActive) as refused:  # here a field's fault, not a state
            v.add("policy.pack_id", refused.message)

    async def set_policy(
        self,
        tenant: str,
        account_id: str,
        *,
        threshold: int,
        pack_id: str,
        remove: bool,
        disable: bool,
        request_id: str,
    ) -> Applying:
        """Set the tenant's default (account id empty) or the account's own policy;
        `remove` removes it, `disable` (accounts only) turns recharges off. Returns what
        applies afterwards."""
        v = Violations()
        if account_id:
            v.account_id(account_id)
        elif disable:
            v.add("disable", "only an account's recharges can be disabled")
        v.request_id(request_id)
        if remove and disable:
            v.add("disable", "remove or disable, not both")
        setting = not (remove or disable)
        if setting:
            if not 1 <= threshold <= MAX_CREDITS:
                v.add("policy.threshold", "must be from 1 to 2^53-1")
            await self._check_pack(tenant, pack_id, v)
        v.raise_if_any()
        params = {
            "account_id": account_id, "threshold": threshold if setting else 0,
            "pack_id": pack_id if setting else "", "remove": remove, "disable": disable,
        }  # fmt: skip
        if account_id:
            own = None if remove else OwnPolicy(Policy(threshold, pack_id) if setting else None)
            call = self._call("txn", request_id, "SetRechargePolicy", **params)
            await applied(self.store.set_recharge(AccountKeys(tenant, account_id), call, own))
            return applying(self.book.of(tenant), own)
        now = self.clock.now_ms()
        row = RechargeRow(tenant, threshold, pack_id, now) if setting else None
        req = ConfigStore.Request(
            tenant, request_id, fingerprint("SetRechargePolicy", params), now,
            self.store.idempotency_ttl_s * 1000,
        )  # fmt: skip
        stored, replayed = await applied(
            asyncio.to_thread(self.config.set_recharge_policy, tenant, row, req)
        )
        policy = None if row is None else RechargePolicy(threshold, pack_id, int(stored))
        if not replayed:
            self.book.put(tenant, policy)
        return Applying(policy)

    async def get_policy(self, tenant: str, account_id: str) -> Applying:
        """The tenant's default, or what applies to the account (its own winning)."""
        if not account_id:
            return Applying(self.book.of(tenant))
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        snap = await self.store.snapshot(AccountKeys(tenant, account_id))
        return applying(self.book.of(tenant), snap.own_policy)


def recharge_pack(kind: str, reference: str) -> str:
    """The pack a history entry names: a crossing's, or that of an own policy set."""
    if kind == DUE_KIND:
        return reference
    if kind == POLICY_KIND:
        own = policy_event(0, reference)
        return "" if own is None or own.policy is None else own.policy.pack_id
    return ""


# --- the pending purchases -------------------------------------------------------------
def purchase_request_id(event: Event) -> str:
    """The request id of the pending purchase of a crossing: derived from its event, so
    every server, restart and retry creates the same one purchase."""
    return f"recharge:{event.txn}"


class RechargePurchases:
    """Creates the pending purchase of each crossing whose policy names a pack, from the
    ledger's `recharge_due` events: durable (a crossing in the ledger is never lost, and
    reaches it within the flush lag) and once (the purchase's request id is derived from
    the event, so racing servers, restarts and retries create one). Each pass reads the
    crossings of the last RECHARGE_RECENT_MS with no purchase yet; every
    RECHARGE_SWEEP_S (and at start) it reads back RECHARGE_LOOKBACK_MS, for events a
    ledger outage delayed."""

    def __init__(self, ledger: EventLog, create: CreatePurchase, clock: Clock) -> None:
        self.ledger = ledger
        self.create = create
        self.clock = clock
        #: Events whose purchase could not be made (their pack is no longer for sale),
        #: logged once and not tried again by this process.
        self._failed: set[str] = set()
        self._next_sweep_ms = 0

    async def run_once(self) -> int:
        """One pass; returns the pending purchases created."""
        now = self.clock.now_ms()
        if now >= self._next_sweep_ms:
            since = now - RECHARGE_LOOKBACK_MS
            self._next_sweep_ms = now + int(RECHARGE_SWEEP_S * 1000)
        else:
            since = now - RECHARGE_RECENT_MS
        made = 0
        while True:
            found = await self.ledger.unbought_recharges(since, RECHARGE_BATCH)
            todo = [e for e in found if e.event_id not in self._failed]
            for event in todo:
                try:
                    await self.create(event.tenant, event.account, event.reference,
                                      purchase_request_id(event))  # fmt: skip
                    made += 1
                except CreditError as error:  # e.g. the pack was archived since
                    self._failed.add(event.event_id)
                    log.warning(
                        "recharge of %s/%s: no pending purchase of pack %s: %s",
                        event.tenant, event.account, event.reference, error,
                    )  # fmt: skip
            if len(found) < RECHARGE_BATCH or not todo:
                return made
            since = found[-1].ts_ms
