"""The configuration store: tenants, API keys, rate cards, usage limits, packs, webhook
endpoints and config-change requests, behind one interface (`base.ConfigStore`),
implemented once in SQL (`sql.SqlConfigStore`) over a SQLite and a PostgreSQL backend."""

from __future__ import annotations

from pathlib import Path

from creditmeter.constants import CONFIG_DB_NAME
from creditmeter.storage.config_store.base import (
    ConfigDump,
    ConfigSnapshot,
    ConfigStore,
    KeyRow,
    LimitRow,
    RateRow,
    RechargeRow,
    Request,
)
from creditmeter.storage.ledger import is_postgres

__all__ = [
    "ConfigDump",
    "ConfigSnapshot",
    "ConfigStore",
    "KeyRow",
    "LimitRow",
    "RateRow",
    "RechargeRow",
    "Request",
    "open_config_store",
]


def open_config_store(ledger_url: str | None, data_dir: Path) -> ConfigStore:
    """The config store beside the ledger: with a PostgreSQL ledger (`--ledger-url
    postgresql://...`) in that database, shared by every server on it; otherwise SQLite in
    the data directory."""
    if is_postgres(ledger_url):
        from creditmeter.storage.config_store.postgres import PostgresConfigStore

        return PostgresConfigStore(ledger_url, data_dir)
    from creditmeter.storage.config_store.sqlite import SqliteConfigStore

    return SqliteConfigStore(data_dir / CONFIG_DB_NAME)
