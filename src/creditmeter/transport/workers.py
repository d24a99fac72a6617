"""`creditmeter serve --workers N` (N > 1): N server processes on one port, one Redis, one
flusher.

What `serve` becomes is a supervisor. It serves no calls and runs no event loop work of
the server's; it owns what the workers share and starts them:

- **The port.** The supervisor binds the listen address itself first, with SO_REUSEPORT
  and without listening, and keeps that socket for its life. With port 0 this is how the
  one port of all the workers is chosen; with any port it fails at once when something
  else holds it; and the port stays reserved while a worker restarts. A bound socket that
  never listens takes no connections: the kernel spreads them (per TCP connection, by a
  hash of its addresses) over the workers' listening sockets only. Every worker binds the
  same HOST:PORT with `grpc.so_reuseport` (App sets it explicitly). `--http-listen`'s
  port is reserved the same way, and each worker's HTTP/JSON gateway binds it with
  SO_REUSEPORT too (forwarding to its own worker's gRPC server).
- **Redis.** The embedded redis-server is started once, under the data dir, by the
  supervisor (its death signal is the supervisor's); every worker is given its URL as
  `--redis-url`. With `--redis-url` the workers share that Redis instead.
- **The flusher.** One `creditmeter flush` child of the supervisor, exactly as `serve`
  runs it for one process (dying with it, restarted if it exits); the workers run
  none. `--flusher inline` makes worker 0 flush on its loop instead; `--flusher none`
  runs none.
- **The workers.** `creditmeter serve --workers 1` children with the supervisor's
  settings plus `--redis-url`, no flusher and a hidden `--worker-index I`. Worker 0 is
  started alone first and the rest once it takes calls: it creates or migrates the
  ledger's schema and brings Redis to the current key layout before any other process
  touches either (the flusher is started after it too, as a single `serve` does).

**Background work, exactly once.** Per process, in every worker: the config reload (its
own cache of keys and rates), the backlog monitor (its own gate and health) and the
ledger link (its own health). The loops that act on shared state run in **worker 0
only** (`Settings.background_jobs`): the expiry sweeper, the session closer, the
subscription renewals and the grant reconciler. Each of them is already safe run by
several processes at once, since several `serve` processes may share one Redis: a sweep
expires a lot once because the lot is gone afterwards (sweep.lua), a session is closed
once by its script whichever process gets there first, a subscription period is claimed
by a compare-and-set in the ledger, and a staged grant is re-applied under its own
transaction and lot ids, idempotently. So one place is not needed for correctness; it
is chosen so N workers do not multiply the polling of Redis and the ledger by N (for
SQLite, N writers contending for one file with the flusher), nor log the same re-applied
grant N times. While worker 0 restarts those loops pause for a second or two; what
falls due meanwhile is done by its next round (expired credit is never spendable, even
before it is swept).

**A worker that dies** (crash, `kill -9`, out of memory) is started again after
WORKER_RESTART_DELAY_S, on the same port; the other workers keep serving meanwhile (the
kernel sends new connections only to listening sockets), and the calls that were in
flight on the dead one fail `UNAVAILABLE`, which clients retry. A worker that dies
WORKER_MAX_RESTARTS times within WORKER_CRASH_WINDOW_S is taken to be broken (a bad
ledger URL, say): the supervisor then stops everything and exits non-zero. So does a
worker that exits before it ever took calls at start.

**Stopping.** SIGTERM or SIGINT to the supervisor: every worker is sent SIGTERM and
drains its calls (as a single `serve` does), then the flusher is sent SIGTERM and
flushes what they wrote, then Redis is stopped cleanly. Workers and the flusher run in
sessions of their own, so a Ctrl-C reaches only the supervisor, which keeps that order.
Each child asks the kernel for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG via
`--parent-pid`, as the flusher child does), so a `kill -9` of the supervisor leaves no
process behind: the workers drain and exit, and so do the flusher and Redis.

**Metrics.** With `--metrics-listen`, the supervisor serves the one /metrics endpoint
on that address, over every worker's and the flusher's values (prometheus_client's
multiprocess mode: each child writes to files in a private directory, removed at stop;
see `creditmeter.metrics`). One scrape target whatever N, counters summed over the
workers, rather than N ports to configure.

**Logs.** Every child writes to the supervisor's stderr; each worker's records carry
its index (`"worker": I` in JSON, `worker I` after the level in text), so a line says
which process wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from creditmeter import metrics
from creditmeter.constants import (
    FLUSHER_RESTART_DELAY_S,
    WORKER_CRASH_WINDOW_S,
    WORKER_MAX_RESTARTS,
    WORKER_RESTART_DELAY_S,
    WORKER_START_TIMEOUT_S,
)
from creditmeter.storage.embedded_redis import EmbeddedRedis
from creditmeter.transport.server import Settings

log = logging.getLogger(__name__)

#: The environment variable of prometheus_client's multiprocess mode.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkerFailed(RuntimeError):
    """A worker could not start, or kept dying: the supervisor stopped everything."""


class ListenFailed(OSError):
    """The listen address cannot be bound."""


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Bind HOST:PORT with SO_REUSEPORT, not listening; the socket and HOST:<bound port>.

    Raises ListenFailed when the address cannot be bound (taken by a socket without
    SO_REUSEPORT, or by another user, or a host this machine does not have)."""
    host, _, port = listen.rpartition(":")
    bare = host.strip("[]") or None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bare, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, ValueError) as error:
        raise ListenFailed(f"cannot listen on {listen}: {error}") from error
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ListenFailed(f"cannot listen on {listen}: {error.strerror}") from error
    return sock, f"{host}:{sock.getsockname()[1]}"


def worker_command(
    settings: Settings,
    index: int,
    listen: str,
    redis_url: str,
    ready_fd: int,
    http_listen: str | None = None,
) -> list[str]:
    """The command line of worker `index`: `serve --workers 1` with the supervisor's
    settings, the shared Redis and the chosen port (and HTTP port)."""
    s = settings
    if index == 0 and s.flusher and not s.flusher_process:
        flusher = ["--flusher", "inline"]
    else:
        flusher = ["--flusher", "none"]
    return [
        sys.executable, "-m", "creditmeter", "serve", "--workers", "1",
        "--listen", listen, "--data-dir", str(s.data_dir), "--redis-url", redis_url,
        *(["--http-listen", http_listen] if http_listen else []),
        *(["--ledger-url", s.ledger_url] if s.ledger_url else []),
        *flusher,
        *(["--buckets", str(s.buckets)] if s.buckets else []),
        "--replica-acks", str(s.replica_acks),
        "--backlog-cap", str(s.backlog_cap),
        "--pending-purchase-ttl", f"{s.pending_purchase_ttl_ms // 1000}s",
        "--session-grace", f"{round(s.session_grace_s)}s",
        "--worker-index", str(index), "--parent-pid", str(os.getpid()),
        "--ready-fd", str(ready_fd),
    ]  # fmt: skip


def flusher_command(settings: Settings, redis_url: str) -> list[str]:
    """The command line of the shared flusher child (as App runs it for one process)."""
    s = settings
    return [
        sys.executable, "-m", "creditmeter", "flush",
        "--data-dir", str(s.data_dir), "--redis-url", redis_url,
        *(["--ledger-url", s.ledger_url] if s.ledger_url else []),
        "--replica-acks", str(s.replica_acks),
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


def tell_ready(fd: int, port: int) -> None:
    """In a worker: tell the supervisor (through the pipe it passed) that calls are taken."""
    os.write(fd, f"{port}\n".encode())
    os.close(fd)


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable (data, end of file, or a pidfd whose process exited)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _exit_code(process: subprocess.Popen[bytes]) -> int:
    """Wait for the child to exit without a thread: its pidfd becomes readable then."""
    if process.returncode is not None:  # reaped already: its pid may be another's now
        return process.returncode
    pidfd = os.pidfd_open(process.pid)
    try:
        await _readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()


async def _read_ready(fd: int) -> bool:
    """Whether the worker at the other end of the pipe wrote its ready line (False: it
    closed the pipe first, i.e. exited)."""
    data = b""
    while b"\n" not in data:
        await _readable(fd)
        chunk = os.read(fd, 64)
        if not chunk:
            return False
        data += chunk
    return True


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    #: When it died on its own lately (monotonic seconds), for the crash-loop guard.
    deaths: deque[float] = field(default_factory=deque)

    def exit_text(self) -> str:
        code = None if self.process is None else self.process.poll()
        return "not started" if self.process is None else f"exit status {code}"


class Supervisor:
    """Runs N workers, the shared Redis and flusher, until stopped; see the module doc."""

    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = [_Worker(i) for i in range(workers)]
        self.embedded: EmbeddedRedis | None = None
        self.redis_url = ""
        self.listen = ""
        self.port = 0
        self.flusher: subprocess.Popen[bytes] | None = None
        self.metrics: metrics.MetricsEndpoint | None = None
        self._reservation: socket.socket | None = None
        self.http_listen: str | None = None
        self._http_reservation: socket.socket | None = None
        self._metrics_dir: Path | None = None
        self._env = dict(os.environ)
        self._stopping = asyncio.Event()
        self._failure: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # --- children -----------------------------------------------------------------
    def _spawn(self, command: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
        # From the event loop's thread, which lives as long as the process: the children's
        # death signal follows the thread that forked them. Their own session: a Ctrl-C
        # reaches only the supervisor, which stops them in order. subprocess.Popen (vfork,
        # no preexec_fn), as for the flusher child: each asks for its death signal itself.
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, env=self._env, pass_fds=pass_fds,
            start_new_session=True,
        )  # fmt: skip

    async def _start_worker(self, worker: _Worker) -> bool:
        """Start the worker and wait until it takes calls; False if it exited first."""
        read_fd, write_fd = os.pipe()
        try:
            command = worker_command(
                self.settings, worker.index, self.listen, self.redis_url, write_fd,
                self.http_listen,
            )
            worker.process = self._spawn(command, pass_fds=(write_fd,))
        finally:
            os.close(write_fd)  # the worker's copy is the only one left: EOF when it exits
        try:
            ready = await asyncio.wait_for(_read_ready(read_fd), WORKER_START_TIMEOUT_S)
        except TimeoutError:
            ready = False
        finally:
            os.close(read_fd)
        if not ready and worker.process.poll() is None:
            worker.process.kill()  # hung at start: counted as a death like any other
            await _exit_code(worker.process)
        if ready:
            log.info("worker %d (pid %d) ready", worker.index, worker.process.pid)
        return ready

    async def _keep_worker(self, worker: _Worker) -> None:
        """Restart the worker whenever it exits on its own, until the supervisor stops."""
        while not self._stopping.is_set():
            assert worker.process is not None
            code = await _exit_code(worker.process)
            if self._stopping.is_set():
                return
            now = time.monotonic()
            worker.deaths.append(now)
            while worker.deaths and worker.deaths[0] < now - WORKER_CRASH_WINDOW_S:
                worker.deaths.popleft()
            if len(worker.deaths) > WORKER_MAX_RESTARTS:
                self._fail(
                    f"worker {worker.index} exited {len(worker.deaths)} times within "
                    f"{WORKER_CRASH_WINDOW_S:.0f} s (last: {code}); stopping"
                )
                return
            log.warning(
                "worker %d (pid %d) exited (%s); starting it again",
                worker.index, worker.process.pid, code,
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), WORKER_RESTART_DELAY_S)
            if self._stopping.is_set():
                return
            if not await self._start_worker(worker) and not self._stopping.is_set():
                continue  # counted as another death on the next round

    async def _keep_flusher(self) -> None:
        """The flusher child, started again whenever it exits on its own."""
        while not self._stopping.is_set():
            self.flusher = self._spawn(flusher_command(self.settings, self.redis_url))
            code = await _exit_code(self.flusher)
            if self._stopping.is_set():
                return
            log.warning("flusher process exited (%s); starting it again", code)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), FLUSHER_RESTART_DELAY_S)

    def _fail(self, reason: str) -> None:
        log.error("%s", reason)
        self._failure = reason
        self._stopping.set()

    # --- the run ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Start everything, serve until `stop` is set (or a worker keeps failing), then
        stop everything in order. Raises WorkerFailed when it ended for a failure."""
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._reservation, self.listen = reserve_port(s.listen)
            self.port = int(self.listen.rsplit(":", 1)[1])
            if s.http_listen is not None:
                self._http_reservation, self.http_listen = reserve_port(s.http_listen)
            if s.redis_url is None:
                self.embedded = EmbeddedRedis(s.data_dir, s.appendfsync)
                self.redis_url = await self.embedded.start()
            else:
                self.redis_url = s.redis_url
            if s.metrics_listen is not None:
                self._metrics_dir = Path(tempfile.mkdtemp(prefix="creditmeter-metrics-"))
                self._env[MULTIPROC_ENV] = str(self._metrics_dir)
            await self._start_all()
            if self._failure is None:
                await self._announce()
                waiter = asyncio.create_task(stop.wait())
                stopping = asyncio.create_task(self._stopping.wait())
                await asyncio.wait((waiter, stopping), return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopping.cancel()
                if self._failure is None:
                    log.info("shutting down: draining in-flight calls of every worker")
        finally:
            await self._shutdown()
        if self._failure is not None:
            raise WorkerFailed(self._failure)

    async def _start_all(self) -> None:
        s = self.settings
        first, *rest = self.workers
        if not await self._start_worker(first):
            self._fail(f"worker 0 exited before taking calls ({first.exit_text()})")
            return
        if s.flusher and s.flusher_process:
            self._tasks.append(asyncio.create_task(self._keep_flusher(), name="flusher"))
        started = await asyncio.gather(*(self._start_worker(w) for w in rest))
        for worker, ok in zip(rest, started, strict=True):
            if not ok:
                self._fail(
                    f"worker {worker.index} exited before taking calls ({worker.exit_text()})"
                )
                return
        self._tasks += [
            asyncio.create_task(self._keep_worker(w), name=f"worker-{w.index}")
            for w in self.workers
        ]

    async def _announce(self) -> None:
        s = self.settings
        if s.metrics_listen is not None:
            assert self._metrics_dir is not None
            self.metrics = metrics.MetricsEndpoint(
                s.metrics_listen, metrics.multiprocess_registry(str(self._metrics_dir))
            )
            metrics_port = await asyncio.to_thread(self.metrics.start)
            log.info(
                "metrics on http://%s:%d/metrics (every worker)",
                s.metrics_listen.rsplit(":", 1)[0],
                metrics_port,
            )
        if self.http_listen is not None:
            log.info("HTTP/JSON (Connect) on http://%s (every worker)", self.http_listen)
        log.info(
            "creditmeter listening on %s (redis %s, %d workers)",
            self.listen, self.redis_url, len(self.workers),
        )  # fmt: skip

    async def _shutdown(self) -> None:
        """Workers first (they drain their calls), then the flusher (it flushes what they
        wrote), then Redis; each is killed if it outlasts its grace."""
        self._stopping.set()
        grace = self.settings.shutdown_grace_s
        live = [w.process for w in self.workers if w.process and w.process.poll() is None]
        await _terminate(live, grace * 3)
        if self.flusher is not None:
            await _terminate([self.flusher], grace * 2)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self.embedded is not None:
            await self.embedded.stop()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
        if self._reservation is not None:
            self._reservation.close()
        if self._http_reservation is not None:
            self._http_reservation.close()


async def _terminate(processes: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM each; SIGKILL what has not exited after `timeout_s`; reap them all."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    waits = [asyncio.create_task(_exit_code(p)) for p in processes if p.poll() is None]
    if not waits:
        return
    _, late = await asyncio.wait(waits, timeout=timeout_s)
    for process in processes:
        if process.poll() is None:
            process.kill()
    if late:
        await asyncio.wait(late)


async def supervise(settings: Settings, workers: int) -> None:
    """`serve --workers N`: run until SIGTERM or SIGINT, then stop in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Supervisor(settings, workers).run(stop)
