"""The durable configuration store: tenants, API keys, rate cards, config-change requests.

Configuration is not hot state: it lives in SQLite in the data directory (WAL,
synchronous=FULL) and survives the loss of Redis. The methods are blocking; the server
calls them through `asyncio.to_thread`, the CLI directly. Every change bumps a version
number that running servers poll to pick it up within a second.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from creditmeter.errors import Rejected

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
  tenant      TEXT PRIMARY KEY,
  created_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
  key_id      TEXT PRIMARY KEY,
  tenant      TEXT NOT NULL REFERENCES tenants(tenant),
  role        TEXT NOT NULL,
  secret_hash TEXT NOT NULL,
  label       TEXT NOT NULL DEFAULT '',
  created_ms  INTEGER NOT NULL,
  revoked_ms  INTEGER
);
CREATE TABLE IF NOT EXISTS rates (
  tenant           TEXT NOT NULL,
  feature          TEXT NOT NULL,
  credits_per_unit INTEGER NOT NULL,
  unit             TEXT NOT NULL,
  increment_s      INTEGER NOT NULL,
  updated_ms       INTEGER NOT NULL,
  PRIMARY KEY (tenant, feature)
);
CREATE TABLE IF NOT EXISTS requests (
  tenant      TEXT NOT NULL,
  request_id  TEXT NOT NULL,
  fingerprint TEXT NOT NULL,
  response    TEXT NOT NULL,
  created_ms  INTEGER NOT NULL,
  PRIMARY KEY (tenant, request_id)
);
CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('config_version', 0);
"""


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant: str
    role: str
    secret_hash: str
    label: str
    created_ms: int
    revoked_ms: int | None


@dataclass(frozen=True)
class RateRow:
    tenant: str
    feature: str
    credits_per_unit: int
    unit: str
    increment_s: int
    updated_ms: int


class ConfigStore:
    """SQLite-backed configuration. Safe to use from several processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that bumps the config version when it changed anything."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                if db.total_changes:
                    db.execute("UPDATE meta SET value = value + 1 WHERE name = 'config_version'")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def version(self) -> int:
        with self._connect() as db:
            (value,) = db.execute("SELECT value FROM meta WHERE name = 'config_version'").fetchone()
            return int(value)

    # --- keys ----------------------------------------------------------------------
    def add_key(self, row: KeyRow) -> None:
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO tenants (tenant, created_ms) VALUES (?, ?)",
                (row.tenant, row.created_ms),
            )
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    row.key_id,
                    row.tenant,
                    row.role,
                    row.secret_hash,
                    row.label,
                    row.created_ms,
                    None,
                ),
            )

    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        """Revoke a key; False if no live key has that id."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ? AND revoked_ms IS NULL",
                (now_ms, key_id),
            )
            return cur.rowcount == 1

    def api_keys(self, tenant: str | None = None) -> list[KeyRow]:
        with self._connect() as db:
            query = "SELECT * FROM api_keys"
            params: tuple[str, ...] = ()
            if tenant is not None:
                query += " WHERE tenant = ?"
                params = (tenant,)
            return [KeyRow(*r) for r in db.execute(query + " ORDER BY created_ms, key_id", params)]

    # --- rates ---------------------------------------------------------------------
    def rates(self) -> list[RateRow]:
        with self._connect() as db:
            return [RateRow(*r) for r in db.execute("SELECT * FROM rates ORDER BY tenant, feature")]

    def set_rate(
        self, row: RateRow, request_id: str, fingerprint: str, response: str, ttl_ms: int
    ) -> tuple[str, bool]:
        """Store a rate and the response for its request id, atomically.

        Returns the response stored for the request id and whether the call was a replay
        (then nothing changed and the first call's response is returned). Raises
        Rejected(IDEMPOTENCY_KEY_REUSED) when the id was used with other parameters.
        Request records older than `ttl_ms` are pruned.
        """
        with self._write() as db:
            db.execute("DELETE FROM requests WHERE created_ms < ?", (row.updated_ms - ttl_ms,))
            prior = db.execute(
                "SELECT fingerprint, response FROM requests WHERE tenant = ? AND request_id = ?",
                (row.tenant, request_id),
            ).fetchone()
            if prior is not None:
                if prior[0] != fingerprint:
                    raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": request_id})
                return str(prior[1]), True
            db.execute(
                "INSERT INTO rates VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, feature) DO UPDATE"
                " SET credits_per_unit = excluded.credits_per_unit, unit = excluded.unit,"
                " increment_s = excluded.increment_s, updated_ms = excluded.updated_ms",
                (
                    row.tenant,
                    row.feature,
                    row.credits_per_unit,
                    row.unit,
                    row.increment_s,
                    row.updated_ms,
                ),
            )
            db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                (row.tenant, request_id, fingerprint, response, row.updated_ms),
            )
            return response, False
