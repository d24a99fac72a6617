"""The durable ledger: an append-only table of every balance event, behind one interface
(`base.Ledger`, made of its roles), implemented once in SQL (`sql.SqlLedger`) over a
SQLite and a PostgreSQL backend."""

from __future__ import annotations

from pathlib import Path
from typing import TypeGuard

from creditmeter.constants import LEDGER_DB_NAME
from creditmeter.storage.ledger.base import Ledger


def is_postgres(url: str | None) -> TypeGuard[str]:
    """Whether a `--ledger-url` names a PostgreSQL database."""
    return url is not None and url.startswith(("postgresql://", "postgres://"))


def open_ledger(url: str | None, data_dir: Path) -> Ledger:
    """The ledger for a `--ledger-url` (postgresql://...), or SQLite in the data directory."""
    if is_postgres(url):
        from creditmeter.storage.ledger.postgres import PostgresLedger

        return PostgresLedger(url)
    from creditmeter.storage.ledger.sqlite import SqliteLedger

    path = Path(url.removeprefix("sqlite:///")) if url else data_dir / LEDGER_DB_NAME
    return SqliteLedger(path)
