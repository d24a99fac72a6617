"""What the SQL stores (the ledger, `ledger/sql.py`, and the config store,
`config_store/sql.py`) share: statements written once with `?` markers, run through a
small seam that each backend provides over its driver.

The PostgreSQL backends number the markers (`pg.numbered`); SQLite takes them as they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

#: A result row: a tuple (SQLite) or an asyncpg Record; the rules read columns by position.
Row = Any


def marks(count: int) -> str:
    """`count` parameter markers, comma-separated."""
    return ", ".join("?" * count)


def column_names(columns: str) -> list[str]:
    """The names of a comma-separated column list."""
    return [c.strip() for c in columns.split(",")]


def upsert(table: str, columns: str, key: int) -> str:
    """An INSERT of `columns` that, where a row has the same first `key` columns (the
    primary key), updates the others instead."""
    names = column_names(columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in names[key:])
    return (
        f"INSERT INTO {table} ({columns}) VALUES ({marks(len(names))})"
        f" ON CONFLICT ({', '.join(names[:key])}) DO UPDATE SET {updates}"
    )


class Statements(Protocol):
    """Where statements run: a connection (inside a transaction, or each statement on
    its own)."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; the number of rows it inserted, updated or deleted."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...
