"""The running server's view of the config store: keys, rate cards and the tenants' usage
limits, reloaded when the
store's version changes (a key created or revoked by the CLI, or a rate set through
another server sharing the store, takes effect within a second).

While the store does not answer (a PostgreSQL store during an outage), the server keeps
the configuration it last loaded; one that starts meanwhile serves the store's last known
configuration (`ConfigStore.last_known`), as it would have kept it had it been running."""

from __future__ import annotations

import asyncio
import logging

from creditmeter.domain.keys import ApiKey, KeyRing, Role
from creditmeter.domain.limits import Limits, from_rows
from creditmeter.domain.rates import Rate, RateBook, RateUnit, is_builtin
from creditmeter.errors import BackendUnavailable
from creditmeter.storage.config_store import ConfigSnapshot, ConfigStore

log = logging.getLogger(__name__)


class LiveConfig:
    def __init__(self, store: ConfigStore) -> None:
        self.store = store
        self.keys = KeyRing()
        self.rates = RateBook()
        self.limits = Limits()
        #: The store's version of what is loaded; None before the first load from the
        #: store itself (also after one from `last_known`: the next answer reloads).
        self._version: int | None = None
        self._reachable = True

    def _apply(self, snapshot: ConfigSnapshot) -> None:
        keys = [
            ApiKey(
                r.key_id, r.tenant, Role(r.role), r.secret_hash, r.label, r.created_ms, r.revoked_ms
            )
            for r in snapshot.api_keys
        ]
        cards: dict[str, dict[str, Rate]] = {}
        for r in snapshot.rates:
            cards.setdefault(r.tenant, {})[r.feature] = Rate(
                r.feature,
                r.credits_per_unit,
                RateUnit(r.unit),
                r.increment_s,
                is_builtin(r.feature),
                r.updated_ms,
            )
        self.keys = KeyRing(keys)
        self.rates.replace(cards)
        self.limits.book.replace(from_rows(snapshot.limits))
        self.limits.recharges.replace(snapshot.recharges)

    async def refresh(self) -> bool:
        """Reload if the store changed since the last load; True if it did. A store that
        does not answer is logged once per outage, not raised."""
        try:
            version = await asyncio.to_thread(self.store.version)
            if version == self._version:
                snapshot = None
            else:
                snapshot = await asyncio.to_thread(self.store.snapshot)
        except BackendUnavailable as error:
            return await self._unreachable(error)
        if not self._reachable:
            log.info("config store reachable again")
            self._reachable = True
        if snapshot is None:
            return False
        self._apply(snapshot)
        self._version = snapshot.version
        return True

    async def _unreachable(self, error: BackendUnavailable) -> bool:
        first, self._reachable = self._reachable, False
        cause = error.__cause__ or error
        if self._version is not None or not first:
            if first:
                log.warning(
                    "config store unreachable (%s): keeping the configuration loaded (version"
                    " %d) until it answers",
                    cause,
                    self._version,
                )
            return False
        known = await asyncio.to_thread(self.store.last_known)
        if known is None:
            log.warning(
                "config store unreachable at start (%s): no API key is accepted until it answers",
                cause,
            )
            return False
        self._apply(known)
        log.warning(
            "config store unreachable at start (%s): serving the configuration last known"
            " here (%d API keys, %d rates) until it answers",
            cause,
            len(known.api_keys),
            len(known.rates),
        )
        return True
