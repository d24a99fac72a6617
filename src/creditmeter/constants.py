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
#: Account ids: no braces, '|' or whitespace. ':' and '%' are fine in ids: the key
#: layout (storage/layout.py) encodes them.
ACCOUNT_ID_PATTERN = r"[A-Za-z0-9._:@+=-]{1,128}"
FEATURE_PATTERN = rf"[a-z][a-z0-9_]{{0,{MAX_FEATURE_LENGTH - 1}}}"

# --- errors --------------------------------------------------------------------
#: Field violations listed in one error's BadRequest (then one "and N more"): the whole
#: status detail stays far below the 8 KiB metadata limit of common clients.
MAX_REPORTED_VIOLATIONS = 20
#: Longest field name or description in a violation (longer ones are cut), and the most
#: characters of field names and descriptions one BadRequest carries in all.
MAX_VIOLATION_TEXT = 120
MAX_VIOLATIONS_TEXT = 2048
#: Violations an error's message names (the BadRequest detail lists the rest).
MESSAGE_VIOLATIONS = 3
#: Undecodable requests are logged at most this often (one WARNING line, with how many
#: were not logged since): a caller with a valid key cannot fill the log with them.
UNDECODABLE_LOG_INTERVAL_S = 10.0

# --- rates ---------------------------------------------------------------------
DEFAULT_BILLING_INCREMENT_S = 60
MAX_BILLING_INCREMENT_S = 86_400
#: Built-in features and their default price (credits per unit) until a tenant sets one.
BUILTIN_COUNT_FEATURES = {"text": 1}
BUILTIN_TIME_FEATURES = {"voice": 1, "video": 1}

# --- usage limits -------------------------------------------------------------------
#: Accounts whose time zone a server remembers (learned from the scripts: see
#: domain/limits.py); one it forgot costs one more round trip on its next charge.
LIMIT_ZONE_CACHE_SIZE = 100_000
#: Longest time zone name accepted (IANA names are at most 32 characters today).
MAX_TIME_ZONE_LENGTH = 64

# --- call sessions ----------------------------------------------------------------
#: Session ids: the characters of account ids, so SIP Call-IDs and URIs fit
#: (`sip:call-1@pbx.example`); no '|' (the open-session index joins
#: "<tenant>:<account>|<session>", and neither id has one).
SESSION_ID_PATTERN = r"[A-Za-z0-9._:@+=-]{1,128}"
#: Quota reserved when a step asks for none: this many billing increments.
DEFAULT_SESSION_QUOTA_UNITS = 3
#: Largest quota one step may ask for, and largest usage one report may carry.
MAX_SESSION_QUOTA_S = 86_400
MAX_SESSION_REPORT_S = 86_400
#: A session whose call server stays silent this long past its validity time is closed
#: by the server (per the session's timeout policy).
DEFAULT_SESSION_GRACE_S = 30.0
SESSION_CLOSE_INTERVAL_S = 1.0
SESSION_CLOSE_BATCH = 200

# --- Redis layout --------------------------------------------------------------
KEY_PREFIX = "cm"
#: Accounts are spread over hash-tag buckets; each bucket has its own outbox stream and
#: indexes in the same slot as its accounts. Changing the number remaps every key, so it is
#: chosen when a deployment is initialised, stored, and read back by every process
#: (storage/deployment.py). A single Redis defaults to 64 (release 0.1.0's fixed number);
#: a Redis Cluster to 1,024, so even 100 shards get about ten buckets each.
DEFAULT_BUCKETS = 64
CLUSTER_DEFAULT_BUCKETS = 1024
#: At most one bucket per hash slot: more would only share slots.
MAX_BUCKETS = 16384
#: How long an idempotency record lives (at least 24 hours, as the API promises).
IDEMPOTENCY_TTL_S = 24 * 3600

#: How long a change waits for `--replica-acks N` replicas (WAIT) before its call fails
#: UNAVAILABLE (the change is made; the retry with the same request id replays it).
REPLICA_ACK_TIMEOUT_MS = 1000
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
#: The run loop's pause after a round that read nothing, and an idle bucket's first wait.
FLUSH_BLOCK_MS = 100
#: A pending entry idle this long belongs to a dead flusher and is claimed by a live one.
FLUSH_CLAIM_IDLE_MS = 15_000
#: The run loop reads an idle bucket again after twice its last wait, from FLUSH_BLOCK_MS
#: up to this: an entry in a bucket idle for a while reaches the ledger within it.
FLUSH_IDLE_POLL_MAX_MS = 1000
#: A flusher's hold on a bucket (storage/leases.py), renewed every maintenance round: a
#: flusher that dies leaves its buckets to its peers this long after its last renewal.
FLUSH_LEASE_MS = 5_000
#: How often a flusher renews its leases (and takes or gives up buckets).
FLUSH_MAINTENANCE_INTERVAL_S = 1.0
#: How often it trims flushed entries off its buckets' outboxes and claims entries left
#: pending by dead peers (both a pipeline per bucket: at 1,024 buckets, every second cost
#: an idle flusher a tenth of a core).
FLUSH_CLEANUP_INTERVAL_S = 5.0
#: Every flusher's figures (events committed, lag of its last batch, when), one field per
#: flusher, so the server reports them whichever process flushes.
FLUSHERS_KEY = "cm:flushers"
#: A flusher child that exits on its own is started again after this pause.
FLUSHER_RESTART_DELAY_S = 1.0
#: Outbox entries not yet in the ledger beyond which metering fails closed (UNAVAILABLE).
DEFAULT_BACKLOG_CAP = 1_000_000
#: Metering resumes once the backlog is back under this fraction of the cap.
BACKLOG_RESUME_FRACTION = 0.9
BACKLOG_CHECK_INTERVAL_S = 0.2
#: Buckets whose backlog a server works out per check (in turn: see BacklogMeter).
BACKLOG_CHECK_BUCKETS = 64
#: A ledger that does not answer (at start or later) is tried again after a pause that
#: starts here and doubles per failed attempt up to the cap; a success resets it. Opening
#: (which creates or checks the schema), the server's ping and the flusher's retries all
#: pause this way, each logging one WARNING per failed attempt.
LEDGER_RETRY_INITIAL_S = 0.5
LEDGER_RETRY_MULTIPLIER = 2.0
LEDGER_RETRY_MAX_S = 5.0
#: How often a server pings a ledger that answers (so status and health notice an outage).
LEDGER_CHECK_INTERVAL_S = 1.0
#: A ping that takes longer counts as the ledger not answering. Above SQLite's busy
#: timeout (5 s), so a ledger file merely locked by a long write reports its own error.
LEDGER_PING_TIMEOUT_S = 10.0
#: The grpc.health.v1 service name that reports the ledger: SERVING while this server
#: reaches it, NOT_SERVING while it does not. ("", credits.v1.Credits and credits.v1.Packs
#: follow the backlog instead: metering goes on while the ledger is down.)
LEDGER_HEALTH_SERVICE = "creditmeter.ledger"
#: A staged (ledger-first) grant not confirmed by its event after this long is re-applied.
STAGED_GRANT_RETRY_AFTER_MS = 10_000
RECONCILE_INTERVAL_S = 2.0
#: Staged grants the reconciler reads per pass.
RECONCILE_BATCH = 100
#: How often the scheduler renews subscriptions whose next period has started.
RENEW_INTERVAL_S = 1.0

# --- balance alerts (WatchBalance) ------------------------------------------------------
#: Flushed outbox entries are kept this long so a watcher can resume from its token; the
#: flusher trims below min(oldest unflushed entry, now - this). Entries are small, but the
#: window holds every event of these seconds: memory grows with the event rate.
WATCH_RETENTION_S = 300
#: Thresholds per watch (besides zero, always watched).
MAX_WATCH_THRESHOLDS = 16
#: XREAD BLOCK of a watcher: a change arrives at once; this only bounds how long a watcher
#: takes to notice that its client left or the server is stopping.
WATCH_BLOCK_MS = 250
#: A tenant-wide watch on a Redis Cluster reads each outbox on its own (no blocking read
#: spans slots): a busy one this often, an idle one after twice its last wait, up to
#: WATCH_IDLE_POLL_MAX_MS (a read of 1,024 outboxes is about 18 ms of a server's CPU).
WATCH_POLL_MS = 50
WATCH_IDLE_POLL_MAX_MS = 1000
#: Entries read per outbox per XREAD of a watcher.
WATCH_READ_COUNT = 500
#: A resume token longer than this is refused before it is decoded: this much, plus
#: RESUME_TOKEN_BYTES_PER_BUCKET per bucket of the deployment (a tenant-wide token holds a
#: position per bucket: 622 characters at 64 buckets, 9,072 at 1,024, measured).
MAX_RESUME_TOKEN_LENGTH = 4096
RESUME_TOKEN_BYTES_PER_BUCKET = 12

# --- server --------------------------------------------------------------------
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./data"
ENV_PREFIX = "CREDITMETER_"
CONFIG_DB_NAME = "config.db"
#: On a PostgreSQL config store: the last configuration this data directory's servers
#: loaded, served by a server that starts while PostgreSQL does not answer.
CONFIG_CACHE_NAME = "config-cache.json"
REDIS_DIR_NAME = "redis"
REDIS_SOCKET_NAME = "redis.sock"
#: Unix socket paths longer than this do not fit in sockaddr_un; fall back to TCP.
MAX_UNIX_SOCKET_PATH = 100
#: Verified authorization headers a server remembers (see KeyRing.authenticate).
MAX_VERIFIED_KEYS = 10_000
#: How often the server looks for new or revoked keys and changed rates.
CONFIG_RELOAD_INTERVAL_S = 0.5
#: How often the expiry sweeper looks for lots whose time has come.
EXPIRY_SWEEP_INTERVAL_S = 1.0
EXPIRY_SWEEP_BATCH = 200
#: How long SIGTERM waits for in-flight calls before cancelling them.
SHUTDOWN_GRACE_S = 10.0
#: `serve --workers N`: a worker that exits on its own is started again after this pause
#: (after this many deaths within WORKER_CRASH_WINDOW_S the supervisor gives up and exits).
WORKER_RESTART_DELAY_S = 1.0
WORKER_MAX_RESTARTS = 5
WORKER_CRASH_WINDOW_S = 60.0
#: How long a worker may take from spawn to taking calls (imports, Redis, the ledger).
WORKER_START_TIMEOUT_S = 60.0
REDIS_START_TIMEOUT_S = 20.0
#: The ErrorInfo domain of every error the server returns.
ERROR_DOMAIN = "creditmeter"

# --- Python SDK (creditmeter.client) ---------------------------------------------
#: Deadline of each attempt of a call, in seconds, unless the caller gives one.
CLIENT_DEFAULT_TIMEOUT_S = 10.0
#: Attempts of one call in all (the first included) before its error is raised.
CLIENT_RETRY_MAX_ATTEMPTS = 4
CLIENT_RETRY_INITIAL_BACKOFF_S = 0.1
CLIENT_RETRY_MAX_BACKOFF_S = 2.0
CLIENT_RETRY_BACKOFF_MULTIPLIER = 2.0
#: A call session reports this long before its quota or validity runs out...
SESSION_REPORT_MARGIN_S = 5.0
#: ...or this fraction of the time granted, when that is shorter (short quotas).
SESSION_REPORT_MARGIN_FRACTION = 0.2
#: Never report more often than this, whatever the server's clock says.
SESSION_MIN_REPORT_INTERVAL_S = 0.5

# --- benchmark (creditmeter bench) --------------------------------------------------
BENCH_DURATION_S = 10.0
#: Calls in flight per load process (closed loop: each waits for its answer).
BENCH_CONCURRENCY = 64
BENCH_CHANNELS_PER_PROCESS = 1
#: Accounts the load spreads over, each granted BENCH_GRANT credits first.
BENCH_ACCOUNTS = 200
BENCH_GRANT = 10**12
#: Items per ConsumeBatch call, and requests in flight per Meter stream.
BENCH_BATCH_SIZE = 100
#: Share of `mixed` iterations that are a text Consume; the rest are a voice session cycle.
BENCH_MIXED_TEXT_SHARE = 0.9
BENCH_SESSION_SECONDS = 60
BENCH_CALL_TIMEOUT_S = 10.0
#: GetLedgerStatus sampling period while load runs (flush lag percentiles come from it).
BENCH_LEDGER_SAMPLE_S = 0.1
#: How long the backlog may take to reach 0 after the load stops.
BENCH_DRAIN_TIMEOUT_S = 30.0
#: How often the drain scenario asks whether the backlog is gone (its figure's resolution).
BENCH_DRAIN_POLL_S = 0.2
#: Open-loop rate of the latency-at-load run, as a share of the measured closed-loop maximum.
BENCH_LATENCY_LOAD_SHARE = 0.5
#: redis-benchmark: connections, pipelining depths, and the idempotency TTL of its records
#: (short, so the records of millions of EVALSHAs do not stay in Redis for 24 hours).
BENCH_REDIS_CLIENTS = 50
BENCH_REDIS_PIPELINES = (1, 16, 64)
BENCH_REDIS_IDEM_TTL_S = 30
#: redis-benchmark's -r is an int: random fields range below this.
BENCH_REDIS_KEYSPACE = 2_000_000_000
BENCH_REDIS_CALIBRATION_CALLS = 20_000
BENCH_OUT_DIR = "./bench-results"
#: Every scenario in the order a full run takes them (the empty ceiling first; the peer,
#: memory and drain figures on servers of their own; the Redis ceiling last: its millions
#: of outbox entries must not weigh on the others). `reference` runs whenever a scenario
#: with Redis figures does: their ratios need it.
BENCH_SCENARIOS = (
    "empty", "consume", "check", "batch", "meter", "sessions", "mixed", "latency", "workers",
    "http", "reference", "memory", "peer", "drain", "lua-cost", "redis",
)  # fmt: skip
#: The `workers` scenario: unary Consume against `serve --workers N` for each N here, each
#: on a server of its own, in one run (the figure is the ratio of the last to the first).
BENCH_WORKERS_COMPARED = (1, 2)
#: Its channels per load process, at least: each channel is one TCP connection, and the
#: kernel hashes connections over the workers, so a few per worker keep the split even.
BENCH_WORKERS_CHANNELS = 8
#: The reference script (bench/reference.lua) under redis-benchmark: pipelining depth.
#: commandstats times a call inside Redis, so the depth barely moves its usec_per_call.
BENCH_REFERENCE_PIPELINE = 16
#: Its MAXLEN ~ on the reference stream, so millions of calls keep a bounded stream.
BENCH_REFERENCE_STREAM_MAXLEN = 100_000
#: The reference script's keys: a slot of their own, no creditmeter key (`cm:`).
BENCH_REFERENCE_KEY_PREFIX = "cmbench:{reference}"
#: Memory figure: one-lot accounts granted on a server of its own, and how many of them
#: are granted at once; their keys are measured one by one on this many sample accounts.
BENCH_MEMORY_ACCOUNTS = 20_000
BENCH_SEED_IN_FLIGHT = 256
BENCH_MEMORY_SAMPLE_ACCOUNTS = 20
#: The PostgreSQL peer: pgbench connections (the issue's hand-rolled deduction).
BENCH_PEER_CLIENTS = 32
#: Flusher drain figure: outbox entries written with no flusher, then drained into SQLite;
#: the consume scripts that write them go in pipelines of this many, this many at once.
BENCH_DRAIN_BACKLOG = 1_000_000
BENCH_DRAIN_PIPELINE = 500
BENCH_DRAIN_WRITERS = 4
#: lua-cost scenario: calls counted per script under callgrind, over this many accounts.
BENCH_LUA_COST_CALLS = 1000
#: Charges per consume_batch call in the lua-cost scenario.
BENCH_LUA_COST_BATCH = 64
BENCH_LUA_COST_ACCOUNTS = 50
#: `bench --cluster`: the scenarios it runs on the cluster and on the standalone peer (by
#: default all of them), the accounts they spread over unless --accounts says otherwise
#: (the issue judges the primaries' shares over 1,000), the replica acks of its third
#: server, and the nodes' fsync policy: the standalone server's embedded Redis's, so that
#: the two differ in sharding, not in durability.
BENCH_CLUSTER_SCENARIOS = ("consume", "batch", "meter")
BENCH_CLUSTER_ACCOUNTS = 1000
BENCH_CLUSTER_REPLICA_ACKS = 1
BENCH_CLUSTER_APPENDFSYNC = "always"
#: Latency histograms: 1 us to 60 s at 3 significant digits.
BENCH_HISTOGRAM_MAX_US = 60_000_000
BENCH_HISTOGRAM_DIGITS = 3
# Targets printed beside the figures.
TARGET_UNARY_SHARE_OF_EMPTY = 0.8
TARGET_BULK_DEDUCTIONS_PER_S = 100_000
TARGET_BULK_SUSTAINED_S = 60.0
TARGET_FLUSH_LAG_P99_MS = 1000.0
TARGET_LATENCY_AT_LOAD_P99_MS = 5.0
#: Unary Consume's p99 at BENCH_LATENCY_LOAD_SHARE of its maximum, as a multiple of the
#: empty call's p99 at the same offered rate.
TARGET_LATENCY_VS_EMPTY_P99 = 2.0
#: Redis time per deduction (commandstats of the scripts / deductions) as a multiple of
#: the reference script's usec_per_call: unary Consume with a request id, and inside
#: batches (ConsumeBatch, Meter).
TARGET_REDIS_UNARY_VS_REFERENCE = 2.0
TARGET_REDIS_BATCH_VS_REFERENCE = 1.2
#: Redis memory of an account holding one lot (bytes; outbox entries and idempotency
#: records apart).
TARGET_ACCOUNT_BYTES = 600
#: ConsumeBatch and Meter deductions/s as a multiple of the PostgreSQL peer's transactions/s.
TARGET_BULK_VS_PEER = 5.0
#: Flusher drain rate into SQLite (outbox entries/s), judged on a backlog of at least this.
TARGET_DRAIN_ENTRIES_PER_S = 100_000
TARGET_DRAIN_BACKLOG = 1_000_000
#: Redis Cluster: every primary's share of the deductions within this of the mean share
#: (judged over BENCH_CLUSTER_ACCOUNTS accounts or more).
TARGET_CLUSTER_SHARE_TOLERANCE = 0.15

# --- metrics and logs ---------------------------------------------------------------
#: RPC latency histogram buckets (s): a Consume is one script call (about a millisecond);
#: the upper buckets catch pool waits and streams.
RPC_LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
)  # fmt: skip
#: Redis round trips are sub-millisecond when healthy; the tail shows a loaded server.
REDIS_LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
)  # fmt: skip
LOG_FORMATS = ("text", "json")
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The same in a worker of `serve --workers N`: which worker wrote the line.
TEXT_WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s worker %(worker)s %(name)s: %(message)s"

# --- batching ------------------------------------------------------------------
#: Items of one ConsumeBatch call (the proto documents 1 to 1000).
MAX_CONSUME_BATCH = 1000
#: Entries of the other repeated request fields (the proto documents each): kinds and
#: features of a ListTransactions filter, paths of an UpdatePack mask.
MAX_FILTER_KINDS = 16
MAX_FILTER_FEATURES = 64
MAX_UPDATE_PATHS = 16
#: Requests of one Meter stream read but not yet answered: a client that stops reading
#: stops the server reading after this many (plus what the transport buffers).
METER_WINDOW = 256
#: Largest pipelined batch a Meter stream sends to Redis at once.
METER_MAX_BATCH = 64
#: Largest batch of concurrent Consume calls sharing one pipeline.
COALESCE_MAX_BATCH = 256
#: The embedded Redis's hash-max-listpack-value: an account's hash stays a listpack while
#: each field and value is at most this long (a lot's metadata with a reference of
#: MAX_REFERENCE_LENGTH fits). The README asks the same of a Redis given by --redis-url.
REDIS_HASH_MAX_LISTPACK_VALUE = 1024
#: Sends of one pipeline whose functions were missing (a FUNCTION FLUSH between the load and
#: the calls). Five: on a loaded cluster a load reaches every node, and three attempts were
#: seen to lose the race to a flush every 10 ms (test_script_flush_mid_run[cluster]).
SCRIPT_LOAD_ATTEMPTS = 5

# --- automatic recharge (creditmeter.domain.recharge) ------------------------------------
#: How often a server looks for crossings with no pending purchase yet (seconds), and
#: how far back each pass looks (ms): the flush lag is well under this.
RECHARGE_POLL_S = 1.0
RECHARGE_RECENT_MS = 10 * 60 * 1000
#: Every RECHARGE_SWEEP_S (and at start) a pass looks back RECHARGE_LOOKBACK_MS instead,
#: for crossings a ledger outage held back: a crossing older than that when it reaches
#: the ledger gets no purchase (its event is in the history all the same).
RECHARGE_SWEEP_S = 600.0
RECHARGE_LOOKBACK_MS = 3 * 24 * 3600 * 1000
#: Crossings read per query.
RECHARGE_BATCH = 100

# --- webhooks (creditmeter.domain.webhooks, transport/webhook_worker.py) ---------------
#: How often the delivery worker looks for notices to fan out and deliveries due.
WEBHOOK_POLL_S = 0.5
#: Notices fanned out, and deliveries claimed, per round.
WEBHOOK_BATCH = 100
#: A failed attempt is retried after base * 2^(attempts - 1), capped, with full jitter
#: (a delay drawn from [cap / 2, cap]).
WEBHOOK_RETRY_BASE_S = 10.0
WEBHOOK_RETRY_MAX_S = 3600.0
#: A delivery still failing this long after it was made is given up.
WEBHOOK_RETRY_WINDOW_S = 3 * 86_400
#: How long an endpoint has to answer one attempt.
WEBHOOK_TIMEOUT_S = 10.0
#: Attempts in flight to one endpoint at once (per server process).
WEBHOOK_ENDPOINT_CONCURRENCY = 4
#: An endpoint every attempt to which has failed for this long is disabled.
WEBHOOK_DISABLE_AFTER_S = 3 * 86_400
#: How often pending purchases past their expiry are marked expired (purchase.expired).
WEBHOOK_EXPIRY_SWEEP_S = 10.0
#: Deliveries done (delivered or given up) are kept this long for ListWebhookDeliveries
#: and ResendWebhookDelivery, then removed.
WEBHOOK_DELIVERY_RETENTION_S = 30 * 86_400
#: Webhook endpoints per tenant.
MAX_WEBHOOK_ENDPOINTS = 20
#: Longest endpoint URL.
MAX_WEBHOOK_URL = 2048
