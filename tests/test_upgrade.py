"""Upgrades lose nothing: the data directory of release 0.1.0 (tests/fixtures/release_0_1_0,
made by its generate.py with the 0.1.0 code: SQLite ledger, config store, and the embedded
Redis's AOF in the old key layout) opens with this release, which migrates the ledger's and
the config store's schemas and renames and converts its keys; balances, sessions and every
request's retry answer as before; the audit is clean; a second start changes nothing (no
schema change, no key converted). Likewise a PostgreSQL ledger of 0.1.0 (ledger.pg.sql, a
pg_dump made by make_pg.py, with its data directory data_pg) loaded into a new database."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.api.credits.v1 import packs_pb2, packs_pb2_grpc
from creditmeter.domain.clock import ManualClock
from creditmeter.domain.recovery import Recovery
from creditmeter.storage.config_store import schema as config_schema
from creditmeter.storage.layout import LAYOUT_KEY, LAYOUT_VERSION
from creditmeter.storage.ledger import schema as ledger_schema
from creditmeter.storage.ledger.flusher import drain
from creditmeter.storage.migrations import postgres_catalog, postgres_version
from creditmeter.storage.redis_store import RedisStore
from creditmeter.transport.server import App, Settings
from tests.pg import PostgresServer

FIXTURE = Path(__file__).parent / "fixtures" / "release_0_1_0"
MESSAGES = {n: getattr(m, n) for m in (pb, packs_pb2) for n in dir(m)}


class Release:
    """The 0.1.0 data to upgrade: a data directory, and the PostgreSQL ledger's URL if the
    ledger is there rather than in the directory."""

    def __init__(self, tmp_path: Path, ledger_url: str | None) -> None:
        self.ledger_url = ledger_url
        self.data = tmp_path / "data"
        shutil.copytree(FIXTURE / ("data" if ledger_url is None else "data_pg"), self.data)
        name = "expected.json" if ledger_url is None else "expected.pg.json"
        self.expected: dict[str, Any] = json.loads((FIXTURE / name).read_text())

    async def schema(self) -> Any:
        """What a start that changed nothing leaves as it was: SQLite's schema cookies
        (changed by any DDL), or PostgreSQL's versions and catalog (its tables, their
        columns and its indexes; not pg_class's oids, which every new pooled connection's
        temporary staging tables take)."""
        if self.ledger_url is None:
            cookies = []
            for name in ("ledger.db", "config.db"):
                with sqlite3.connect(self.data / name) as db:
                    cookies.append(db.execute("PRAGMA schema_version").fetchone()[0])
            return cookies
        conn = await asyncpg.connect(self.ledger_url)
        try:
            return (
                await postgres_version(conn, ledger_schema.POSTGRES_SCHEMA),
                await postgres_version(conn, config_schema.POSTGRES_SCHEMA),
                await postgres_catalog(conn),
            )
        finally:
            await conn.close()

    async def versions(self) -> tuple[int | None, int | None]:
        """The ledger's and the config store's schema versions."""
        if self.ledger_url is None:
            found = []
            for name, meta in (("ledger.db", "ledger_meta"), ("config.db", "meta")):
                with sqlite3.connect(self.data / name) as db:
                    row = db.execute(
                        f"SELECT value FROM {meta} WHERE name = 'schema_version'"
                    ).fetchone()
                    found.append(row[0])
            return found[0], found[1]
        version = await self.schema()
        return version[0], version[1]


@pytest.fixture(params=["sqlite", "postgres"])
def release(request: pytest.FixtureRequest, tmp_path: Path) -> Release:
    if request.param == "sqlite":
        return Release(tmp_path, None)
    url: str = request.getfixturevalue("fresh_postgres_url")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.psql((FIXTURE / "ledger.pg.sql").read_text(), database=url.rsplit("/", 1)[1])
    return Release(tmp_path, url)


def when_made(calls: list[dict[str, Any]]) -> int:
    """The time of the fixture's last call (ms): the test's clock starts there, so that
    nothing it granted has expired, however long ago the fixture was made."""
    times = [
        c["response"].get("consumeTime") or c["response"].get("lot", {}).get("createTime")
        for c in calls
    ]
    last = max(t for t in times if t)
    return int(datetime.fromisoformat(last.replace("Z", "+00:00")).timestamp() * 1000)


async def start(release: Release, clock: ManualClock) -> App:
    app = App(Settings(listen="127.0.0.1:0", data_dir=release.data, clock=clock, flusher=True,
                       shutdown_grace_s=1.0, ledger_url=release.ledger_url))  # fmt: skip
    await app.start()
    return app


def request_of(call: dict[str, Any]) -> Any:
    name = f"{call['method']}Request"
    return json_format.ParseDict(call["request"], MESSAGES[name]())


async def test_a_data_directory_of_0_1_0_opens_migrates_and_audits_clean(
    release: Release,
) -> None:
    fixture = release.expected
    clock = ManualClock(when_made(fixture["calls"]) + 1_000)
    app = await start(release, clock)
    try:
        md = (("authorization", f"Bearer {fixture['key']}"),)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stubs = {
                "Credits": pb_grpc.CreditsStub(channel),
                "Packs": packs_pb2_grpc.PacksStub(channel),
            }
            # Every request of 0.1.0, retried: the answer it gave then.
            for call in fixture["calls"]:
                rpc = getattr(stubs[call["service"]], call["method"])
                response = await rpc(request_of(call), metadata=md)
                assert json_format.MessageToDict(response) == call["response"], call["method"]
            credits = stubs["Credits"]
            # The state it left: balances, the open session, usage.
            balances = {}
            for a in ("user:42", "plain", "vip", "buyer"):
                view = await credits.GetBalance(pb.GetBalanceRequest(account_id=a), metadata=md)
                balances[a] = view.balance
            # user:42: 130 granted, 4 texts, one 60 s increment of voice, 3 increments held.
            assert balances == {"user:42": 122, "plain": 430, "vip": -1, "buyer": 195}
            session = await credits.GetSession(
                pb.GetSessionRequest(account_id="user:42", session_id="call-7"), metadata=md
            )
            assert session.session.state == pb.SESSION_STATE_OPEN
            # And it goes on: the session's next step, a new charge.
            ended = await credits.EndSession(
                pb.EndSessionRequest(account_id="user:42", session_id="call-7", sequence=2,
                                     used_seconds=30),
                metadata=md,
            )  # fmt: skip
            assert ended.session.state == pb.SESSION_STATE_ENDED
            consumed = await credits.Consume(
                pb.ConsumeRequest(account_id="user:42", feature="text", request_id="after:1"),
                metadata=md,
            )
            assert consumed.balance == ended.balance - 1
        assert app.redis is not None and app.ledger is not None and app.flusher is not None
        assert await app.redis.get(LAYOUT_KEY) == LAYOUT_VERSION
        assert not [k async for k in app.redis.scan_iter("cm:{b*}:*:acct")]  # all converted
        await drain(app.flusher, 10)
        checked, drifts = await Recovery(app.ledger, RedisStore(app.redis)).audit(
            fixture["tenant"], 5.0
        )
        assert (checked, drifts) == (4, [])
    finally:
        await app.stop()
    latest = (ledger_schema.SQLITE_SCHEMA.latest, config_schema.SQLITE_SCHEMA.latest)
    assert await release.versions() == latest
    # A second start is a no-op: no migration, no key converted.
    schema = await release.schema()
    again = await start(release, clock)
    try:
        assert again.metering is not None
        assert await again.metering.store.upgrade_layout() == 0
        assert await release.schema() == schema
    finally:
        await again.stop()
