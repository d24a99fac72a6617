"""The running server's view of the config store: keys and rate cards, reloaded when the
store's version changes (a key created or revoked by the CLI takes effect within a second)."""

from __future__ import annotations

import asyncio

from creditmeter.domain.keys import ApiKey, KeyRing, Role
from creditmeter.domain.rates import Rate, RateBook, RateUnit, is_builtin
from creditmeter.storage.config_store import ConfigStore


class LiveConfig:
    def __init__(self, store: ConfigStore) -> None:
        self.store = store
        self.keys = KeyRing()
        self.rates = RateBook()
        self._version = -1

    def _load(self) -> tuple[KeyRing, dict[str, dict[str, Rate]]]:
        keys = [
            ApiKey(
                r.key_id, r.tenant, Role(r.role), r.secret_hash, r.label, r.created_ms, r.revoked_ms
            )
            for r in self.store.api_keys()
        ]
        cards: dict[str, dict[str, Rate]] = {}
        for r in self.store.rates():
            cards.setdefault(r.tenant, {})[r.feature] = Rate(
                r.feature,
                r.credits_per_unit,
                RateUnit(r.unit),
                r.increment_s,
                is_builtin(r.feature),
                r.updated_ms,
            )
        return KeyRing(keys), cards

    async def refresh(self) -> bool:
        """Reload if the store changed since the last load; True if it did."""
        version = await asyncio.to_thread(self.store.version)
        if version == self._version:
            return False
        keys, cards = await asyncio.to_thread(self._load)
        self.keys = keys
        self.rates.replace(cards)
        self._version = version
        return True
