"""Assembles and runs the server: config store, Redis (embedded or external), the domain
services, gRPC with health checking and reflection, and the background loops."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from creditmeter import metrics
from creditmeter.api.credits.v1 import (
    credits_pb2,
    credits_pb2_grpc,
    packs_pb2,
    packs_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from creditmeter.constants import (
    BACKLOG_CHECK_INTERVAL_S,
    CONFIG_RELOAD_INTERVAL_S,
    DEFAULT_BACKLOG_CAP,
    DEFAULT_DATA_DIR,
    DEFAULT_LISTEN,
    DEFAULT_SESSION_GRACE_S,
    EXPIRY_SWEEP_INTERVAL_S,
    FLUSHER_RESTART_DELAY_S,
    IDEMPOTENCY_TTL_S,
    LEDGER_HEALTH_SERVICE,
    RECHARGE_POLL_S,
    RECONCILE_INTERVAL_S,
    RENEW_INTERVAL_S,
    SESSION_CLOSE_INTERVAL_S,
    SHUTDOWN_GRACE_S,
    WATCH_RETENTION_S,
)
from creditmeter.domain.alerts import BalanceAlerts
from creditmeter.domain.backpressure import Backpressure, LedgerStatus, ledger_status
from creditmeter.domain.clock import Clock, SystemClock
from creditmeter.domain.configuration import LiveConfig
from creditmeter.domain.history import History
from creditmeter.domain.metering import Metering
from creditmeter.domain.packs import Catalog
from creditmeter.domain.purchases import DEFAULT_PENDING_TTL_MS, Purchases
from creditmeter.domain.recharge import RechargePurchases, Recharges
from creditmeter.domain.sessions import Sessions
from creditmeter.domain.staging import reconcile
from creditmeter.domain.subscriptions import Subscriptions
from creditmeter.domain.webhooks import FlushNotices, Webhooks
from creditmeter.errors import BackendUnavailable
from creditmeter.storage.config_store import open_config_store
from creditmeter.storage.deployment import resolve_buckets
from creditmeter.storage.embedded_redis import EmbeddedRedis
from creditmeter.storage.ledger import open_ledger
from creditmeter.storage.ledger.base import Ledger
from creditmeter.storage.ledger.connection import LedgerLink, failure_text
from creditmeter.storage.ledger.flusher import BacklogMeter, Flusher, drain, flusher_stats
from creditmeter.storage.outbox import OutboxReader
from creditmeter.storage.redis_client import Client, connect
from creditmeter.storage.redis_store import RedisStore
from creditmeter.transport.credits_servicer import CreditsServicer
from creditmeter.transport.interceptors import Gatekeeper
from creditmeter.transport.packs_servicer import PacksServicer
from creditmeter.transport.webhook_worker import WebhookTimings, WebhookWorker
from creditmeter.transport.webhooks import WebhooksServicer

if TYPE_CHECKING:
    from creditmeter.transport.connect_gateway import Gateway

log = logging.getLogger(__name__)

CREDITS_SERVICE = credits_pb2.DESCRIPTOR.services_by_name["Credits"].full_name
PACKS_SERVICE = packs_pb2.DESCRIPTOR.services_by_name["Packs"].full_name
WEBHOOKS_SERVICE = webhooks_pb2.DESCRIPTOR.services_by_name["Webhooks"].full_name
#: The services that take calls (health follows the backlog for each).
SERVICES = (CREDITS_SERVICE, PACKS_SERVICE, WEBHOOKS_SERVICE)


@dataclass
class Settings:
    listen: str = DEFAULT_LISTEN
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    #: An existing Redis (redis://, or redis+cluster://SEEDS for a cluster); None starts
    #: the embedded one under data_dir.
    redis_url: str | None = None
    #: Buckets of a new deployment (None: the default for its kind of Redis); an
    #: initialised deployment keeps its own (storage/deployment.py).
    buckets: int | None = None
    #: Replicas each change must reach before it is answered (Redis WAIT); 0: none.
    replica_acks: int = 0
    #: The embedded Redis's fsync policy: always (no acknowledged change lost), everysec, no.
    appendfsync: str = "always"
    #: postgresql://... for PostgreSQL; None for SQLite in data_dir.
    ledger_url: str | None = None
    #: Run a flusher (turn off when `creditmeter flush` runs apart).
    flusher: bool = True
    #: Run it as a child process (`creditmeter flush`, dying with the server) rather than
    #: on the server's event loop: its reads and ledger writes then never hold up a call.
    #: `serve` does; the in-process tests flush inline to drive the flusher themselves.
    flusher_process: bool = False
    backlog_cap: int = DEFAULT_BACKLOG_CAP
    #: How often the scheduler looks for subscription periods that have started.
    renew_interval_s: float = RENEW_INTERVAL_S
    #: How long a two-step purchase waits for CompletePurchase.
    pending_purchase_ttl_ms: int = DEFAULT_PENDING_TTL_MS
    idempotency_ttl_s: int = IDEMPOTENCY_TTL_S
    sweep_interval_s: float = EXPIRY_SWEEP_INTERVAL_S
    #: How long past its validity a silent call session is closed by the server.
    session_grace_s: float = DEFAULT_SESSION_GRACE_S
    session_close_interval_s: float = SESSION_CLOSE_INTERVAL_S
    shutdown_grace_s: float = SHUTDOWN_GRACE_S
    #: How long the flusher keeps flushed outbox entries for WatchBalance resume tokens.
    watch_retention_s: int = WATCH_RETENTION_S
    #: HOST:PORT of the Prometheus /metrics endpoint (port 0: any free port); None: off.
    metrics_listen: str | None = None
    #: HOST:PORT of the HTTP/JSON (Connect) gateway (port 0: any free port); None: off.
    #: It forwards every call to this process's gRPC server (transport/connect_gateway.py).
    http_listen: str | None = None
    #: Run the loops that act on shared state: the expiry sweeper, the session closer, the
    #: subscription renewals and the grant reconciler. Each is safe in several processes at
    #: once; `serve --workers N` runs them in one worker only (see transport/workers.py).
    background_jobs: bool = True
    #: The webhook delivery worker's delays and limits (a background job).
    webhook: WebhookTimings = field(default_factory=WebhookTimings)
    clock: Clock = field(default_factory=SystemClock)


class App:
    """One server process. `start()` returns the bound port; `stop()` drains and closes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.embedded: EmbeddedRedis | None = None
        self.redis: Client | None = None
        self.backlog_meter: BacklogMeter | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.tasks: list[asyncio.Task[None]] = []
        self.port = 0
        self.live: LiveConfig | None = None
        self.metering: Metering | None = None
        self.ledger: Ledger | None = None
        #: Whether this server reaches the ledger; None until start() made it.
        self.ledger_link: LedgerLink | None = None
        self.subscriptions: Subscriptions | None = None
        self.sessions: Sessions | None = None
        self.purchases: Purchases | None = None
        #: The webhook delivery worker (None without background jobs).
        self.webhook_worker: WebhookWorker | None = None
        self.flush_notices: FlushNotices | None = None
        #: The in-process flusher (None when a child process flushes, or none does).
        self.flusher: Flusher | None = None
        self.flusher_child: subprocess.Popen[bytes] | None = None
        self.gate = Backpressure(settings.backlog_cap)
        self.metrics: metrics.MetricsEndpoint | None = None
        #: The bound port of the metrics endpoint (0 while it is off).
        self.metrics_port = 0
        self.gateway: Gateway | None = None
        #: The bound port of the HTTP/JSON gateway (0 while it is off).
        self.http_port = 0
        #: Set once on stop: every background loop watches it rather than relying on task
        #: cancellation alone (a cancellation can be swallowed inside a client library).
        self._stopping = asyncio.Event()
        #: Set first on stop: balance watches end their streams rather than hold the
        #: server's drain for the whole grace.
        self._closing = asyncio.Event()

    async def start(self) -> int:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        config = open_config_store(s.ledger_url, s.data_dir)
        url = s.redis_url
        if url is None:
            self.embedded = EmbeddedRedis(s.data_dir, s.appendfsync)
            url = await self.embedded.start()
        self.redis = connect(url)
        self.backlog_meter = BacklogMeter(self.redis)
        await self.redis.ping()
        # Before any key is made: the deployment's number of buckets.
        await resolve_buckets(self.redis, s.buckets)

        self.ledger = ledger = open_ledger(s.ledger_url, s.data_dir)
        # A ledger that does not answer is no reason not to start: metering goes on into
        # the outboxes (up to the backlog cap) while the link keeps trying, and the calls
        # that need the ledger fail UNAVAILABLE / BACKEND_UNAVAILABLE meanwhile, exactly as
        # during an outage of a running server. A configuration error still raises here.
        self.ledger_link = link = LedgerLink(ledger, "server", s.clock.now_ms, self._ledger_health)
        await link.start()
        self.live = live = LiveConfig(config)
        await live.refresh()
        self.metering = metering = Metering(
            RedisStore(self.redis, s.idempotency_ttl_s, s.replica_acks),
            config,
            live.rates,
            s.clock,
            ledger=ledger,
            gate=self.gate,
            limits=live.limits,
        )
        # Before any call: keys an older release named differently get their new names.
        await metering.store.upgrade_layout()
        await metering.store.load_library()
        #: What of the flushed changes webhooks report (used by an in-process flusher).
        self.flush_notices = notices = FlushNotices(config)
        if s.flusher:
            flusher = Flusher(
                self.redis, ledger, retention_ms=s.watch_retention_s * 1000,
                replica_acks=s.replica_acks, notices=notices,
            )  # fmt: skip
            await flusher.ensure_groups()
            if not s.flusher_process:
                self.flusher = flusher

        self.server = grpc.aio.server(
            interceptors=[Gatekeeper(lambda: live.keys)],
            # grpcio's default on Linux, said here because `serve --workers N` relies on
            # it: N processes bind the one port and the kernel spreads connections.
            options=[("grpc.so_reuseport", 1)],
        )
        catalog = Catalog(config, s.clock, s.idempotency_ttl_s)
        self.purchases = purchases = Purchases(
            catalog, ledger, metering.store, s.clock, self.gate, s.pending_purchase_ttl_ms
        )
        self.sessions = sessions = Sessions(
            metering.store, live.rates, s.clock, self.gate, s.session_grace_s, live.limits
        )
        # Each watch gets its own connection: its blocking XREAD must not hold one of the pool's.
        alerts = BalanceAlerts(
            functools.partial(OutboxReader.connect, url), self._closing, s.watch_retention_s
        )
        recharges = Recharges(
            metering.store, config, catalog, live.limits.recharges, s.clock, metering.make_call
        )
        servicer = CreditsServicer(
            metering, History(ledger, metering.store), purchases, self.ledger_status, sessions,
            alerts, recharges,
        )
        credits_pb2_grpc.add_CreditsServicer_to_server(servicer, self.server)
        self.subscriptions = Subscriptions(catalog, ledger, metering.store, s.clock, self.gate)
        packs_pb2_grpc.add_PacksServicer_to_server(
            PacksServicer(catalog, purchases, self.subscriptions), self.server
        )
        webhooks_pb2_grpc.add_WebhooksServicer_to_server(
            WebhooksServicer(
                Webhooks(config, ledger, s.clock, s.idempotency_ttl_s, notices.refresh)
            ),
            self.server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(s.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {s.listen}")
        loopback = None
        if s.http_listen is not None:
            # Imported only here: uvicorn and connectrpc are a third of the server's
            # imports, which a server without --http-listen need not pay for.
            from creditmeter.transport import connect_gateway

            # The gateway's own way in: the same server, interceptors and servicers.
            loopback = connect_gateway.loopback_address()
            if self.server.add_insecure_port(loopback) == 0:
                raise OSError(f"cannot listen on {loopback}")
        await self.server.start()
        if s.http_listen is not None and loopback is not None:
            self.gateway = connect_gateway.Gateway(s.http_listen, loopback, lambda: live.keys)
            self.http_port = await self.gateway.start()
            log.info(
                "HTTP/JSON (Connect) on http://%s:%d", s.http_listen.rsplit(":", 1)[0],
                self.http_port,
            )  # fmt: skip
        if s.metrics_listen is not None:
            self.metrics = metrics.MetricsEndpoint(s.metrics_listen)
            # Binding resolves the host name: off the event loop.
            self.metrics_port = await asyncio.to_thread(self.metrics.start)
            log.info(
                "metrics on http://%s:%d/metrics",
                s.metrics_listen.rsplit(":", 1)[0],
                self.metrics_port,
            )
        metrics.record_backlog(self.gate.backlog, self.gate.cap, self.gate.refusing)
        if self.flusher is None:  # flushed by another process: its figures are in Redis
            metrics.set_flush_lag((await flusher_stats(self.redis)).last_lag_ms)
        # Per process: its view of the config, of the backlog and of the ledger.
        self.tasks = [
            asyncio.create_task(
                self._every(CONFIG_RELOAD_INTERVAL_S, live.refresh), name="config-reload"
            ),
            asyncio.create_task(
                self._every(BACKLOG_CHECK_INTERVAL_S, self._check_backlog), name="backlog-monitor"
            ),
            asyncio.create_task(link.watch(self._stopping), name="ledger-link"),
        ]
        if s.background_jobs:
            self.tasks += [
                asyncio.create_task(
                    self._every(self.settings.sweep_interval_s, metering.sweep_due),
                    name="expiry-sweeper",
                ),
                asyncio.create_task(
                    self._every(RECONCILE_INTERVAL_S, self._reconcile, needs_ledger=True),
                    name="grant-reconciler",
                ),
                asyncio.create_task(
                    self._every(
                        s.renew_interval_s, self.subscriptions.renew_due, needs_ledger=True
                    ),
                    name="subscription-renewals",
                ),
                asyncio.create_task(
                    self._every(s.session_close_interval_s, sessions.close_due),
                    name="session-closer",
                ),
                asyncio.create_task(
                    self._every(
                        RECHARGE_POLL_S,
                        RechargePurchases(ledger, purchases.create, s.clock).run_once,
                        needs_ledger=True,
                    ),
                    name="recharge-purchases",
                ),
            ]
            self.webhook_worker = WebhookWorker(ledger, config, s.clock, s.webhook)
            self.tasks.append(
                asyncio.create_task(
                    self.webhook_worker.run(self._stopping, lambda: link.reachable),
                    name="webhook-worker",
                )
            )
        if self.flusher is not None:
            self.tasks.append(asyncio.create_task(self._flush_inline(self.flusher), name="flusher"))
            self.tasks.append(
                asyncio.create_task(
                    notices.watch(self._stopping, CONFIG_RELOAD_INTERVAL_S),
                    name="webhook-tenants",
                )
            )
        elif s.flusher:
            self.tasks.append(
                asyncio.create_task(self._supervise_flusher(url), name="flusher-process")
            )
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        await self._ledger_health(link.reachable)
        log.info(
            "creditmeter listening on %s (redis %s)",
            s.listen.rsplit(":", 1)[0] + f":{self.port}",
            url,
        )
        return self.port

    async def _every(
        self,
        interval_s: float,
        work: Callable[[], Awaitable[object]],
        needs_ledger: bool = False,
    ) -> None:
        """Run `work` every interval until the server stops; a failure is logged and the
        next round tries again (Redis or the ledger briefly away). Work that `needs_ledger`
        waits while the ledger link finds it unreachable: the link logs the outage, once
        per attempt, and the work would only fail the same way."""
        assert self.ledger_link is not None
        name = getattr(work, "__qualname__", work)
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval_s)
                return
            if needs_ledger and not self.ledger_link.reachable:
                continue
            try:
                await work()
            except BackendUnavailable as error:  # an outage, not a bug: no traceback
                log.warning("%s failed: %s", name, failure_text(error))
            except Exception:
                log.warning("%s failed", name, exc_info=True)

    async def _ledger_health(self, reachable: bool) -> None:
        """The ledger's own health entry follows the link (the others follow the backlog)."""
        serving = health_pb2.HealthCheckResponse
        await self.health.set(
            LEDGER_HEALTH_SERVICE, serving.SERVING if reachable else serving.NOT_SERVING
        )

    async def _flush_inline(self, flusher: Flusher) -> None:
        """The in-process flusher: once the ledger has been opened, flush until stopped."""
        assert self.ledger_link is not None
        if await self.ledger_link.wait_open(self._stopping):
            await flusher.run(self._stopping)

    async def _check_backlog(self) -> None:
        """Fail closed when the ledger falls too far behind, and say so in health."""
        assert self.backlog_meter is not None
        changed = self.gate.update(await self.backlog_meter.check())
        metrics.record_backlog(self.gate.backlog, self.gate.cap, self.gate.refusing)
        if not changed:
            return
        serving = health_pb2.HealthCheckResponse
        state = serving.NOT_SERVING if self.gate.refusing else serving.SERVING
        log.warning(
            "outbox backlog %d (cap %d): %s",
            self.gate.backlog,
            self.gate.cap,
            "refusing changes" if self.gate.refusing else "accepting changes again",
        )
        for service in ("", *SERVICES):
            await self.health.set(service, state)

    async def _reconcile(self) -> None:
        """Re-apply money-in staged in the ledger that never reached Redis."""
        assert self.ledger is not None and self.metering is not None
        await reconcile(self.metering.store, self.ledger, self.settings.clock.now_ms())

    async def _supervise_flusher(self, redis_url: str) -> None:
        """Run `creditmeter flush` as a child until the server stops, starting it again if
        it exits on its own. On stop it is sent SIGTERM: it flushes what the drained calls
        wrote, then exits."""
        s = self.settings
        command = [
            sys.executable, "-m", "creditmeter", "flush",
            "--data-dir", str(s.data_dir), "--redis-url", redis_url,
            *(["--ledger-url", s.ledger_url] if s.ledger_url else []),
            "--replica-acks", str(s.replica_acks),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        while not self._stopping.is_set():
            # subprocess.Popen rather than the event loop's spawn: CPython spawns with
            # vfork, where a plain fork of a process running gRPC makes gRPC's fork
            # handlers complain. So no preexec_fn either: the child asks for its own death
            # signal (--parent-pid). Its own session: a Ctrl-C reaches only the server,
            # which stops the child once the calls have drained.
            child = await asyncio.to_thread(subprocess.Popen, command, start_new_session=True)
            self.flusher_child = child
            stopping = asyncio.create_task(self._stopping.wait())
            exited = asyncio.create_task(asyncio.to_thread(child.wait))
            await asyncio.wait((stopping, exited), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if exited.done():
                log.warning(
                    "flusher process exited (%s); starting it again", child.returncode
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), FLUSHER_RESTART_DELAY_S)
                continue
            child.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(exited), s.shutdown_grace_s * 2)
            except TimeoutError:
                child.kill()
                await exited

    async def ledger_status(self) -> LedgerStatus:
        assert self.redis is not None and self.ledger_link is not None
        return await ledger_status(self.gate, self.redis, self.ledger_link)

    async def stop(self) -> None:
        """Stop taking calls, let in-flight calls finish (up to the grace), flush what
        they wrote, then close."""
        await self.health.enter_graceful_shutdown()
        self._closing.set()
        grace = self.settings.shutdown_grace_s
        if self.gateway is not None:
            # Both at once: neither takes new calls, and the HTTP calls in flight are gRPC
            # calls in flight, which the gRPC server's grace lets finish.
            await asyncio.gather(
                self.gateway.stop(grace),
                *([self.server.stop(grace)] if self.server is not None else []),
            )
        elif self.server is not None:
            await self.server.stop(grace)
        self._stopping.set()
        if self.flusher is not None and self.ledger_link and self.ledger_link.reachable:
            with contextlib.suppress(Exception):
                await drain(self.flusher, self.settings.shutdown_grace_s)
                await self.flusher.release()
        if self.tasks:
            # The flusher child gets twice the grace: it drains after the calls did.
            _, late = await asyncio.wait(self.tasks, timeout=self.settings.shutdown_grace_s * 3)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=self.settings.shutdown_grace_s)
        if self.ledger is not None:
            await self.ledger.close()
        if self.live is not None:
            await asyncio.to_thread(self.live.store.close)
        if self.redis is not None:
            await self.redis.aclose()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.metrics is not None:
            # Last, so a final scrape during the drain still sees the server's numbers.
            await asyncio.to_thread(self.metrics.stop)
            self.metrics = None


async def serve(settings: Settings, on_ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit cleanly.
    `on_ready` gets the bound port once the server takes calls (a worker tells its
    supervisor so)."""
    app = App(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await app.start()
        if on_ready is not None:
            on_ready(port)
        await stop.wait()
        log.info("shutting down: draining in-flight calls")
    finally:
        await app.stop()
