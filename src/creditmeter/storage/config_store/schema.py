"""The config store's schema for both backends (storage/migrations.py runs it). Migration 1
differs by backend: SQLite's is release 0.1.0's schema as it was, PostgreSQL's the first
schema of that store (it came after 0.1.0, with config_ table names and numbered
migrations from the start, as shipped). Later changes are one definition for both, the
table names prefixed per backend. Append a migration for every change; never edit one that
has shipped."""

from __future__ import annotations

from creditmeter.storage.migrations import POSTGRES, SQLITE, Migration, Schema

_SQLITE_1 = Migration(
    """
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
CREATE TABLE IF NOT EXISTS packs (
  tenant        TEXT NOT NULL,
  pack_id       TEXT NOT NULL,
  name          TEXT NOT NULL,
  description   TEXT NOT NULL,
  credits       INTEGER NOT NULL,
  bonus_credits INTEGER NOT NULL,
  price_minor   INTEGER NOT NULL,
  currency      TEXT NOT NULL,
  validity_days INTEGER NOT NULL,
  recurrence    TEXT NOT NULL,
  rollover_cap  INTEGER NOT NULL,
  priority      INTEGER NOT NULL,
  active        INTEGER NOT NULL,
  trial         INTEGER NOT NULL,
  archived      INTEGER NOT NULL,
  create_ms     INTEGER NOT NULL,
  update_ms     INTEGER NOT NULL,
  PRIMARY KEY (tenant, pack_id)
);
CREATE INDEX IF NOT EXISTS packs_by_creation ON packs (tenant, create_ms, pack_id);
CREATE TABLE IF NOT EXISTS meta (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('config_version', 0);
"""
)

#: Text columns are COLLATE "C" as in the ledger: orders and keyset comparisons follow
#: byte order, as in SQLite.
_POSTGRES_1 = Migration(
    """
    CREATE TABLE config_tenants (
      tenant      TEXT COLLATE "C" PRIMARY KEY,
      created_ms  BIGINT NOT NULL
    );
    CREATE TABLE config_api_keys (
      key_id      TEXT COLLATE "C" PRIMARY KEY,
      tenant      TEXT COLLATE "C" NOT NULL REFERENCES config_tenants (tenant),
      role        TEXT COLLATE "C" NOT NULL,
      secret_hash TEXT COLLATE "C" NOT NULL,
      label       TEXT COLLATE "C" NOT NULL DEFAULT '',
      created_ms  BIGINT NOT NULL,
      revoked_ms  BIGINT
    );
    CREATE TABLE config_rates (
      tenant           TEXT COLLATE "C" NOT NULL,
      feature          TEXT COLLATE "C" NOT NULL,
      credits_per_unit BIGINT NOT NULL,
      unit             TEXT COLLATE "C" NOT NULL,
      increment_s      BIGINT NOT NULL,
      updated_ms       BIGINT NOT NULL,
      PRIMARY KEY (tenant, feature)
    );
    CREATE TABLE config_requests (
      tenant      TEXT COLLATE "C" NOT NULL,
      request_id  TEXT COLLATE "C" NOT NULL,
      fingerprint TEXT COLLATE "C" NOT NULL,
      response    TEXT COLLATE "C" NOT NULL,
      created_ms  BIGINT NOT NULL,
      PRIMARY KEY (tenant, request_id)
    );
    CREATE INDEX config_requests_created ON config_requests (created_ms);
    CREATE TABLE config_packs (
      tenant        TEXT COLLATE "C" NOT NULL,
      pack_id       TEXT COLLATE "C" NOT NULL,
      name          TEXT COLLATE "C" NOT NULL,
      description   TEXT COLLATE "C" NOT NULL,
      credits       BIGINT NOT NULL,
      bonus_credits BIGINT NOT NULL,
      price_minor   BIGINT NOT NULL,
      currency      TEXT COLLATE "C" NOT NULL,
      validity_days BIGINT NOT NULL,
      recurrence    TEXT COLLATE "C" NOT NULL,
      rollover_cap  BIGINT NOT NULL,
      priority      BIGINT NOT NULL,
      active        BOOLEAN NOT NULL,
      trial         BOOLEAN NOT NULL,
      archived      BOOLEAN NOT NULL,
      create_ms     BIGINT NOT NULL,
      update_ms     BIGINT NOT NULL,
      PRIMARY KEY (tenant, pack_id)
    );
    CREATE INDEX config_packs_by_creation ON config_packs (tenant, create_ms, pack_id);
    INSERT INTO config_meta (name, value) VALUES ('config_version', 0);
    -- Names this database's versions in config-cache.json (versions of another database,
    -- or of this one made afresh, say nothing about these).
    INSERT INTO config_meta (name, value)
      VALUES ('store_id', floor(random() * 9007199254740991)::bigint);
    """
)


def _later(t: str) -> tuple[Migration, ...]:
    """Migrations 2.. with the backend's table prefix `t`."""
    return (
        # 2: usage limits per period (6775309).
        Migration(
            f"""
            CREATE TABLE IF NOT EXISTS {t}usage_limits (
              tenant     {{text}} NOT NULL,
              feature    {{text}} NOT NULL,
              period     {{text}} NOT NULL,
              max_usage  {{int}} NOT NULL,
              unit       {{text}} NOT NULL,
              updated_ms {{int}} NOT NULL,
              PRIMARY KEY (tenant, feature, period)
            );
            """
        ),
        # 3: automatic recharge, the tenants' default policies (99ae8b2).
        Migration(
            f"""
            CREATE TABLE IF NOT EXISTS {t}recharge_policies (
              tenant     {{text}} PRIMARY KEY,
              threshold  {{int}} NOT NULL,
              pack_id    {{text}} NOT NULL,
              updated_ms {{int}} NOT NULL
            );
            """
        ),
        # 4: webhook endpoints (695f118).
        Migration(
            f"""
            CREATE TABLE IF NOT EXISTS {t}webhook_endpoints (
              tenant           {{text}} NOT NULL,
              endpoint_id      {{text}} NOT NULL,
              url              {{text}} NOT NULL,
              event_types      {{text}} NOT NULL,
              thresholds       {{text}} NOT NULL,
              description      {{text}} NOT NULL,
              secret           {{text}} NOT NULL,
              disabled         {{bool}} NOT NULL,
              disabled_reason  {{text}} NOT NULL,
              failing_since_ms {{int}},
              create_ms        {{int}} NOT NULL,
              update_ms        {{int}} NOT NULL,
              PRIMARY KEY (tenant, endpoint_id)
            );
            """
        ),
    )


SQLITE_SCHEMA = Schema("SQLite config store", "meta", (_SQLITE_1, *_later("")), SQLITE)
POSTGRES_SCHEMA = Schema(
    "PostgreSQL config store", "config_meta", (_POSTGRES_1, *_later("config_")), POSTGRES
)
