"""Numbered schema migrations, one mechanism for the four stores (the SQLite and PostgreSQL
ledgers, the SQLite and PostgreSQL config stores).

A store's schema is a tuple of migrations: migration n (from 1) brings it from version n - 1
to n, runs once, in the transaction that records n in the store's meta table (row
`schema_version`). Append, never edit one that has shipped. Migration 1 of the ledger and
of the SQLite config store is the schema of release 0.1.0 as it was.

One text for both dialects: a migration writes the column types as placeholders
(`{int}`, `{text}`, `{bool}`, `{serial_pk}`) that `Dialect.render` fills in, so the SQLite
and PostgreSQL schemas are one definition.

A store made before migrations existed (tables created by `CREATE TABLE IF NOT EXISTS` at
every open, no version record) is adopted: a migration counts as present when every table
and index it creates exists (and every column it adds or backfills), the leading run of present
migrations is recorded as the store's version, and the rest run. Columns that a store
older than migration 1 may lack (`Migration.backfill`) are added before migration 1 runs.

The caller holds the store's lock (PostgreSQL: an advisory transaction lock; SQLite: the
BEGIN IMMEDIATE `migrate_sqlite` takes). A store at the latest version runs no DDL; a store
at a version newer than the code refuses to open (`SchemaTooNew`).

Why not yoyo-migrations or alembic: both drive the database through their own DB-API
driver (psycopg / SQLAlchemy engines), beside the asyncpg pool the PostgreSQL stores use,
and neither adopts a store that was created without them by looking at its tables; the
whole of what the stores need is this module, with no new dependency."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

VERSION_ROW = "schema_version"


class SchemaTooNew(RuntimeError):
    """The store was migrated by a newer release than this one."""


@dataclass(frozen=True)
class Dialect:
    name: str
    types: Mapping[str, str]

    def render(self, sql: str) -> str:
        return sql.format_map(self.types)


SQLITE = Dialect("sqlite", {
    "int": "INTEGER", "text": "TEXT", "bool": "INTEGER",
    "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
})  # fmt: skip
#: Text is COLLATE "C": orders and keyset comparisons follow byte order, as in SQLite.
POSTGRES = Dialect("postgres", {
    "int": "BIGINT", "text": 'TEXT COLLATE "C"', "bool": "BOOLEAN",
    "serial_pk": "BIGSERIAL PRIMARY KEY",
})  # fmt: skip

_CREATES = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.IGNORECASE
)
_ADDS = re.compile(r"ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.IGNORECASE)


@dataclass(frozen=True)
class Backfill:
    """A column that stores older than migration 1 lack (CREATE TABLE IF NOT EXISTS never
    added it): added with a default before migration 1 runs."""

    table: str
    column: str
    definition: str  # rendered: "{text} NOT NULL DEFAULT 'grant'"


@dataclass(frozen=True)
class Migration:
    sql: str
    backfill: tuple[Backfill, ...] = ()

    @property
    def creates(self) -> frozenset[str]:
        """The tables and indexes it creates."""
        return frozenset(m.lower() for m in _CREATES.findall(self.sql))

    @property
    def adds(self) -> frozenset[tuple[str, str]]:
        """The columns (table, column) it adds to existing tables."""
        return frozenset((t.lower(), c.lower()) for t, c in _ADDS.findall(self.sql))


@dataclass(frozen=True)
class Catalog:
    """What a database holds: its tables' columns, and its index names."""

    columns: Mapping[str, frozenset[str]]
    indexes: frozenset[str]

    def has(self, name: str) -> bool:
        return name in self.columns or name in self.indexes

    def present(self, migration: Migration) -> bool:
        columns = [*migration.adds, *((b.table, b.column) for b in migration.backfill)]
        return all(self.has(n) for n in migration.creates) and all(
            column in self.columns.get(table, ()) for table, column in columns
        )


@dataclass(frozen=True)
class Schema:
    """One store's migrations and where it records its version."""

    store: str  # for messages: "SQLite ledger"
    meta_table: str
    migrations: tuple[Migration, ...]
    dialect: Dialect

    @property
    def latest(self) -> int:
        return len(self.migrations)

    def statement(self, number: int) -> str:
        """Migration `number` (from 1) in this store's dialect."""
        return self.dialect.render(self.migrations[number - 1].sql)

    def meta_ddl(self) -> str:
        return self.dialect.render(
            f"CREATE TABLE IF NOT EXISTS {self.meta_table} ("
            " name {text} PRIMARY KEY, value {int} NOT NULL)"
        )

    def adopted(self, catalog: Catalog) -> int:
        """The version of a store made before migrations: its leading present migrations."""
        version = 0
        for migration in self.migrations:
            if not catalog.present(migration):
                break
            version += 1
        return version

    def check(self, version: int) -> None:
        if version > self.latest:
            raise SchemaTooNew(
                f"the {self.store} has schema version {version}, newer than this release's"
                f" {self.latest}: upgrade creditmeter"
            )

    def backfills(self, catalog: Catalog, number: int) -> list[str]:
        """ALTER TABLEs adding the columns migration `number` needs and the store lacks."""
        return [
            self.dialect.render(f"ALTER TABLE {b.table} ADD COLUMN {b.column} {b.definition}")
            for b in self.migrations[number - 1].backfill
            if b.table in catalog.columns and b.column not in catalog.columns[b.table]
        ]


def _statements(script: str) -> list[str]:
    """A script's statements (the schema's SQL holds no ';' inside literals)."""
    lines = [ln for ln in script.splitlines() if not ln.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# -- SQLite ------------------------------------------------------------------------------


def sqlite_catalog(db: sqlite3.Connection) -> Catalog:
    rows = db.execute("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'index')")
    tables: list[str] = []
    indexes: list[str] = []
    for kind, name in rows.fetchall():
        (tables if kind == "table" else indexes).append(str(name))
    columns = {
        t.lower(): frozenset(str(r[1]) for r in db.execute(f'PRAGMA table_info("{t}")'))
        for t in tables
    }
    return Catalog(columns, frozenset(i.lower() for i in indexes))


def sqlite_version(db: sqlite3.Connection, schema: Schema) -> int | None:
    """The recorded version (None: none recorded)."""
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (schema.meta_table,)
    ).fetchone()
    if exists is None:
        return None
    row = db.execute(
        f"SELECT value FROM {schema.meta_table} WHERE name = ?", (VERSION_ROW,)
    ).fetchone()
    return None if row is None else int(row[0])


def migrate_sqlite(db: sqlite3.Connection, schema: Schema) -> int:
    """Bring the database (a connection in autocommit mode) to the latest version under
    BEGIN IMMEDIATE; the number of migrations applied (0: nothing changed)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        applied = _migrate_sqlite_locked(db, schema)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return applied


def _migrate_sqlite_locked(db: sqlite3.Connection, schema: Schema) -> int:
    current = sqlite_version(db, schema)
    if current is not None:
        schema.check(current)
        if current == schema.latest:
            return 0
    catalog = sqlite_catalog(db)
    if current is None:
        current = schema.adopted(catalog)
        if current:
            log.info("%s made before migrations: at version %d", schema.store, current)
    db.execute(schema.meta_ddl())
    for number in range(current + 1, schema.latest + 1):
        for sql in [*schema.backfills(catalog, number), *_statements(schema.statement(number))]:
            db.execute(sql)
        log.info("%s: schema migration %d applied", schema.store, number)
    db.execute(
        f"INSERT INTO {schema.meta_table} (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (VERSION_ROW, schema.latest),
    )
    return schema.latest - current


# -- PostgreSQL --------------------------------------------------------------------------


async def postgres_catalog(conn: Any) -> Catalog:
    columns: dict[str, set[str]] = {}
    for r in await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema()"
    ):
        columns.setdefault(str(r[0]), set()).add(str(r[1]))
    indexes = await conn.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
    )
    return Catalog(
        {t: frozenset(c) for t, c in columns.items()}, frozenset(str(r[0]) for r in indexes)
    )


async def postgres_version(conn: Any, schema: Schema) -> int | None:
    """The recorded version (None: none recorded)."""
    if await conn.fetchval("SELECT to_regclass($1)", schema.meta_table) is None:
        return None
    value = await conn.fetchval(
        f"SELECT value FROM {schema.meta_table} WHERE name = $1", VERSION_ROW
    )
    return None if value is None else int(value)


async def migrate_postgres(conn: Any, schema: Schema) -> int:
    """Bring the database to the latest version, in the caller's transaction (which holds
    the store's advisory lock); the number of migrations applied (0: nothing changed)."""
    current = await postgres_version(conn, schema)
    if current is not None:
        schema.check(current)
        if current == schema.latest:
            return 0
    catalog = await postgres_catalog(conn)
    if current is None:
        current = schema.adopted(catalog)
        if current:
            log.info("%s made before migrations: at version %d", schema.store, current)
    await conn.execute(schema.meta_ddl())
    for number in range(current + 1, schema.latest + 1):
        for sql in schema.backfills(catalog, number):
            await conn.execute(sql)
        await conn.execute(schema.statement(number))
        log.info("%s: schema migration %d applied", schema.store, number)
    await conn.execute(
        f"INSERT INTO {schema.meta_table} (name, value) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        VERSION_ROW,
        schema.latest,
    )
    return schema.latest - current
