"""The schema migrations (storage/migrations.py) of the ledger and the config store on both
backends: migration 1 is release 0.1.0's schema as it was; a new store ends at the latest
version with today's schema; a store made before migrations, at each historic schema (one
before staged_grants.operation, 0.1.0's, and each version since), is adopted and upgraded
to the same schema as a new one; a second open changes nothing; a store at a newer
version refuses to open."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from creditmeter.storage.config_store import schema as config_schema
from creditmeter.storage.config_store.postgres import PostgresConfigStore
from creditmeter.storage.config_store.sqlite import SqliteConfigStore
from creditmeter.storage.ledger import schema as ledger_schema
from creditmeter.storage.ledger.base import StagedGrant
from creditmeter.storage.ledger.postgres import PostgresLedger
from creditmeter.storage.ledger.sqlite import SqliteLedger
from creditmeter.storage.migrations import (
    Catalog,
    Schema,
    SchemaTooNew,
    migrate_postgres,
    migrate_sqlite,
    postgres_catalog,
    postgres_version,
    sqlite_catalog,
    sqlite_version,
)

SCHEMAS = Path(__file__).parent / "fixtures" / "schemas"
LEDGER_SQLITE = ledger_schema.SQLITE_SCHEMA
LEDGER_PG = ledger_schema.POSTGRES_SCHEMA


def norm(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def up_to(schema: Schema, version: int) -> str:
    """The schema as of `version`, as the builds of that time created it (no version
    record): migrations 1..version."""
    return ";\n".join(schema.statement(n) for n in range(1, version + 1))


def without_meta(catalog: Catalog, schema: Schema) -> Catalog:
    return Catalog(
        {t: c for t, c in catalog.columns.items() if t != schema.meta_table},
        frozenset(i for i in catalog.indexes if schema.meta_table not in i),
    )


# -- Migration 1 is 0.1.0's schema ------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "fixture"),
    [
        (LEDGER_SQLITE, "ledger_0_1_0.sqlite.sql"),
        (LEDGER_PG, "ledger_0_1_0.pg.sql"),
        (config_schema.SQLITE_SCHEMA, "config_0_1_0.sqlite.sql"),
    ],
)
def test_migration_1_is_the_schema_of_0_1_0(schema: Schema, fixture: str) -> None:
    # The fixtures are `git show 270ab45:src/creditmeter/storage/...` SCHEMA strings.
    assert schema.statement(1).strip() == (SCHEMAS / fixture).read_text().strip()


def test_one_definition_for_both_dialects() -> None:
    for number in range(1, LEDGER_SQLITE.latest + 1):
        assert LEDGER_SQLITE.migrations[number - 1] is LEDGER_PG.migrations[number - 1]
    assert config_schema.SQLITE_SCHEMA.latest == config_schema.POSTGRES_SCHEMA.latest


# -- SQLite ledger ----------------------------------------------------------------------------


def sqlite_db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def schema_cookie(path: Path) -> int:
    """SQLite's schema cookie: changes with every DDL statement that commits."""
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA schema_version").fetchone()[0])


async def open_sqlite_ledger(path: Path) -> None:
    ledger = SqliteLedger(path)
    await ledger.open()
    await ledger.close()


def fresh_sqlite_catalog(tmp_path: Path) -> Catalog:
    with sqlite_db(tmp_path / "fresh.db") as db:
        migrate_sqlite(db, LEDGER_SQLITE)
        return without_meta(sqlite_catalog(db), LEDGER_SQLITE)


async def test_a_new_sqlite_ledger_ends_at_the_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await open_sqlite_ledger(path)
    with sqlite_db(path) as db:
        assert sqlite_version(db, LEDGER_SQLITE) == LEDGER_SQLITE.latest == 5
    cookie = schema_cookie(path)
    await open_sqlite_ledger(path)  # the second open: no DDL
    assert schema_cookie(path) == cookie
    with sqlite_db(path) as db:
        assert migrate_sqlite(db, LEDGER_SQLITE) == 0


HISTORIC = ["before_operation", *range(1, LEDGER_SQLITE.latest)]


def historic_sqlite(at: str | int) -> str:
    if at == "before_operation":
        return (SCHEMAS / "ledger_before_operation.sqlite.sql").read_text()
    assert isinstance(at, int)
    return up_to(LEDGER_SQLITE, at)




def staged(at: str | int) -> str:
    """A grant staged by the build of that schema (operation "grant" once it had one)."""
    operation = ("", "") if at == "before_operation" else (", operation", ", 'grant'")
    return (
        "INSERT INTO staged_grants (tenant, account, request_id, fingerprint, txn, lot_id,"
        f" amount, priority, expires_at, source, reference, created_ms{operation[0]})"
        f" VALUES ('t', 'a', 'old', 'f', 'x', 'l1', 5, 0, NULL, 'grant', '', 1{operation[1]})"
    )


def new_grant(request_id: str) -> StagedGrant:
    return StagedGrant("t", "a", request_id, "f", "y", "l2", 7, 0, None, "grant", "", 2, "add")


@pytest.mark.parametrize("at", HISTORIC)
async def test_a_sqlite_ledger_made_before_migrations_upgrades(
    tmp_path: Path, at: str | int
) -> None:
    path = tmp_path / "ledger.db"
    with sqlite_db(path) as db:
        db.executescript(historic_sqlite(at))
        db.execute(staged(at))
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        # The grant staged by the old build reads as a plain grant; new ones go in.
        (old,) = await ledger.unapplied_grants(10, 10)
        assert (old.request_id, old.operation) == ("old", "grant")
        await ledger.stage_grant(new_grant("new"))
        assert {g.operation for g in await ledger.unapplied_grants(10, 10)} == {"grant", "add"}
    finally:
        await ledger.close()
    with sqlite_db(path) as db:
        assert sqlite_version(db, LEDGER_SQLITE) == LEDGER_SQLITE.latest
        assert without_meta(sqlite_catalog(db), LEDGER_SQLITE) == fresh_sqlite_catalog(tmp_path)
    cookie = schema_cookie(path)
    await open_sqlite_ledger(path)
    assert schema_cookie(path) == cookie


#: Grant events written before migration 5 (which added `rolls_over`), by reference: a bare
#: subscription id was a period's lot or its rollover's (they roll over), anything else not.
OLD_GRANTS = {
    "l1": ("purchase", "sub_01ABCxyz", True),
    "l2": ("rollover", "sub_01ABCxyz", True),
    "l3": ("bonus", "sub_01ABCxyz:bonus", False),
    "l4": ("manual", "sub_", False),
    "l5": ("manual", "order 7", False),
}


def old_events() -> str:
    rows = [
        f"('e{n}', 't', 'a', 'grant', 'x{n}', {n}, '', 1, '{lot}', 5, 5, '', 0, 0, NULL,"
        f" '{source}', '{reference}', NULL)"
        for n, (lot, (source, reference, _)) in enumerate(OLD_GRANTS.items(), 1)
    ]
    rows.append("('e9', 't', 'a', 'expire', 'x9', 9, '', 2, 'l1', 5, 0, '', 0, NULL, NULL, '',"
                " 'sub_01ABCxyz', NULL)")  # fmt: skip
    return "INSERT INTO events VALUES " + ", ".join(rows)


async def assert_old_grants_flagged(ledger: SqliteLedger | PostgresLedger) -> None:
    events = [e async for e in ledger.scan("t", "a")]
    assert {e.lot: e.rolls_over for e in events if e.kind == "grant"} == {
        lot: rolls for lot, (_, _, rolls) in OLD_GRANTS.items()
    }
    assert not any(e.rolls_over for e in events if e.kind != "grant")


async def test_migration_5_flags_the_old_grants_that_roll_over(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with sqlite_db(path) as db:
        db.executescript(up_to(LEDGER_SQLITE, 4))
        db.execute(old_events())
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        await assert_old_grants_flagged(ledger)
    finally:
        await ledger.close()


async def test_a_sqlite_ledger_of_a_newer_release_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    await open_sqlite_ledger(path)
    with sqlite_db(path) as db:
        db.execute("UPDATE ledger_meta SET value = value + 1 WHERE name = 'schema_version'")
    cookie = schema_cookie(path)
    with pytest.raises(SchemaTooNew, match="schema version 6, newer than this release's 5"):
        await open_sqlite_ledger(path)
    assert schema_cookie(path) == cookie


# -- PostgreSQL ledger ------------------------------------------------------------------------


async def pg_state(url: str, schema: Schema) -> tuple[int | None, Catalog]:
    conn = await asyncpg.connect(url)
    try:
        return await postgres_version(conn, schema), await postgres_catalog(conn)
    finally:
        await conn.close()


async def pg_execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def open_pg_ledger(url: str) -> PostgresLedger:
    ledger = PostgresLedger(url)
    await ledger.open()
    return ledger


async def test_a_new_postgres_ledger_ends_at_the_latest_version(fresh_postgres_url: str) -> None:
    await (await open_pg_ledger(fresh_postgres_url)).close()
    version, catalog = await pg_state(fresh_postgres_url, LEDGER_PG)
    assert version == LEDGER_PG.latest
    # Today's schema: SQLite's tables and indexes, and their columns.
    assert set(catalog.columns) >= {"events", "staged_grants", "webhook_deliveries"}
    await (await open_pg_ledger(fresh_postgres_url)).close()
    conn = await asyncpg.connect(fresh_postgres_url)
    try:
        async with conn.transaction():
            assert await migrate_postgres(conn, LEDGER_PG) == 0
    finally:
        await conn.close()


@pytest.mark.parametrize("at", HISTORIC)
async def test_a_postgres_ledger_made_before_migrations_upgrades(
    fresh_postgres_url: str, postgres_server: object, tmp_path: Path, at: str | int
) -> None:
    if at == "before_operation":
        sql = (SCHEMAS / "ledger_before_operation.pg.sql").read_text()
    else:
        assert isinstance(at, int)
        sql = up_to(LEDGER_PG, at)
    await pg_execute(fresh_postgres_url, sql + ";\n" + staged(at))
    ledger = await open_pg_ledger(fresh_postgres_url)
    try:
        (old,) = await ledger.unapplied_grants(10, 10)
        assert (old.request_id, old.operation) == ("old", "grant")
        await ledger.stage_grant(new_grant("new"))
    finally:
        await ledger.close()
    version, catalog = await pg_state(fresh_postgres_url, LEDGER_PG)
    assert version == LEDGER_PG.latest
    fresh = fresh_sqlite_catalog(tmp_path)
    migrated = without_meta(catalog, LEDGER_PG)
    # The same tables with the same columns, the same indexes (PostgreSQL names the
    # indexes of primary keys and UNIQUE columns itself, SQLite sqlite_autoindex_*).
    assert migrated.columns == {t: c for t, c in fresh.columns.items() if t != "sqlite_sequence"}
    named = {i for i in fresh.indexes if not i.startswith("sqlite_autoindex")}
    assert named <= migrated.indexes


async def test_migration_5_flags_the_old_grants_that_roll_over_on_postgres(
    fresh_postgres_url: str,
) -> None:
    await pg_execute(fresh_postgres_url, up_to(LEDGER_PG, 4) + ";\n" + old_events())
    ledger = await open_pg_ledger(fresh_postgres_url)
    try:
        await assert_old_grants_flagged(ledger)
    finally:
        await ledger.close()


async def test_a_postgres_ledger_of_a_newer_release_refuses_to_open(
    fresh_postgres_url: str,
) -> None:
    await (await open_pg_ledger(fresh_postgres_url)).close()
    await pg_execute(
        fresh_postgres_url,
        "UPDATE ledger_meta SET value = value + 1 WHERE name = 'schema_version'",
    )
    with pytest.raises(SchemaTooNew, match="PostgreSQL ledger has schema version 6"):
        await open_pg_ledger(fresh_postgres_url)


async def test_servers_opening_a_new_ledger_at_once_migrate_it_once(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    # Under the lock (advisory on PostgreSQL, BEGIN IMMEDIATE on SQLite) one migrates and
    # the others find it at the latest version; without it they would race on CREATE.
    ledgers = await asyncio.gather(*(open_pg_ledger(fresh_postgres_url) for _ in range(4)))
    for ledger in ledgers:
        await ledger.close()
    assert (await pg_state(fresh_postgres_url, LEDGER_PG))[0] == LEDGER_PG.latest
    path = tmp_path / "ledger.db"
    await asyncio.gather(*(open_sqlite_ledger(path) for _ in range(4)))
    with sqlite_db(path) as db:
        assert sqlite_version(db, LEDGER_SQLITE) == LEDGER_SQLITE.latest


#: Rounds of four opens of one new SQLite file: before connect_wal, about one round in
#: ten failed "database is locked" (the switch to WAL does not wait the busy timeout).
NEW_FILE_RACE_ROUNDS = 40


async def test_sqlite_ledgers_opening_one_new_file_together_all_open(tmp_path: Path) -> None:
    for round_ in range(NEW_FILE_RACE_ROUNDS):
        path = tmp_path / f"ledger-{round_}.db"
        await asyncio.gather(*(open_sqlite_ledger(path) for _ in range(4)))
        with sqlite_db(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_config_stores_opening_one_new_file_together_all_open(
    tmp_path: Path,
) -> None:
    for round_ in range(NEW_FILE_RACE_ROUNDS):
        path = tmp_path / f"config-{round_}.db"
        stores = await asyncio.gather(
            *(asyncio.to_thread(SqliteConfigStore, path) for _ in range(4))
        )
        assert [store.version() for store in stores] == [0, 0, 0, 0]


# -- Config stores ----------------------------------------------------------------------------


@pytest.mark.parametrize("at", [1, 2, 3])
def test_a_sqlite_config_store_made_before_migrations_upgrades(tmp_path: Path, at: int) -> None:
    # 1 is 0.1.0's schema (test_migration_1_is_the_schema_of_0_1_0), 2 and 3 later builds'.
    schema = config_schema.SQLITE_SCHEMA
    path = tmp_path / "config.db"
    with sqlite_db(path) as db:
        db.executescript(up_to(schema, at))
        db.execute("UPDATE meta SET value = 7 WHERE name = 'config_version'")
    store = SqliteConfigStore(path)
    assert store.version() == 7  # the configuration's version is kept
    assert store.snapshot().limits == []
    with sqlite_db(path) as db:
        assert sqlite_version(db, schema) == schema.latest == 4
        upgraded = sqlite_catalog(db)
    with sqlite_db(tmp_path / "fresh.db") as db:
        migrate_sqlite(db, schema)
        assert sqlite_catalog(db) == upgraded
    cookie = schema_cookie(path)
    SqliteConfigStore(path)
    assert schema_cookie(path) == cookie
    with sqlite_db(path) as db:
        db.execute("UPDATE meta SET value = 5 WHERE name = 'schema_version'")
    with pytest.raises(SchemaTooNew, match="SQLite config store has schema version 5"):
        SqliteConfigStore(path)


async def test_the_postgres_config_store_keeps_its_versions(
    fresh_postgres_url: str, tmp_path: Path
) -> None:
    schema = config_schema.POSTGRES_SCHEMA
    with PostgresConfigStore(fresh_postgres_url, tmp_path) as store:
        assert store.version() == 0
    version, catalog = await pg_state(fresh_postgres_url, schema)
    assert version == schema.latest == 4
    assert "config_webhook_endpoints" in catalog.columns
    await pg_execute(
        fresh_postgres_url, "UPDATE config_meta SET value = 5 WHERE name = 'schema_version'"
    )
    with PostgresConfigStore(fresh_postgres_url, tmp_path) as store, pytest.raises(
        SchemaTooNew, match="PostgreSQL config store has schema version 5"
    ):
        store.version()
