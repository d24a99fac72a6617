"""Every Prometheus metric of the server, defined once, with the helpers that record them.

The metrics live in prometheus_client's default registry and are created at import, so
several `App`s in one process (the tests) share them instead of failing on a duplicate
registration; values are per process, which is what a scrape of one server wants. Any
layer may import this module; it imports nothing of the project but the constants.

`serve --workers N` runs prometheus_client's multiprocess mode: each worker (and the
flusher child) is started with PROMETHEUS_MULTIPROC_DIR set and writes its values to
files there; the supervisor serves one /metrics over all of them
(`multiprocess_registry`), counters and histograms summed over the processes (a dead
worker's counts stay: a counter never goes back), gauges the value last set by any
process (`mostrecent`: every gauge here is a figure of shared state, the same whichever
process looks). The gauge modes are ignored in a single process.

Labels never carry a tenant, an account or a request id: their number is unbounded and a
scrape endpoint is not the place for one tenant's names to be seen beside another's.
`feature` is bounded by the rate cards (features are configured, not free text).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

from creditmeter.constants import REDIS_LATENCY_BUCKETS_S, RPC_LATENCY_BUCKETS_S

# --- RPCs (the interceptor) --------------------------------------------------------
RPCS = Counter(
    "creditmeter_rpcs",
    "credits.v1 RPCs completed, by service, method and gRPC status code "
    "(a stream counts once, when it ends)",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "creditmeter_rpc_duration_seconds",
    "Time from a credits.v1 call reaching the server to its status (streams: to their end)",
    ["service", "method"],
    buckets=RPC_LATENCY_BUCKETS_S,
)

# --- metering (the domain) ------------------------------------------------------------
CREDITS_CONSUMED = Counter(
    "creditmeter_credits_consumed",
    "Credits charged by successful consumptions, by feature (idempotent replays not counted)",
    ["feature"],
)
UNITS_CONSUMED = Counter(
    "creditmeter_units_consumed",
    "Units (messages, billed time increments) of successful consumptions, by feature",
    ["feature"],
)
INSUFFICIENT_CREDITS = Counter(
    "creditmeter_insufficient_credits",
    "Consumptions refused for insufficient credit, by feature",
    ["feature"],
)
SESSIONS_OPEN = Gauge(
    "creditmeter_sessions_open", "Call sessions currently open", multiprocess_mode="mostrecent"
)

# --- ledger ----------------------------------------------------------------------------
OUTBOX_BACKLOG = Gauge(
    "creditmeter_outbox_backlog",
    "Outbox entries not yet acknowledged into the ledger (as the backlog monitor last saw)",
    multiprocess_mode="mostrecent",
)
OUTBOX_BACKLOG_CAP = Gauge(
    "creditmeter_outbox_backlog_cap",
    "Backlog at which changes are refused (--backlog-cap)",
    multiprocess_mode="mostrecent",
)
ACCEPTING_CHANGES = Gauge(
    "creditmeter_accepting_changes",
    "1 while changes are accepted, 0 while the backlog refuses them",
    multiprocess_mode="mostrecent",
)
FLUSH_LAG = Gauge(
    "creditmeter_flush_lag_seconds",
    "Age of the oldest event of the last batch the flusher committed, at its commit",
    multiprocess_mode="mostrecent",
)
EVENTS_FLUSHED = Counter(
    "creditmeter_events_flushed", "Outbox events this process's flusher committed to the ledger"
)

# --- webhooks (the delivery worker) ------------------------------------------------------
WEBHOOK_ATTEMPTS = Counter(
    "creditmeter_webhook_attempts",
    "Webhook delivery attempts, by outcome (delivered, http_error, timeout, network_error)",
    ["outcome"],
)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "creditmeter_webhook_endpoints_disabled",
    "Webhook endpoints the server disabled after failing for WEBHOOK_DISABLE_AFTER_S",
)
WEBHOOK_DELIVERIES_FAILED = Counter(
    "creditmeter_webhook_deliveries_failed",
    "Webhook deliveries given up (retry window over, or the endpoint gone or disabled)",
)

# --- Redis -----------------------------------------------------------------------------
REDIS_DURATION = Histogram(
    "creditmeter_redis_duration_seconds",
    "Round trip of one Redis call, by operation (the Lua script's name, or snapshot)",
    ["operation"],
    buckets=REDIS_LATENCY_BUCKETS_S,
)


# The children of labelled metrics, found once per label set: `labels()` hashes and
# locks on every call, which the hot path pays per RPC. Label sets are bounded (methods,
# codes, configured features, script names), so are these caches.
@functools.cache
def _rpcs(service: str, method: str, code: str) -> Any:
    return RPCS.labels(service, method, code)


@functools.cache
def _rpc_duration(service: str, method: str) -> Any:
    return RPC_DURATION.labels(service, method)


@functools.cache
def _consumed(feature: str) -> tuple[Any, Any]:
    return CREDITS_CONSUMED.labels(feature), UNITS_CONSUMED.labels(feature)


@functools.cache
def _insufficient(feature: str) -> Any:
    return INSUFFICIENT_CREDITS.labels(feature)


@functools.cache
def redis_duration(operation: str) -> Any:
    """The Redis round-trip histogram of one operation (a script's name, or snapshot)."""
    return REDIS_DURATION.labels(operation)


def record_rpc(service: str, method: str, code: str, seconds: float) -> None:
    """Count one finished RPC with its status code name (OK, NOT_FOUND, ...)."""
    _rpcs(service, method, code).inc()
    _rpc_duration(service, method).observe(seconds)


def rpc_recorder(service: str, method: str) -> Callable[[str, float], None]:
    """`record_rpc` for one method, its children found once (the interceptor keeps one
    per method): a call then pays for the count and the observation only."""
    # Children are found at the first call that needs them, as `record_rpc` would: no
    # series shows before a call of its labels has finished.
    children: dict[str, Any] = {}

    def record(code: str, seconds: float) -> None:
        count = children.get(code)
        if count is None:
            count = children[code] = _rpcs(service, method, code)
        duration = children.get("")
        if duration is None:
            duration = children[""] = _rpc_duration(service, method)
        count.inc()
        duration.observe(seconds)

    return record


def record_consume(feature: str, credits: int, units: int) -> None:
    """A consumption that charged the account (not a replay of an earlier one)."""
    credits_child, units_child = _consumed(feature)
    credits_child.inc(credits)
    units_child.inc(units)


def record_insufficient(feature: str) -> None:
    """A consumption refused because the balance did not cover it."""
    _insufficient(feature).inc()


def record_backlog(backlog: int, cap: int, refusing: bool) -> None:
    OUTBOX_BACKLOG.set(backlog)
    OUTBOX_BACKLOG_CAP.set(cap)
    ACCEPTING_CHANGES.set(0 if refusing else 1)


def record_flush(events: int, lag_ms: int) -> None:
    """A batch of `events` committed to the ledger, its oldest `lag_ms` old."""
    EVENTS_FLUSHED.inc(events)
    FLUSH_LAG.set(lag_ms / 1000)


def set_flush_lag(lag_ms: int) -> None:
    """The lag of the last batch a flusher in another process committed."""
    FLUSH_LAG.set(lag_ms / 1000)


def set_sessions_open(n: int) -> None:
    """The number of open call sessions (set by the sessions service)."""
    SESSIONS_OPEN.set(n)


def record_webhook_attempt(outcome: str) -> None:
    WEBHOOK_ATTEMPTS.labels(outcome).inc()


def record_webhook_endpoint_disabled() -> None:
    WEBHOOK_ENDPOINTS_DISABLED.inc()


def record_webhook_delivery_failed() -> None:
    WEBHOOK_DELIVERIES_FAILED.inc()


def multiprocess_registry(path: str) -> CollectorRegistry:
    """A registry of every process writing to `path` as its PROMETHEUS_MULTIPROC_DIR (the
    workers of `serve --workers N` and their flusher), for the supervisor's endpoint."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return registry


class MetricsEndpoint:
    """The /metrics HTTP endpoint on its own thread (prometheus_client's WSGI server), so a
    scrape never waits on the event loop; `stop()` closes the socket. `registry`: the
    default one (this process's metrics) unless given."""

    def __init__(self, listen: str, registry: CollectorRegistry | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]") or "0.0.0.0"
        self._port = int(port)
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Bind and serve; returns the bound port (useful with port 0)."""
        if self._registry is None:
            self._server, self._thread = start_http_server(self._port, self._host)
        else:
            self._server, self._thread = start_http_server(
                self._port, self._host, registry=self._registry
            )
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
