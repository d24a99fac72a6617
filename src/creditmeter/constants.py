"""Every tunable number and name of the project, in one place."""

from __future__ import annotations

# --- credits -----------------------------------------------------------------
#: Lua numbers are doubles: integers are exact only up to 2^53 - 1.
MAX_CREDITS = 2**53 - 1
DEFAULT_PRIORITY = 50
MAX_PRIORITY = 9999
#: Sort value standing for "never expires" in burn keys (13 digits of ms, year 2286).
NEVER_EXPIRES_MS = 9_999_999_999_999
#: Latest accepted expiry: the burn key's expiry field has 13 digits.
MAX_EXPIRY_MS = NEVER_EXPIRES_MS - 1

# --- identifiers ---------------------------------------------------------------
MAX_ID_LENGTH = 128
MAX_REFERENCE_LENGTH = 256
MAX_FEATURE_LENGTH = 32
TENANT_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
#: Account ids: no braces (they delimit Redis hash tags) and no whitespace.
ACCOUNT_ID_PATTERN = r"[A-Za-z0-9._:@+=-]{1,128}"
FEATURE_PATTERN = r"[a-z][a-z0-9_]{0,31}"

# --- rates ---------------------------------------------------------------------
DEFAULT_BILLING_INCREMENT_S = 60
MAX_BILLING_INCREMENT_S = 86_400
#: Built-in features and their default price (credits per unit) until a tenant sets one.
BUILTIN_COUNT_FEATURES = {"text": 1}
BUILTIN_TIME_FEATURES = {"voice": 1, "video": 1}

# --- Redis layout --------------------------------------------------------------
KEY_PREFIX = "cm"
#: Accounts are spread over this many hash-tag buckets; each bucket has its own outbox
#: stream and expiry index in the same slot as its accounts. Changing it remaps every
#: key, so it is fixed for the life of a deployment.
BUCKETS = 64
#: How long an idempotency record lives (at least 24 hours, as the API promises).
IDEMPOTENCY_TTL_S = 24 * 3600

#: Connections to Redis per server process. When all are busy a call waits for one (up
#: to the timeout) instead of failing: bursts queue rather than being shed.
REDIS_POOL_SIZE = 128
REDIS_POOL_TIMEOUT_S = 10.0

# --- ledger and flusher ---------------------------------------------------------------
LEDGER_DB_NAME = "ledger.db"
#: The consumer group every flusher reads the outboxes through.
FLUSH_GROUP = "ledger"
#: Entries read per bucket per XREADGROUP; a batch is everything one read returns.
FLUSH_READ_COUNT = 500
FLUSH_BLOCK_MS = 100
#: A pending entry idle this long belongs to a dead flusher and is claimed by a live one.
FLUSH_CLAIM_IDLE_MS = 15_000
#: How often a flusher trims flushed entries off the outboxes and looks for dead peers.
FLUSH_MAINTENANCE_INTERVAL_S = 1.0
#: Outbox entries not yet in the ledger beyond which metering fails closed (UNAVAILABLE).
DEFAULT_BACKLOG_CAP = 1_000_000
#: Metering resumes once the backlog is back under this fraction of the cap.
BACKLOG_RESUME_FRACTION = 0.9
BACKLOG_CHECK_INTERVAL_S = 0.2
#: A staged (ledger-first) grant not confirmed by its event after this long is re-applied.
STAGED_GRANT_RETRY_AFTER_MS = 10_000
RECONCILE_INTERVAL_S = 2.0
#: How often the scheduler renews subscriptions whose next period has started.
RENEW_INTERVAL_S = 1.0

# --- server --------------------------------------------------------------------
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./data"
ENV_PREFIX = "CREDITMETER_"
CONFIG_DB_NAME = "config.db"
REDIS_DIR_NAME = "redis"
REDIS_SOCKET_NAME = "redis.sock"
#: Unix socket paths longer than this do not fit in sockaddr_un; fall back to TCP.
MAX_UNIX_SOCKET_PATH = 100
#: How often the server looks for new or revoked keys and changed rates.
CONFIG_RELOAD_INTERVAL_S = 0.5
#: How often the expiry sweeper looks for lots whose time has come.
EXPIRY_SWEEP_INTERVAL_S = 1.0
EXPIRY_SWEEP_BATCH = 200
#: How long SIGTERM waits for in-flight calls before cancelling them.
SHUTDOWN_GRACE_S = 10.0
REDIS_START_TIMEOUT_S = 20.0
#: The ErrorInfo domain of every error the server returns.
ERROR_DOMAIN = "creditmeter"

# --- batching ------------------------------------------------------------------
#: Items of one ConsumeBatch call (the proto documents 1 to 1000).
MAX_CONSUME_BATCH = 1000
#: Requests of one Meter stream read but not yet answered: a client that stops reading
#: stops the server reading after this many (plus what the transport buffers).
METER_WINDOW = 256
#: Largest pipelined batch a Meter stream sends to Redis at once.
METER_MAX_BATCH = 64
#: Largest batch of concurrent Consume calls sharing one pipeline.
COALESCE_MAX_BATCH = 256
#: NOSCRIPT retries of one pipeline (a SCRIPT FLUSH between the load and the pipeline).
SCRIPT_LOAD_ATTEMPTS = 3
