"""Measures the flusher: sustained flush rate and flush lag while Consume runs at full
speed, and the drain rate of a backlog with no load. Starts its own server (embedded
Redis, default SQLite ledger or --ledger-url) in a temporary data directory."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
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
from rich.console import Console
from rich.table import Table

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.storage.ledger.flusher import Flusher, outbox_backlog
from creditmeter.transport.admin import open_stores

ACCOUNTS = 200
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
    """A `creditmeter serve` child in its own process group (with its embedded Redis).

    `backlog_cap` None keeps the server's default; the ledger bench raises it so that a
    slow ledger shows as lag rather than as refused calls.
    """

    def __init__(
        self,
        data: Path,
        ledger_url: str | None,
        flusher: bool,
        backlog_cap: int | None = LEDGER_BENCH_BACKLOG_CAP,
    ) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "creditmeter", "serve", "--listen", self.address,
               "--data-dir", str(data)]  # fmt: skip
        if backlog_cap is not None:
            cmd += ["--backlog-cap", str(backlog_cap)]
        if ledger_url:
            cmd += ["--ledger-url", ledger_url]
        if not flusher:
            cmd.append("--no-flusher")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.close()

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)


def create_admin_key(data: Path, tenant: str = "bench") -> str:
    """An admin key of `tenant`, written to the config store of `data`."""
    out = subprocess.run(
        [sys.executable, "-m", "creditmeter", "keys", "create", "--tenant", tenant,
         "--role", "admin", "--data-dir", str(data)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return out.stdout.strip()


async def _drain(data: Path, ledger_url: str | None) -> tuple[int, float]:
    """Flush a backlog with nothing else running: (entries, seconds)."""
    async with open_stores(str(data), None, ledger_url) as stores:
        flusher = Flusher(stores.redis, stores.ledger)
        await flusher.ensure_groups()
        backlog = await outbox_backlog(stores.redis)
        t0 = time.monotonic()
        while await outbox_backlog(stores.redis):
            await flusher.flush_once()
        return backlog, time.monotonic() - t0


def run(seconds: float, processes: int, concurrency: int, ledger_url: str | None,
        json_out: str | None) -> int:  # fmt: skip
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
        key = create_admin_key(data)
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
        procs = [ctx.Process(target=_run_consumer,
                             args=((server.address, key, seconds / 2, concurrency), out))
                 for _ in range(processes)]  # fmt: skip
        for p in procs:
            p.start()
        backlog_consumes = sum(out.get() for _ in procs)
        for p in procs:
            p.join()
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
