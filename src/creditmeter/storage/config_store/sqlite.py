"""The SQLite configuration store: `<data dir>/config.db` (WAL, synchronous=FULL), the
embedded default. One file, so one machine: servers that share a PostgreSQL ledger share
its configuration store instead (`postgres.py`)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, astuple
from pathlib import Path

from creditmeter.errors import Rejected
from creditmeter.storage.config_store.base import (
    ConfigDump,
    ConfigSnapshot,
    ConfigStore,
    KeyRow,
    LimitRow,
    PackRow,
    RateRow,
    RechargeRow,
    Request,
    WebhookRow,
)
from creditmeter.storage.config_store.schema import SQLITE_SCHEMA
from creditmeter.storage.migrations import migrate_sqlite


class SqliteConfigStore(ConfigStore):
    """SQLite-backed configuration. Safe to use from several processes at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            migrate_sqlite(db, SQLITE_SCHEMA)

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
            return _version(db)

    def snapshot(self) -> ConfigSnapshot:
        with self._connect() as db:
            db.execute("BEGIN")  # one read transaction: the rows of that version
            try:
                return ConfigSnapshot(
                    _version(db), _keys(db), _rates(db), _limits(db), _recharges(db)
                )
            finally:
                db.execute("COMMIT")

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
            return _keys(db, tenant)

    # --- rates ---------------------------------------------------------------------
    def rates(self) -> list[RateRow]:
        with self._connect() as db:
            return _rates(db)

    def _idempotent(
        self, req: Request, change: Callable[[sqlite3.Connection], str]
    ) -> tuple[str, bool]:
        """Run `change` once per request id, atomically with the record of its response.

        Returns the response and whether the call was a replay (then nothing changed and
        the first call's response is returned). Raises Rejected(IDEMPOTENCY_KEY_REUSED)
        when the id was used with other parameters; a `change` that raises changes
        nothing. Request records older than the TTL are pruned.
        """
        with self._write() as db:
            db.execute("DELETE FROM requests WHERE created_ms < ?", (req.now_ms - req.ttl_ms,))
            prior = db.execute(
                "SELECT fingerprint, response FROM requests WHERE tenant = ? AND request_id = ?",
                (req.tenant, req.request_id),
            ).fetchone()
            if prior is not None:
                if prior[0] != req.fingerprint:
                    raise Rejected("IDEMPOTENCY_KEY_REUSED", {"request_id": req.request_id})
                return str(prior[1]), True
            response = change(db)
            db.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                (req.tenant, req.request_id, req.fingerprint, response, req.now_ms),
            )
            return response, False

    def set_rate(self, row: RateRow, req: Request) -> tuple[str, bool]:
        """Store a rate; the response is its update time. See `_idempotent`."""

        def change(db: sqlite3.Connection) -> str:
            db.execute(
                "INSERT INTO rates VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, feature) DO UPDATE"
                " SET credits_per_unit = excluded.credits_per_unit, unit = excluded.unit,"
                " increment_s = excluded.increment_s, updated_ms = excluded.updated_ms",
                (row.tenant, row.feature, row.credits_per_unit, row.unit, row.increment_s,
                 row.updated_ms),
            )  # fmt: skip
            return str(row.updated_ms)

        return self._idempotent(req, change)

    # --- usage limits --------------------------------------------------------------
    def usage_limits(self) -> list[LimitRow]:
        with self._connect() as db:
            return _limits(db)

    def set_usage_limit(
        self, tenant: str, feature: str, period: str, row: LimitRow | None, req: Request
    ) -> tuple[str, bool]:
        """Store or remove a tenant's limit. See `_idempotent`."""

        def change(db: sqlite3.Connection) -> str:
            if row is None:
                db.execute(
                    "DELETE FROM usage_limits WHERE tenant = ? AND feature = ? AND period = ?",
                    (tenant, feature, period),
                )
                return ""
            db.execute(
                "INSERT OR REPLACE INTO usage_limits VALUES (?, ?, ?, ?, ?, ?)", astuple(row)
            )
            return str(row.updated_ms)

        return self._idempotent(req, change)

    # --- recharge policies -----------------------------------------------------------
    def set_recharge_policy(
        self, tenant: str, row: RechargeRow | None, req: Request
    ) -> tuple[str, bool]:
        """Store or remove a tenant's default recharge policy. See `_idempotent`."""

        def change(db: sqlite3.Connection) -> str:
            if row is None:
                db.execute("DELETE FROM recharge_policies WHERE tenant = ?", (tenant,))
                return ""
            db.execute("INSERT OR REPLACE INTO recharge_policies VALUES (?, ?, ?, ?)", astuple(row))
            return str(row.updated_ms)

        return self._idempotent(req, change)

    # --- packs ---------------------------------------------------------------------
    def put_pack(
        self, pack_id: str, req: Request, build: Callable[[PackRow | None], PackRow]
    ) -> tuple[PackRow, bool]:
        """Write the pack `build` makes of the stored one (None for a new pack id), inside
        one write transaction, so concurrent changes of one pack never lose each other.
        Returns the pack as stored by the first call with this request id, and whether
        this call was a replay. Whatever `build` raises aborts the change."""

        def change(db: sqlite3.Connection) -> str:
            found = db.execute(
                "SELECT * FROM packs WHERE tenant = ? AND pack_id = ?", (req.tenant, pack_id)
            ).fetchone()
            row = build(None if found is None else PackRow(*found))
            values = astuple(row)
            db.execute(
                f"INSERT OR REPLACE INTO packs VALUES ({', '.join('?' * len(values))})", values
            )
            return json.dumps(asdict(row))

        response, replayed = self._idempotent(req, change)
        return PackRow(**json.loads(response)), replayed

    def pack(self, tenant: str, pack_id: str) -> PackRow | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT * FROM packs WHERE tenant = ? AND pack_id = ?", (tenant, pack_id)
            ).fetchone()
            return None if row is None else PackRow(*row)

    def packs(
        self, tenant: str, include_inactive: bool, limit: int, after: tuple[int, str] | None
    ) -> list[PackRow]:
        """Packs by creation (create_ms, pack_id), strictly after `after` if given."""
        sql = "SELECT * FROM packs WHERE tenant = ?"
        params: list[object] = [tenant]
        if not include_inactive:
            sql += " AND active = 1 AND archived = 0"
        if after is not None:
            sql += " AND (create_ms, pack_id) > (?, ?)"
            params.extend(after)
        sql += " ORDER BY create_ms, pack_id LIMIT ?"
        params.append(limit)
        with self._connect() as db:
            return [PackRow(*r) for r in db.execute(sql, params)]

    # --- webhook endpoints ---------------------------------------------------------
    def put_webhook_endpoint(
        self, endpoint_id: str, req: Request, build: Callable[[WebhookRow | None], WebhookRow]
    ) -> tuple[WebhookRow, bool]:
        """See ConfigStore.put_webhook_endpoint (and `_idempotent`)."""

        def change(db: sqlite3.Connection) -> str:
            found = db.execute(
                "SELECT * FROM webhook_endpoints WHERE tenant = ? AND endpoint_id = ?",
                (req.tenant, endpoint_id),
            ).fetchone()
            row = build(None if found is None else WebhookRow(*found))
            values = astuple(row)
            db.execute(
                f"INSERT OR REPLACE INTO webhook_endpoints VALUES ({', '.join('?' * len(values))})",
                values,
            )
            return json.dumps(asdict(row))

        response, replayed = self._idempotent(req, change)
        return WebhookRow(**json.loads(response)), replayed

    def delete_webhook_endpoint(self, endpoint_id: str, req: Request) -> tuple[bool, bool]:
        def change(db: sqlite3.Connection) -> str:
            cur = db.execute(
                "DELETE FROM webhook_endpoints WHERE tenant = ? AND endpoint_id = ?",
                (req.tenant, endpoint_id),
            )
            return "1" if cur.rowcount else ""

        response, replayed = self._idempotent(req, change)
        return bool(response), replayed

    def webhook_endpoints(self, tenant: str | None = None) -> list[WebhookRow]:
        sql = "SELECT * FROM webhook_endpoints"
        params: tuple[str, ...] = ()
        if tenant is not None:
            sql += " WHERE tenant = ?"
            params = (tenant,)
        with self._connect() as db:
            rows = db.execute(f"{sql} ORDER BY create_ms, endpoint_id", params)
            return [WebhookRow(*r) for r in rows]

    def set_webhook_health(
        self, tenant: str, endpoint_id: str, failing_since_ms: int | None, disable_reason: str
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE webhook_endpoints SET failing_since_ms = ?,"
                " disabled = CASE WHEN ? <> '' THEN 1 ELSE disabled END,"
                " disabled_reason = CASE WHEN ? <> '' THEN ? ELSE disabled_reason END"
                " WHERE tenant = ? AND endpoint_id = ?",
                (failing_since_ms, disable_reason, disable_reason, disable_reason, tenant,
                 endpoint_id),
            )  # fmt: skip


def _version(db: sqlite3.Connection) -> int:
    (value,) = db.execute("SELECT value FROM meta WHERE name = 'config_version'").fetchone()
    return int(value)


def _keys(db: sqlite3.Connection, tenant: str | None = None) -> list[KeyRow]:
    query = "SELECT * FROM api_keys"
    params: tuple[str, ...] = ()
    if tenant is not None:
        query += " WHERE tenant = ?"
        params = (tenant,)
    return [KeyRow(*r) for r in db.execute(query + " ORDER BY created_ms, key_id", params)]


def _rates(db: sqlite3.Connection) -> list[RateRow]:
    return [RateRow(*r) for r in db.execute("SELECT * FROM rates ORDER BY tenant, feature")]


def _limits(db: sqlite3.Connection) -> list[LimitRow]:
    return [
        LimitRow(*r)
        for r in db.execute("SELECT * FROM usage_limits ORDER BY tenant, feature, period")
    ]


def _recharges(db: sqlite3.Connection) -> list[RechargeRow]:
    return [RechargeRow(*r) for r in db.execute("SELECT * FROM recharge_policies ORDER BY tenant")]


def read_dump(path: Path) -> ConfigDump:
    """Every row of the config store in `path` (made by this release or 0.1.0, which share
    the schema), read-only: the file is left exactly as it is."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        db.execute("BEGIN")
        return ConfigDump(
            tenants=[
                (str(t), int(c)) for t, c in db.execute("SELECT tenant, created_ms FROM tenants")
            ],
            api_keys=_keys(db),
            rates=_rates(db),
            packs=[PackRow(*r) for r in db.execute("SELECT * FROM packs ORDER BY tenant, pack_id")],
            # A store of 0.1.0 (or 0.2.0) has no usage limits yet.
            limits=_limits(db) if _has_table(db, "usage_limits") else [],
            recharges=_recharges(db) if _has_table(db, "recharge_policies") else [],
            webhooks=[
                WebhookRow(*r)
                for r in db.execute("SELECT * FROM webhook_endpoints ORDER BY tenant, endpoint_id")
            ]
            if _has_table(db, "webhook_endpoints")
            else [],
            requests=[
                (str(t), str(r), str(f), str(s), int(c))
                for t, r, f, s, c in db.execute(
                    "SELECT tenant, request_id, fingerprint, response, created_ms FROM requests"
                )
            ],
        )
    finally:
        db.close()


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    found = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
    return found.fetchone() is not None
