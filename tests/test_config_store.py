"""One suite, every config store backend: SQLite in the data directory and PostgreSQL (a
real local server); then what only PostgreSQL does: several servers sharing one store,
the import of a deployment's SQLite store on upgrade, and starting while it is down."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from creditmeter.api.credits.v1 import packs_pb2, packs_pb2_grpc
from creditmeter.constants import CONFIG_CACHE_NAME, CONFIG_DB_NAME
from creditmeter.domain import keys as api_keys
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.configuration import LiveConfig
from creditmeter.domain.model import PackRow, WebhookRow
from creditmeter.errors import ApiKeyInvalid, BackendUnavailable, Rejected
from creditmeter.storage.config_store import (
    ConfigStore,
    KeyRow,
    RateRow,
    Request,
    open_config_store,
)
from creditmeter.storage.config_store.postgres import PostgresConfigStore
from creditmeter.storage.config_store.sqlite import SqliteConfigStore, read_dump
from creditmeter.transport.server import App, Settings
from tests.conftest import free_port
from tests.test_server_process import ENV, cli

T = TypeVar("T")
FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1_0"
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
TTL_MS = DAY_MS


# --- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def fresh_pg(fresh_postgres_url: str) -> str:
    """A database of this test's own: the import happens only into an empty store."""
    return fresh_postgres_url


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """The ledger url the stores are opened with: None for SQLite."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("fresh_pg")
    return url


@pytest.fixture
def open_store(backend: str | None, tmp_path: Path) -> Iterator[Callable[[], ConfigStore]]:
    """Opens another store on the same backend, as another server would (its own data
    directory: for SQLite the one file is the store, so that is shared)."""
    opened: list[ConfigStore] = []

    def another() -> ConfigStore:
        data_dir = tmp_path / "data" if backend is None else tmp_path / f"data{len(opened)}"
        store = open_config_store(backend, data_dir)
        opened.append(store)
        return store

    yield another
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], ConfigStore]) -> ConfigStore:
    return open_store()


# --- helpers -----------------------------------------------------------------------------
def fresh() -> str:
    return "t" + uuid.uuid4().hex[:10]


def key(tenant: str, n: int = 1, created_ms: int = T0, role: str = "admin") -> KeyRow:
    return KeyRow(f"{tenant}-k{n}", tenant, role, "ab" * 32, f"label {n}", created_ms, None)


def req(tenant: str, request_id: str, fingerprint: str = "f1", now_ms: int = T0) -> Request:
    return Request(tenant, request_id, fingerprint, now_ms, TTL_MS)


def pack(tenant: str, pack_id: str, create_ms: int = T0, **kw: Any) -> PackRow:
    fields: dict[str, Any] = {
        "tenant": tenant, "pack_id": pack_id, "name": "Starter", "description": "",
        "credits": 100, "bonus_credits": 10, "price_minor": 499, "currency": "EUR",
        "validity_days": 0, "recurrence": "one_time", "rollover_cap": 0, "priority": 50,
        "active": True, "trial": False, "archived": False, "create_ms": create_ms,
        "update_ms": create_ms,
    }  # fmt: skip
    fields.update(kw)
    return PackRow(**fields)


def race(calls: list[Callable[[], T]]) -> list[T | BaseException]:
    """Run the calls in threads of their own, released at the same moment."""
    start = threading.Barrier(len(calls))
    results: list[T | BaseException] = [RuntimeError("not run")] * len(calls)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except BaseException as error:  # handed back to the test
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


# --- every backend -----------------------------------------------------------------------
def test_keys_are_added_listed_and_revoked_each_change_a_version(store: ConfigStore) -> None:
    t, other = fresh(), fresh()
    v0 = store.version()
    store.add_key(key(t, 2, T0 + 5))
    store.add_key(key(t, 1, T0 + 5))
    store.add_key(key(other, 1, T0))
    assert store.version() == v0 + 3
    assert [k.key_id for k in store.api_keys(t)] == [f"{t}-k1", f"{t}-k2"]  # time, then id
    assert [k for k in store.api_keys() if k.tenant in (t, other)] == [
        key(other, 1, T0), key(t, 1, T0 + 5), key(t, 2, T0 + 5),
    ]  # fmt: skip
    assert store.revoke_key(f"{t}-k1", T0 + 9)
    assert store.version() == v0 + 4
    assert not store.revoke_key(f"{t}-k1", T0 + 10)  # already revoked: no change
    assert not store.revoke_key("no-such-key", T0 + 10)
    assert store.version() == v0 + 4
    assert store.api_keys(t)[0].revoked_ms == T0 + 9
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        store.add_key(key(t, 2))  # key ids are unique
    assert store.version() == v0 + 4


def test_set_rate_changes_once_per_request_id(store: ConfigStore) -> None:
    t = fresh()
    v0 = store.version()
    first = RateRow(t, "sms", 3, "count", 0, T0 + 1)
    assert store.set_rate(first, req(t, "r1")) == (str(T0 + 1), False)
    assert store.version() == v0 + 1
    # A retry, even one carrying a later time: the first answer, nothing changed.
    assert store.set_rate(replace(first, updated_ms=T0 + 2), req(t, "r1")) == (str(T0 + 1), True)
    assert store.version() == v0 + 1
    with pytest.raises(Rejected) as reused:
        store.set_rate(replace(first, credits_per_unit=4), req(t, "r1", "f2"))
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    # The id is the tenant's: another tenant's r1 is its own.
    store.set_rate(RateRow(other := fresh(), "sms", 9, "count", 0, T0), req(other, "r1", "f2"))
    voice = RateRow(t, "voice", 5, "time", 30, T0 + 3)
    store.set_rate(voice, req(t, "r2"))
    assert store.set_rate(replace(first, credits_per_unit=7), req(t, "r3", "f3"))[1] is False
    mine = [r for r in store.rates() if r.tenant == t]
    assert mine == [replace(first, credits_per_unit=7), voice]
    assert store.version() == v0 + 4


def test_request_records_expire_after_their_ttl(store: ConfigStore) -> None:
    t = fresh()
    store.set_rate(RateRow(t, "sms", 3, "count", 0, T0), req(t, "r1", now_ms=T0))
    later = T0 + TTL_MS + 1
    # Past the TTL the id is free again: another change, other parameters allowed.
    stored, replayed = store.set_rate(
        RateRow(t, "sms", 4, "count", 0, later), req(t, "r1", "f2", now_ms=later)
    )
    assert (stored, replayed) == (str(later), False)
    assert [r.credits_per_unit for r in store.rates() if r.tenant == t] == [4]


def test_put_pack_builds_on_the_stored_pack_and_lists_by_creation(store: ConfigStore) -> None:
    t = fresh()
    seen: list[PackRow | None] = []

    def build(row: PackRow) -> Callable[[PackRow | None], PackRow]:
        def make(current: PackRow | None) -> PackRow:
            seen.append(current)
            return row

        return make

    a = pack(t, "pack-a", T0 + 2)
    stored, replayed = store.put_pack("pack-a", req(t, "c1"), build(a))
    assert (stored, replayed, seen) == (a, False, [None])
    assert store.put_pack("pack-a", req(t, "c1"), build(pack(t, "x"))) == (a, True)
    assert len(seen) == 1  # a replay does not build
    changed = replace(a, name="Bigger", active=False, update_ms=T0 + 5)
    assert store.put_pack("pack-a", req(t, "u1", "g"), build(changed)) == (changed, False)
    assert seen[-1] == a  # built on what was stored
    b, c = pack(t, "pack-b", T0 + 1), pack(t, "pack-c", T0 + 2, archived=True, trial=True)
    store.put_pack("pack-b", req(t, "c2"), build(b))
    store.put_pack("pack-c", req(t, "c3"), build(c))
    assert store.pack(t, "pack-a") == changed and store.pack(t, "nope") is None
    got = store.pack(t, "pack-c")
    assert got is not None and (got.archived, got.trial, got.active) == (True, True, True)
    assert isinstance(got.archived, bool)
    assert store.packs(t, True, 10, None) == [b, changed, c]  # (create_ms, pack_id)
    assert store.packs(t, False, 10, None) == [b]  # active and not archived
    assert store.packs(t, True, 1, None) == [b]
    assert store.packs(t, True, 10, (T0 + 2, "pack-a")) == [c]
    assert store.packs(fresh(), True, 10, None) == []


def test_a_change_that_raises_changes_nothing(store: ConfigStore) -> None:
    t = fresh()
    v0 = store.version()

    def refuse(current: PackRow | None) -> PackRow:
        raise LookupError("no such pack")

    with pytest.raises(LookupError):
        store.put_pack("pack-a", req(t, "u1"), refuse)
    assert store.version() == v0 and store.pack(t, "pack-a") is None
    # Its request id was not used up: the retry that succeeds is the change.
    a = pack(t, "pack-a")
    assert store.put_pack("pack-a", req(t, "u1"), lambda _: a) == (a, False)


def test_snapshot_is_the_keys_and_rates_of_its_version(store: ConfigStore) -> None:
    t = fresh()
    store.add_key(key(t))
    store.set_rate(RateRow(t, "sms", 2, "count", 0, T0), req(t, "r1"))
    snap = store.snapshot()
    assert snap.version == store.version()
    assert [k for k in snap.api_keys if k.tenant == t] == [key(t)]
    assert [r for r in snap.rates if r.tenant == t] == [RateRow(t, "sms", 2, "count", 0, T0)]


def test_two_stores_see_each_others_changes(open_store: Callable[[], ConfigStore]) -> None:
    a, b = open_store(), open_store()
    t = fresh()
    version = b.version()
    a.add_key(key(t))
    assert b.version() == version + 1 and b.api_keys(t) == [key(t)]
    b.set_rate(RateRow(t, "sms", 2, "count", 0, T0), req(t, "r1"))
    assert a.version() == version + 2
    assert next(r for r in a.snapshot().rates if r.tenant == t).credits_per_unit == 2
    assert a.revoke_key(key(t).key_id, T0 + 1)
    assert b.api_keys(t)[0].revoked_ms == T0 + 1
    assert not b.revoke_key(key(t).key_id, T0 + 2)
    b.put_pack("p", req(t, "c1"), lambda _: pack(t, "p"))
    assert a.pack(t, "p") == pack(t, "p")
    # A retry through the other store is a replay of the first.
    assert a.set_rate(RateRow(t, "sms", 2, "count", 0, T0 + 9), req(t, "r1")) == (str(T0), True)


ROUNDS = 10


def test_racing_one_request_id_changes_once(open_store: Callable[[], ConfigStore]) -> None:
    """Two servers (stores of their own) given the same request id at the same moment:
    one change, one version step, the same reply to both; `build` runs once."""
    a, b = open_store(), open_store()
    t = fresh()
    built: list[str] = []
    guard = threading.Lock()

    def set_rate(s: ConfigStore, n: int, i: int) -> Callable[[], tuple[str, bool]]:
        row = RateRow(t, "sms", n + 1, "count", 0, T0 + n * 10 + i)  # each its own time
        return lambda: s.set_rate(row, req(t, f"rate-{n}"))

    def put_pack(s: ConfigStore, n: int, i: int) -> Callable[[], tuple[PackRow, bool]]:
        def build(current: PackRow | None) -> PackRow:
            with guard:
                built.append(f"{n}/{i}")
            return pack(t, f"p{n}", T0 + i)

        return lambda: s.put_pack(f"p{n}", req(t, f"pack-{n}"), build)

    for n in range(ROUNDS):
        before = a.version()
        for make in (set_rate, put_pack):
            replies = race([make(s, n, i) for i, s in enumerate((a, b))])
            assert not any(isinstance(r, BaseException) for r in replies), replies
            firsts = [r[1] for r in replies if isinstance(r, tuple)]
            assert sorted(firsts) == [False, True], replies
            assert replies[0][0] == replies[1][0], replies  # type: ignore[index]
        assert a.version() == before + 2, n
    assert len(built) == ROUNDS, built  # one build per pack id
    assert [r.credits_per_unit for r in a.rates() if r.tenant == t] == [ROUNDS]


# --- PostgreSQL only ---------------------------------------------------------------------
def sqlite_store(data_dir: Path) -> SqliteConfigStore:
    return SqliteConfigStore(data_dir / CONFIG_DB_NAME)


async def config_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


def test_first_open_imports_the_sqlite_store_of_0_1_0(
    fresh_pg: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "data" / CONFIG_DB_NAME, data / CONFIG_DB_NAME)
    fixture = json.loads((FIXTURE / "expected.json").read_text())
    before = read_dump(data / CONFIG_DB_NAME)
    with caplog.at_level(logging.INFO, "creditmeter.storage.config_store.postgres"):
        store = PostgresConfigStore(fresh_pg, data)
        try:
            snap = store.snapshot()
        finally:
            store.close()
    imported = [r for r in caplog.records if r.getMessage().startswith("imported")]
    assert len(imported) == 1, caplog.text
    assert "1 tenants, 1 API keys, 0 rates, 1 packs, 1 request records" in imported[0].getMessage()
    assert snap.version == 1  # the import is one change
    assert snap.api_keys == before.api_keys and len(snap.api_keys) == 1
    # 0.1.0's key still opens the door.
    ring = api_keys.KeyRing([
        api_keys.ApiKey(k.key_id, k.tenant, api_keys.Role(k.role), k.secret_hash, k.label,
                        k.created_ms, k.revoked_ms)
        for k in snap.api_keys
    ])  # fmt: skip
    assert ring.authenticate(f"Bearer {fixture['key']}").tenant == fixture["tenant"]

    # Its pack, and the record of the request that made it: a retry replays it.
    again = PostgresConfigStore(fresh_pg, data)
    try:
        (tenant, request_id, fingerprint, response, created_ms) = before.requests[0]
        retry = Request(tenant, request_id, fingerprint, created_ms + 1, 100 * 365 * DAY_MS)
        stored, replayed = again.put_pack("ignored", retry, lambda _: pack(tenant, "x"))
        assert replayed and stored == PackRow(**json.loads(response)) == before.packs[0]
        assert again.packs(tenant, True, 10, None) == before.packs
        assert again.version() == 1  # the second open imported nothing
    finally:
        again.close()
    assert read_dump(data / CONFIG_DB_NAME) == before  # the SQLite file is left as it was


def test_import_carries_every_row_of_a_filled_sqlite_store(fresh_pg: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = sqlite_store(data)
    t, u = fresh(), fresh()
    old.add_key(key(t, 1))
    old.add_key(key(u, 1, T0 + 1, role="meter"))
    old.revoke_key(key(u, 1).key_id, T0 + 2)
    old.set_rate(RateRow(t, "sms", 3, "count", 0, T0), req(t, "rate-1"))
    old.set_rate(RateRow(u, "voice", 4, "time", 30, T0), req(u, "rate-1"))
    old.put_pack("p1", req(t, "pack-1"), lambda _: pack(t, "p1", trial=True, active=False))
    old.put_pack("p2", req(t, "pack-2"), lambda _: pack(t, "p2", T0 + 1, archived=True))
    hook = endpoint(t, "whe_1", failing_since_ms=T0 + 3)
    old.put_webhook_endpoint("whe_1", req(t, "hook-1"), lambda _: hook)
    with PostgresConfigStore(fresh_pg, data) as new:
        assert new.webhook_endpoints(t) == [hook]
        assert new.api_keys() == old.api_keys()
        assert new.rates() == old.rates()
        assert new.packs(t, True, 10, None) == old.packs(t, True, 10, None)
        # The request records came too: retries replay, reuse is refused.
        assert new.set_rate(RateRow(t, "sms", 3, "count", 0, T0 + 5), req(t, "rate-1")) == (
            str(T0),
            True,
        )
        with pytest.raises(Rejected):
            new.set_rate(RateRow(t, "sms", 8, "count", 0, T0), req(t, "rate-1", "other"))
        assert new.put_pack("p1", req(t, "pack-1"), lambda _: pack(t, "zz"))[1] is True


def test_servers_opening_at_once_import_once(fresh_pg: str, tmp_path: Path) -> None:
    """Several servers, each with a copy of the same config.db, first open at once."""
    t = fresh()
    source = sqlite_store(tmp_path / "source")
    source.add_key(key(t))
    stores = []
    for n in range(4):
        data = tmp_path / f"data{n}"
        data.mkdir()
        shutil.copy(source.path, data / CONFIG_DB_NAME)
        stores.append(PostgresConfigStore(fresh_pg, data))
    try:
        versions = race([s.version for s in stores])
        assert versions == [1, 1, 1, 1], versions
        assert stores[0].api_keys() == [key(t)]
    finally:
        for s in stores:
            s.close()


def test_rows_only_the_sqlite_store_has_are_reported_not_merged(
    fresh_pg: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = fresh()
    with PostgresConfigStore(fresh_pg, tmp_path / "first") as first:
        first.add_key(key(t, 1))
    second = tmp_path / "second"
    sqlite_store(second).add_key(key(t, 2))  # made on another machine before the upgrade
    with caplog.at_level(logging.WARNING), PostgresConfigStore(fresh_pg, second) as store:
        assert store.api_keys() == [key(t, 1)]
    assert "holds 1 API keys, 0 rates and 0 packs that the PostgreSQL config store" in caplog.text


def test_schema_is_migrated_once_and_a_newer_one_is_refused(fresh_pg: str, tmp_path: Path) -> None:
    with PostgresConfigStore(fresh_pg, tmp_path) as store:
        store.add_key(key(fresh()))
    with PostgresConfigStore(fresh_pg, tmp_path) as store:  # opens again: nothing to do
        assert store.version() == 1

    async def bump() -> None:
        conn = await asyncpg.connect(fresh_pg)
        try:
            await conn.execute("UPDATE config_meta SET value = 99 WHERE name = 'schema_version'")
        finally:
            await conn.close()

    asyncio.run(bump())
    with PostgresConfigStore(fresh_pg, tmp_path) as store, pytest.raises(RuntimeError) as newer:
        store.version()
    assert "schema version 99" in str(newer.value)


def store_threads() -> int:
    return sum(t.name == "config-store" and t.is_alive() for t in threading.enumerate())


def test_a_closed_or_dropped_store_leaves_no_thread_or_connection(
    fresh_pg: str, tmp_path: Path
) -> None:
    before = store_threads()
    store = PostgresConfigStore(fresh_pg, tmp_path)
    store.add_key(key(fresh()))
    assert store_threads() == before + 1
    store.close()
    assert store_threads() == before
    with pytest.raises(RuntimeError, match="closed"):
        store.version()
    store.close()  # again: nothing to do
    dropped = PostgresConfigStore(fresh_pg, tmp_path)
    assert dropped.version() == 1
    del dropped  # a server that never closed its store: the finalizer does
    gc.collect()
    assert store_threads() == before
    # Closed from the client's side; the server's backends exit a moment later.
    deadline = time.monotonic() + 5
    while asyncio.run(connections(fresh_pg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert asyncio.run(connections(fresh_pg)) == 0


async def connections(url: str) -> int:
    """The config stores' connections to the database (not this one's)."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = 'creditmeter-config' AND datname = current_database()"
            )
        )
    finally:
        await conn.close()


def test_an_unreachable_store_is_backend_unavailable(tmp_path: Path) -> None:
    url = f"postgresql://127.0.0.1:{free_port()}/nothing"
    with PostgresConfigStore(url, tmp_path) as store:
        for call in (store.version, store.snapshot, lambda: store.add_key(key(fresh()))):
            with pytest.raises(BackendUnavailable) as down:
                call()
            assert down.value.metadata == {"backend": "ledger"}


async def test_a_server_starting_while_postgres_is_down_serves_what_it_last_loaded(
    fresh_pg: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    t = fresh()
    plaintext, rec = api_keys.generate(t, api_keys.Role.ADMIN, "", T0)
    row = KeyRow(rec.key_id, t, "admin", rec.secret_hash, "", T0, None)
    with PostgresConfigStore(fresh_pg, data) as up:
        up.add_key(row)
        assert await LiveConfig(up).refresh()
    assert (data / CONFIG_CACHE_NAME).stat().st_mode & 0o077 == 0  # digests: owner only
    down_url = f"postgresql://127.0.0.1:{free_port()}/nothing"
    with PostgresConfigStore(down_url, data) as down:
        live = LiveConfig(down)
        with caplog.at_level(logging.WARNING):
            assert await live.refresh()
            assert not await live.refresh()  # still down: quiet, nothing changed
        assert live.keys.authenticate(f"Bearer {plaintext}").tenant == t
        assert caplog.text.count("config store unreachable") == 1, caplog.text
    # A data directory that never reached it, without a SQLite store: nothing to serve.
    with PostgresConfigStore(down_url, tmp_path / "empty") as down:
        live = LiveConfig(down)
        assert not await live.refresh()
        with pytest.raises(ApiKeyInvalid):
            live.keys.authenticate(f"Bearer {plaintext}")


def test_keys_commands_use_the_postgres_store_of_ledger_url(fresh_pg: str, tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created = cli(
        "keys", "create", "--tenant", "shared", "--role", "meter", "--data-dir", data,
        "--ledger-url", fresh_pg,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    with PostgresConfigStore(fresh_pg, tmp_path / "elsewhere") as store:
        (row,) = store.api_keys("shared")
    assert created.stdout.startswith(f"cm_{row.key_id}_")
    # Or through the environment, as `serve` takes it; another data directory.
    env = {**ENV, "CREDITMETER_LEDGER_URL": fresh_pg}
    listing = cli("keys", "list", "--data-dir", str(tmp_path / "other"), env=env)
    assert listing.returncode == 0 and row.key_id in listing.stdout, listing.stderr
    revoked = cli("keys", "revoke", row.key_id, "--data-dir", data, env=env)
    assert revoked.returncode == 0, revoked.stderr
    with PostgresConfigStore(fresh_pg, tmp_path / "elsewhere") as store:
        assert store.api_keys("shared")[0].revoked_ms is not None
    assert not (tmp_path / "data" / CONFIG_DB_NAME).exists()  # nothing went to SQLite
    down = cli("keys", "list", "--data-dir", data,
               "--ledger-url", f"postgresql://127.0.0.1:{free_port()}/x")  # fmt: skip
    assert down.returncode == 1 and "the ledger is unavailable" in down.stderr, down.stderr
    assert "Traceback" not in down.stderr


async def test_an_upgraded_server_on_postgres_answers_0_1_0_keys_and_retries(
    fresh_pg: str, redis_url: str, tmp_path: Path
) -> None:
    """The server of a deployment that ran 0.1.0 on a PostgreSQL ledger (so its config
    store is the data directory's config.db): its key works, a retried CreatePack replays."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURE / "data" / CONFIG_DB_NAME, data / CONFIG_DB_NAME)
    fixture = json.loads((FIXTURE / "expected.json").read_text())
    (call,) = [c for c in fixture["calls"] if c["method"] == "CreatePack"]
    app = App(Settings(listen="127.0.0.1:0", data_dir=data, redis_url=redis_url,
                       ledger_url=fresh_pg, flusher=False, shutdown_grace_s=1.0,
                       clock=ManualClock(T0)))  # fmt: skip
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = packs_pb2_grpc.PacksStub(channel)
            request = json_format.ParseDict(call["request"], packs_pb2.CreatePackRequest())
            md = (("authorization", f"Bearer {fixture['key']}"),)
            reply = await stub.CreatePack(request, metadata=md, timeout=10)
            assert json_format.MessageToDict(reply) == call["response"]
        assert await config_rows(fresh_pg, "config_api_keys") == 1
    finally:
        await app.stop()
        assert app.live is not None
        app.live.store.close()


# --- webhook endpoints ----------------------------------------------------------------------
def endpoint(tenant: str, endpoint_id: str, create_ms: int = T0, **kw: Any) -> WebhookRow:
    fields: dict[str, Any] = {
        "tenant": tenant, "endpoint_id": endpoint_id, "url": "https://example.com/h",
        "event_types": "balance.low,purchase.completed", "thresholds": "10,100",
        "description": "", "secret": "whsec_x", "disabled": False, "disabled_reason": "",
        "failing_since_ms": None, "create_ms": create_ms, "update_ms": create_ms,
    }  # fmt: skip
    fields.update(kw)
    return WebhookRow(**fields)


def test_webhook_endpoints_are_put_listed_health_marked_and_deleted(store: ConfigStore) -> None:
    t = fresh()
    first = endpoint(t, "whe_1")
    stored, replayed = store.put_webhook_endpoint("whe_1", req(t, "r1"), lambda _: first)
    assert (stored, replayed) == (first, False)
    # A replay returns the first call's row without building.
    again, replayed = store.put_webhook_endpoint("whe_1", req(t, "r1"), lambda _: 1 / 0)  # type: ignore[arg-type, return-value]
    assert (again, replayed) == (first, True)
    second = endpoint(t, "whe_2", T0 + 1)
    store.put_webhook_endpoint("whe_2", req(t, "r2"), lambda _: second)
    seen: list[WebhookRow | None] = []

    def rotate(current: WebhookRow | None) -> WebhookRow:
        seen.append(current)
        assert current is not None
        return replace(current, secret="whsec_y", update_ms=T0 + 5)

    rotated, _ = store.put_webhook_endpoint("whe_1", req(t, "r3", "f2"), rotate)
    assert seen == [first] and rotated.secret == "whsec_y"
    assert store.webhook_endpoints(t) == [rotated, second]
    assert rotated in store.webhook_endpoints()

    version = store.version()
    store.set_webhook_health(t, "whe_2", T0 + 7, "")
    store.set_webhook_health(t, "whe_1", T0 + 8, "failing for days")
    one, two = store.webhook_endpoints(t)
    assert (one.failing_since_ms, one.disabled, one.disabled_reason) == (
        T0 + 8, True, "failing for days"
    )
    assert (two.failing_since_ms, two.disabled, two.disabled_reason) == (T0 + 7, False, "")
    assert store.version() > version

    assert store.delete_webhook_endpoint("whe_1", req(t, "r4", "f3")) == (True, False)
    assert store.delete_webhook_endpoint("whe_1", req(t, "r4", "f3")) == (True, True)
    assert store.delete_webhook_endpoint("whe_1", req(t, "r5", "f4")) == (False, False)
    with pytest.raises(Rejected):
        store.delete_webhook_endpoint("whe_2", req(t, "r4", "other"))
    assert [e.endpoint_id for e in store.webhook_endpoints(t)] == ["whe_2"]
