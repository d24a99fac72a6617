"""Measures the flusher: sustained flush rate and flush lag while Consume runs at full
speed, and the drain rate of a backlog with no load. Starts its own server (embedded
Redis, default SQLite ledger or --ledger-url) in a temporary data directory.

Also the servers and accounts `creditmeter bench` starts and grants, and its `drain`
scenario: a backlog of a given number of outbox entries, written by the consume script
with no flusher running, then drained into the ledger with nothing else running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from rich.console import Console
from rich.table import Table

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import (
    BENCH_DRAIN_PIPELINE,
    BENCH_DRAIN_POLL_S,
    BENCH_DRAIN_WRITERS,
    BENCH_GRANT,
    BENCH_REDIS_IDEM_TTL_S,
    BENCH_SEED_IN_FLIGHT,
)
from creditmeter.domain.ids import new_id
from creditmeter.storage.embedded_redis import die_with_parent, endpoint_file
from creditmeter.storage.layout import AccountKeys, buckets
from creditmeter.storage.ledger.flusher import Flusher, outbox_backlog
from creditmeter.storage.limits import NO_LIMITS
from creditmeter.storage.redis_store import Call, ConsumeCall, RedisStore
from creditmeter.transport.admin import open_stores

ACCOUNTS = 200
SERVER_START_TIMEOUT_S = 60.0
#: How often a starting server is asked whether it is ready (and checked alive).
SERVER_POLL_S = 0.5
LEDGER_BENCH_BACKLOG_CAP = 100_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _consumer_process(address: str, key: str, seconds: float, concurrency: int) -> int:
    md = (("authorization", f"Bearer {key}"),)
    done = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        deadline = time.monotonic() + seconds

        async def worker(i: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < deadline:
                n += 1
                await stub.Consume(
                    pb.ConsumeRequest(
                        account_id=f"acct{(i * 7919 + n) % ACCOUNTS}",
                        feature="text",
                        request_id=uuid.uuid4().hex,
                    ),
                    metadata=md,
                )
                done += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done


def _run_consumer(args: tuple[str, str, float, int], out: Any) -> None:
    out.put(asyncio.run(_consumer_process(*args)))


class Server:
    """A `creditmeter serve` child in its own process group (with its embedded Redis, or on
    `redis_url`).

    `backlog_cap` None keeps the server's default; the ledger bench raises it so that a
    slow ledger shows as lag rather than as refused calls. `workers`: `--workers`, one
    process unless asked (the figures of earlier runs are of one process); `replica_acks`:
    `--replica-acks`; `http`: `--http-listen` on a free port too (`http_address`). Its log
    goes to `log` (default `<data>/serve.log`). A server that does not come up is stopped
    before the error is raised.
    """

    def __init__(
        self,
        data: Path,
        ledger_url: str | None,
        flusher: bool,
        backlog_cap: int | None = LEDGER_BENCH_BACKLOG_CAP,
        workers: int = 1,
        *,
        redis_url: str | None = None,
        replica_acks: int = 0,
        log: Path | None = None,
        http: bool = False,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = free_port() if http else 0
        self.http_address = f"http://127.0.0.1:{self.http_port}" if http else None
        self.log = data / "serve.log" if log is None else log
        cmd = [sys.executable, "-m", "creditmeter", "serve", "--listen", self.address,
               "--data-dir", str(data), "--workers", str(workers)]  # fmt: skip
        if backlog_cap is not None:
            cmd += ["--backlog-cap", str(backlog_cap)]
        if ledger_url:
            cmd += ["--ledger-url", ledger_url]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        if replica_acks:
            cmd += ["--replica-acks", str(replica_acks)]
        if not flusher:
            cmd.append("--no-flusher")
        if http:
            cmd += ["--http-listen", f"127.0.0.1:{self.http_port}"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=out,
                start_new_session=True,
                # A bench killed outright stops its server too (SIGTERM: it drains and
                # stops its Redis and flusher).
                preexec_fn=die_with_parent,
            )
        try:
            self._wait_ready(workers)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        if workers > 1:
            # The port answers once the first worker does; the supervisor says when all do.
            while f"{workers} workers)" not in self.log.read_text(errors="replace"):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"creditmeter serve --workers {workers} did not start")
                time.sleep(0.1)
        channel = grpc.insecure_channel(self.address)
        try:
            ready = grpc.channel_ready_future(channel)
            while not _ready(ready, SERVER_POLL_S):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"creditmeter serve did not start:\n{self.log_tail()}")
        finally:
            channel.close()
        # The HTTP/JSON port opens just after the gRPC one.
        while self.http_port and not _accepts(self.http_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"creditmeter serve: no HTTP port:\n{self.log_tail()}")
            time.sleep(SERVER_POLL_S)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM to its process group (what is left of it, if the server died)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


def _accepts(port: int) -> bool:
    """Whether something accepts TCP connections on the loopback port."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


def _ready(future: grpc.Future, timeout_s: float) -> bool:
    """Whether a channel's readiness came within `timeout_s`."""
    try:
        future.result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        return False
    return True


def create_admin_key(data: Path, tenant: str = "bench", ledger_url: str | None = None) -> str:
    """An admin key of `tenant`, written to the config store of `data` (with a PostgreSQL
    `ledger_url`, the one in that database)."""
    extra = ["--ledger-url", ledger_url] if ledger_url else []
    out = subprocess.run(
        [sys.executable, "-m", "creditmeter", "keys", "create", "--tenant", tenant,
         "--role", "admin", "--data-dir", str(data), *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def grant_accounts(address: str, api_key: str, prefix: str, count: int,
                   amount: int = BENCH_GRANT) -> None:  # fmt: skip
    """Grant accounts `<prefix>0` .. `<prefix><count - 1>` `amount` credits each (one lot),
    through the server's Grant, BENCH_SEED_IN_FLIGHT at a time."""
    md = (("authorization", f"Bearer {api_key}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        for start in range(0, count, BENCH_SEED_IN_FLIGHT):
            futures = [
                stub.Grant.future(
                    pb.GrantRequest(
                        account_id=f"{prefix}{i}", amount=amount, request_id=uuid.uuid4().hex
                    ),
                    metadata=md,
                    timeout=30,
                )
                for i in range(start, min(count, start + BENCH_SEED_IN_FLIGHT))
            ]
            for future in futures:
                future.result()


def one_account_per_bucket(tenant: str, prefix: str) -> list[str]:
    """Account ids `<prefix><n>`, the first of each bucket: a backlog written to them
    lies in every bucket's outbox, as a real one does."""
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < buckets():
        account = f"{prefix}{n}"
        chosen.setdefault(AccountKeys(tenant, account).bucket, account)
        n += 1
    return list(chosen.values())


async def write_backlog(redis_url: str, tenant: str, accounts: list[str], entries: int) -> int:
    """Charge 1 credit at a time to `accounts` (each holding enough) through the consume
    script, as the server's pipelines do, until the outboxes hold at least `entries`
    entries not yet flushed. Returns the consume calls made."""
    client = aioredis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client, idempotency_ttl_s=BENCH_REDIS_IDEM_TTL_S)
    made = 0

    def calls() -> list[ConsumeCall]:
        batch = []
        for i in range(BENCH_DRAIN_PIPELINE):
            account = accounts[i % len(accounts)]
            request_id = uuid.uuid4().hex
            now = int(time.time() * 1000)
            # Any 32 hex digits will do for the fingerprint of a request id used once
            # (a digest of the parameters would only cost the writer time).
            call = Call(now_ms=now, txn=new_id("txn", now), request_id=request_id,
                        fingerprint=request_id)  # fmt: skip
            batch.append(ConsumeCall(AccountKeys(tenant, account), call, 1, "text", 1, NO_LIMITS))
        return batch

    async def writer(rounds: int) -> None:
        nonlocal made
        for _ in range(rounds):
            for reply in await store.consume_many(calls()):
                if isinstance(reply, Exception):
                    raise RuntimeError(f"a backlog consume failed: {reply}")
            made += BENCH_DRAIN_PIPELINE

    try:
        await writer(1)  # to learn how many entries a call writes
        while (backlog := await outbox_backlog(client)) < entries:
            # Entries per call as measured so far (2 for a one-lot account: the charge and
            # the request record), to size the next round without overshooting much.
            calls_left = (entries - backlog) / max(backlog / made, 1.0)
            rounds = int(calls_left / (BENCH_DRAIN_PIPELINE * BENCH_DRAIN_WRITERS))
            if rounds == 0:
                await writer(1)
            else:
                await asyncio.gather(*(writer(rounds) for _ in range(BENCH_DRAIN_WRITERS)))
    finally:
        await client.aclose()
    return made


def drain_backlog(entries: int, console: Console) -> dict[str, Any]:
    """The `drain` scenario of `creditmeter bench`: on a server of its own (embedded Redis,
    no flusher), a backlog of at least `entries` outbox entries, then the flusher's drain of
    it with nothing else running, into SQLite and (the same backlog again) into a private
    PostgreSQL cluster (`postgres`: skipped without PostgreSQL)."""
    with tempfile.TemporaryDirectory(prefix="cm-bench-drain-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        key = create_admin_key(data)
        server = Server(data, None, flusher=False)
        try:
            accounts = one_account_per_bucket("bench", "drain-")
            count = int(accounts[-1].removeprefix("drain-")) + 1
            grant_accounts(server.address, key, "drain-", count)
            url = endpoint_file(data).read_text().strip()
            with console.status(f"drain: writing a backlog of {entries:,} outbox entries ..."):
                t0 = time.monotonic()
                consumes = asyncio.run(write_backlog(url, "bench", accounts, entries))
                written_s = time.monotonic() - t0
        finally:
            server.stop()  # its Redis writes the outboxes to its append-only file and exits
        # The same backlog for PostgreSQL: a copy of the data directory, Redis's files with it.
        copy = Path(tmp) / "data-postgres"
        shutil.copytree(data, copy, ignore=shutil.ignore_patterns("*.sock"))
        with console.status(f"drain: flushing {entries:,} entries into SQLite ..."):
            backlog, took = asyncio.run(_drain(data, None))
        with console.status(f"drain: flushing {entries:,} entries into PostgreSQL ..."):
            postgres = _drain_postgres(copy)
    return {
        "status": "ok",
        "ledger": "sqlite",
        "consumes": consumes,
        "write_s": written_s,
        "outbox_entries": backlog,
        "buckets": len(accounts),
        "seconds": took,
        "entries_per_s": backlog / took if took else 0.0,
        "postgres": postgres,
    }


def _drain_postgres(data: Path) -> dict[str, Any]:
    """The drain of the backlog in `data` into a private PostgreSQL cluster (fsync and
    synchronous commit on), torn down afterwards."""
    from creditmeter.bench import postgres  # it imports this module (free_port)

    bindir = postgres.find_bindir()
    if bindir is None:
        return {"status": "skipped", "reason": "no PostgreSQL (apt-get install postgresql)"}
    # Under /tmp: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="cm-bench-pg-", dir="/tmp"))
    root.chmod(0o755)
    try:
        cluster = postgres.PostgresCluster(bindir, root)
        try:
            cluster.start()
            cluster.create_database("ledger")
            backlog, took = asyncio.run(_drain(data, cluster.url("ledger")))
            version = cluster.psql("SHOW server_version;").strip()
        finally:
            cluster.destroy()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "status": "ok",
        "ledger": "postgres",
        "postgres": version,
        "outbox_entries": backlog,
        "seconds": took,
        "entries_per_s": backlog / took if took else 0.0,
    }


async def _drain(data: Path, ledger_url: str | None) -> tuple[int, float]:
    """Flush a backlog with nothing else running: (entries, seconds)."""
    async with open_stores(str(data), None, ledger_url) as stores:
        flusher = Flusher(stores.redis, stores.ledger)
        await flusher.ensure_groups()
        backlog = await outbox_backlog(stores.redis)
        stop = asyncio.Event()
        t0 = time.monotonic()
        # The flusher as a server runs it (run: each read overlaps the last batch's write).
        running = asyncio.create_task(flusher.run(stop), name="drain")
        try:
            while await outbox_backlog(stores.redis):
                if running.done():
                    running.result()  # it ended: raise what ended it
                await asyncio.sleep(BENCH_DRAIN_POLL_S)
            seconds = time.monotonic() - t0
        finally:
            stop.set()
            await running
        return backlog, seconds


def run(seconds: float, processes: int, concurrency: int, ledger_url: str | None,
        json_out: str | None, backlog_entries: int | None = None) -> int:  # fmt: skip
    """`backlog_entries`: the drain figure's backlog is that many outbox entries written by
    the consume script directly (see `write_backlog`), instead of what `Consume` calls make
    in `seconds / 2`."""
    console = Console()
    results: dict[str, Any] = {
        "seconds": seconds,
        "processes": processes,
        "concurrency": concurrency,
        "ledger": ledger_url or "sqlite",
    }
    with tempfile.TemporaryDirectory(prefix="cm-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        key = create_admin_key(data, ledger_url=ledger_url)
        server = Server(data, ledger_url, flusher=True)
        md = (("authorization", f"Bearer {key}"),)
        channel = grpc.insecure_channel(server.address)
        stub = pb_grpc.CreditsStub(channel)
        for i in range(ACCOUNTS):
            stub.Grant(pb.GrantRequest(account_id=f"acct{i}", amount=10**12,
                                       request_id=uuid.uuid4().hex), metadata=md)  # fmt: skip
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_run_consumer,
                             args=((server.address, key, seconds, concurrency), out))
                 for _ in range(processes)]  # fmt: skip
        start_status = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md)
        started = time.monotonic()
        for p in procs:
            p.start()
        lags: list[int] = []
        backlogs: list[int] = []
        with console.status("consuming at full speed...") as status:
            while any(p.is_alive() for p in procs):
                s = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md)
                lags.append(s.flush_lag.ToMilliseconds())
                backlogs.append(s.backlog)
                status.update(f"consuming: backlog {s.backlog}, flush lag {lags[-1]} ms")
                time.sleep(0.25)
        consumed = sum(out.get() for _ in procs)
        elapsed = time.monotonic() - started
        for p in procs:
            p.join()
        while stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md).backlog:
            time.sleep(0.05)
        drained = time.monotonic() - started
        end_status = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md)
        flushed = end_status.events_flushed - start_status.events_flushed
        channel.close()
        server.stop()
        results["load"] = {
            "consumes": consumed,
            "consume_rate_per_s": consumed / elapsed,
            "events_flushed": flushed,
            "flush_rate_per_s": flushed / drained,
            "flush_lag_ms_p50": statistics.median(lags) if lags else 0,
            "flush_lag_ms_p99": sorted(lags)[int(0.99 * (len(lags) - 1))] if lags else 0,
            "flush_lag_ms_max": max(lags, default=0),
            "backlog_max": max(backlogs, default=0),
            "drain_after_load_s": drained - elapsed,
        }

        # Drain rate: a backlog written with no flusher, then flushed with no load.
        server = Server(data, ledger_url, flusher=False)
        if backlog_entries is None:
            procs = [ctx.Process(target=_run_consumer,
                                 args=((server.address, key, seconds / 2, concurrency), out))
                     for _ in range(processes)]  # fmt: skip
            for p in procs:
                p.start()
            backlog_consumes = sum(out.get() for _ in procs)
            for p in procs:
                p.join()
        else:
            url = endpoint_file(data).read_text().strip()
            accounts = [f"acct{i}" for i in range(ACCOUNTS)]
            with console.status(f"writing a backlog of {backlog_entries:,} outbox entries..."):
                backlog_consumes = asyncio.run(
                    write_backlog(url, "bench", accounts, backlog_entries)
                )
        server.stop()
        backlog, took = asyncio.run(_drain(data, ledger_url))
        results["drain"] = {"outbox_entries": backlog, "seconds": took,
                            "entries_per_s": backlog / took if took else 0,
                            "consumes": backlog_consumes}  # fmt: skip

    table = Table("figure", "value")
    for section in ("load", "drain"):
        for name, value in results[section].items():
            shown = f"{value:,.1f}" if isinstance(value, float) else f"{value:,}"
            table.add_row(f"{section}.{name}", shown)
    console.print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return 0
