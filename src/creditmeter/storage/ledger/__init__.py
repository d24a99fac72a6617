"""The durable ledger: an append-only table of every balance event, behind one interface
(`base.Ledger`) with a SQLite and a PostgreSQL backend."""

from __future__ import annotations

from pathlib import Path

from creditmeter.storage.ledger.base import Ledger


def open_ledger(url: str | None, data_dir: Path) -> Ledger:
    """The ledger for a `--ledger-url` (postgresql://...), or SQLite in the data directory."""
    if url and url.startswith(("postgresql://", "postgres://")):
        from creditmeter.storage.ledger.postgres import PostgresLedger

        return PostgresLedger(url)
    from creditmeter.storage.ledger.sqlite import SqliteLedger

    path = Path(url.removeprefix("sqlite:///")) if url else data_dir / "ledger.db"
    return SqliteLedger(path)
