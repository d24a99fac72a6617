"""The ledger's schema, one definition for SQLite and PostgreSQL (storage/migrations.py
renders the type placeholders per dialect). Append a migration for every change; never edit
one that has shipped."""

from __future__ import annotations

from creditmeter.storage.migrations import POSTGRES, SQLITE, Backfill, Migration, Schema

#: Where the ledger records its schema version (both dialects).
META_TABLE = "ledger_meta"

MIGRATIONS = (
    # 1: release 0.1.0's schema, as it was (CREATE ... IF NOT EXISTS, so that a ledger of
    # an earlier build gains the tables it lacks). Ledgers made before dc5e978 lack
    # staged_grants.operation: the staged grants of those builds were all plain grants.
    Migration(
        """
CREATE TABLE IF NOT EXISTS events (
  event_id   {text} PRIMARY KEY,
  tenant     {text} NOT NULL,
  account    {text} NOT NULL,
  kind       {text} NOT NULL,
  txn        {text} NOT NULL,
  seq        {int} NOT NULL,
  request_id {text} NOT NULL,
  ts_ms      {int} NOT NULL,
  lot        {text} NOT NULL,
  amount     {int} NOT NULL,
  balance    {int},
  feature    {text} NOT NULL,
  units      {int} NOT NULL,
  priority   {int},
  expires_at {int},
  source     {text} NOT NULL,
  reference  {text} NOT NULL,
  unlimited  {bool}
);
CREATE INDEX IF NOT EXISTS events_account_seq ON events (tenant, account, seq);
CREATE INDEX IF NOT EXISTS events_tenant_time ON events (tenant, kind, ts_ms);
CREATE TABLE IF NOT EXISTS requests (
  tenant      {text} NOT NULL,
  account     {text} NOT NULL,
  request_id  {text} NOT NULL,
  fingerprint {text} NOT NULL,
  reply       {text} NOT NULL,
  txn         {text} NOT NULL,
  ts_ms       {int} NOT NULL,
  PRIMARY KEY (tenant, account, request_id)
);
CREATE INDEX IF NOT EXISTS requests_time ON requests (ts_ms);
CREATE TABLE IF NOT EXISTS staged_grants (
  tenant      {text} NOT NULL,
  account     {text} NOT NULL,
  request_id  {text} NOT NULL,
  fingerprint {text} NOT NULL,
  txn         {text} NOT NULL,
  lot_id      {text} NOT NULL,
  amount      {int} NOT NULL,
  priority    {int} NOT NULL,
  expires_at  {int},
  source      {text} NOT NULL,
  reference   {text} NOT NULL,
  created_ms  {int} NOT NULL,
  operation   {text} NOT NULL,
  PRIMARY KEY (tenant, account, request_id)
);
CREATE INDEX IF NOT EXISTS staged_grants_created ON staged_grants (created_ms);
CREATE TABLE IF NOT EXISTS subscriptions (
  subscription_id {text} PRIMARY KEY,
  tenant          {text} NOT NULL,
  account         {text} NOT NULL,
  pack_id         {text} NOT NULL,
  status          {text} NOT NULL,
  recurrence      {text} NOT NULL,
  pack_name       {text} NOT NULL,
  credits         {int} NOT NULL,
  bonus_credits   {int} NOT NULL,
  rollover_cap    {int} NOT NULL,
  priority        {int} NOT NULL,
  price_minor     {int} NOT NULL,
  currency        {text} NOT NULL,
  anchor_ms       {int} NOT NULL,
  periods_granted {int} NOT NULL,
  next_period_ms  {int} NOT NULL,
  request_id      {text} NOT NULL,
  fingerprint     {text} NOT NULL,
  create_ms       {int} NOT NULL,
  cancel_ms       {int}
);
CREATE UNIQUE INDEX IF NOT EXISTS subscriptions_request ON subscriptions (tenant, request_id);
CREATE INDEX IF NOT EXISTS subscriptions_due ON subscriptions (status, next_period_ms);
CREATE TABLE IF NOT EXISTS purchases (
  purchase_id       {text} PRIMARY KEY,
  tenant            {text} NOT NULL,
  account           {text} NOT NULL,
  pack_id           {text} NOT NULL,
  status            {text} NOT NULL,
  payment_reference {text} NOT NULL,
  pack_name         {text} NOT NULL,
  price_minor       {int} NOT NULL,
  currency          {text} NOT NULL,
  credits           {int} NOT NULL,
  bonus_credits     {int} NOT NULL,
  lot_ids           {text} NOT NULL,
  request_id        {text} NOT NULL,
  fingerprint       {text} NOT NULL,
  trial             {bool} NOT NULL,
  create_ms         {int} NOT NULL,
  complete_ms       {int},
  expire_ms         {int},
  refunded_credits  {int} NOT NULL,
  spent_credits     {int} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS purchases_request ON purchases (tenant, request_id);
CREATE UNIQUE INDEX IF NOT EXISTS purchases_payment_reference
  ON purchases (tenant, payment_reference) WHERE payment_reference <> '';
CREATE UNIQUE INDEX IF NOT EXISTS purchases_trial ON purchases (tenant, pack_id, account)
  WHERE trial;
CREATE INDEX IF NOT EXISTS purchases_tenant_time ON purchases (tenant, create_ms, purchase_id);
CREATE INDEX IF NOT EXISTS purchases_account_time
  ON purchases (tenant, account, create_ms, purchase_id);
""",
        backfill=(Backfill("staged_grants", "operation", "{text} NOT NULL DEFAULT 'grant'"),),
    ),
    # 2: automatic recharge (99ae8b2): the worker's scan of recharge_due crossings.
    Migration(
        """
CREATE INDEX IF NOT EXISTS events_recharge_due ON events (ts_ms)
  WHERE kind = 'recharge_due';
"""
    ),
    # 3: webhooks (695f118): notices written with their change, deliveries fanned out from
    # them; pending purchases found by expiry.
    Migration(
        """
CREATE INDEX IF NOT EXISTS purchases_pending_expiry ON purchases (status, expire_ms);
CREATE TABLE IF NOT EXISTS webhook_notices (
  seq        {serial_pk},
  notice_id  {text} NOT NULL UNIQUE,
  tenant     {text} NOT NULL,
  kind       {text} NOT NULL,
  created_ms {int} NOT NULL,
  data       {text} NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
  delivery_id      {text} PRIMARY KEY,
  tenant           {text} NOT NULL,
  endpoint_id      {text} NOT NULL,
  event_id         {text} NOT NULL,
  event_type       {text} NOT NULL,
  body             {text} NOT NULL,
  status           {text} NOT NULL,
  attempts         {int} NOT NULL,
  create_ms        {int} NOT NULL,
  next_attempt_ms  {int} NOT NULL,
  lease_until_ms   {int} NOT NULL,
  last_attempt_ms  {int},
  last_status_code {int} NOT NULL,
  last_error       {text} NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX IF NOT EXISTS webhook_deliveries_tenant_time
  ON webhook_deliveries (tenant, create_ms, delivery_id);
"""
    ),
    # 4: deliveries done are pruned after 30 days (e4b6215).
    Migration(
        """
CREATE INDEX IF NOT EXISTS webhook_deliveries_time ON webhook_deliveries (create_ms);
"""
    ),
    # 5: a grant says whether its lot rolls over (a subscription period's and its
    # rollover's: renew.lua), which audit and rebuild replay (domain/recovery.py). The
    # grants made before it said so by their reference alone: a bare subscription id
    # ("sub_" and letters or digits; 0.1.0's rule, in _lib.lua then), set from it here once.
    Migration(
        """
ALTER TABLE events ADD COLUMN rolls_over {bool} NOT NULL DEFAULT FALSE;
UPDATE events SET rolls_over = TRUE
  WHERE kind = 'grant' AND substr(reference, 1, 4) = 'sub_' AND length(reference) > 4
    AND trim(substr(reference, 5),
             '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz') = '';
"""
    ),
)

SQLITE_SCHEMA = Schema("SQLite ledger", META_TABLE, MIGRATIONS, SQLITE)
POSTGRES_SCHEMA = Schema("PostgreSQL ledger", META_TABLE, MIGRATIONS, POSTGRES)
