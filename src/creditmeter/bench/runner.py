"""`creditmeter bench`: throughput and latency of the metering RPCs, side by side with the
ceilings measured in the same run (an empty grpc.aio call, and redis-benchmark running the
consume script itself), the flush lag of the ledger under load, and unary latency at half
the measured maximum. For each scenario, Redis's time per deduction (INFO commandstats)
beside the reference script's, measured in the same Redis; and, each on a server or
cluster of its own, Redis bytes per one-lot account (`memory`), the hand-rolled
PostgreSQL deduction (`peer`) and the flusher's drain rate of a backlog (`drain`).

Against `--server` it drives that server (the key must be an admin key: it grants the
bench accounts and reads GetLedgerStatus); without it, it starts `creditmeter serve` on
the embedded default in a temporary data directory and stops it at the end.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import redis
from hdrh.histogram import HdrHistogram
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.bench import luacost, memory, peer, report
from creditmeter.bench.ledger import Server, create_admin_key, drain_backlog, grant_accounts
from creditmeter.bench.load import (
    LoadSpec,
    WorkerResult,
    empty_server_main,
    latency_figures,
    new_histogram,
    spawn_context,
    worker_main,
)
from creditmeter.bench.redis_cost import (
    RedisMeter,
    benchmark_binary,
    redis_args,
    reference_run,
    timed_script,
)
from creditmeter.constants import (
    BENCH_GRANT,
    BENCH_LATENCY_LOAD_SHARE,
    BENCH_LEDGER_SAMPLE_S,
    BENCH_REDIS_IDEM_TTL_S,
    BENCH_REDIS_PIPELINES,
    BENCH_SCENARIOS,
    BENCH_WORKERS_CHANNELS,
    BENCH_WORKERS_COMPARED,
    IDEMPOTENCY_TTL_S,
)
from creditmeter.storage import scripts
from creditmeter.storage.embedded_redis import endpoint_file
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.limits import NO_LIMITS

#: Every scenario in the order a full run takes them (see BENCH_SCENARIOS).
SCENARIOS = BENCH_SCENARIOS
#: Scenarios whose events go through the ledger: their flush lag and drain are reported,
#: and Redis's time per deduction.
LEDGER_SCENARIOS = ("consume", "batch", "meter", "sessions", "mixed", "latency")
#: Scenarios whose Redis figures are judged against the reference script's.
REFERENCED_SCENARIOS = (*LEDGER_SCENARIOS, "redis")
#: Startup of the load processes (spawn, imports, connecting) may take this long.
PROCESS_START_TIMEOUT_S = 120.0
EMPTY_SERVER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Options:
    server: str | None
    api_key: str | None
    redis_url: str | None
    tenant: str | None
    scenarios: tuple[str, ...]
    processes: int
    concurrency: int
    channels: int
    duration_s: float
    batch_size: int
    accounts: int
    redis_clients: int
    drain_timeout_s: float
    out_dir: Path
    memory_accounts: int
    peer_clients: int
    drain_backlog: int
    #: `--cluster`: the scenarios on a Redis Cluster beside the standalone server
    #: (bench/shards.py) instead of the usual run.
    cluster: bool = False
    #: With --server: its `--http-listen` as http://HOST:PORT (the `http` scenario).
    http_server: str | None = None


@dataclass(frozen=True)
class Target:
    """The server under test, and what is known of it."""

    address: str
    api_key: str
    embedded: bool
    #: The key's tenant and the server's Redis, needed by the Redis ceiling and figures.
    tenant: str | None
    redis_url: str | None
    #: Its HTTP/JSON gateway (http://HOST:PORT), when it has one.
    http_address: str | None = None


@contextlib.contextmanager
def _target(opts: Options, console: Console) -> Iterator[Target]:
    if opts.server:
        if not opts.api_key:
            raise SystemExit("creditmeter bench: --server needs --api-key (an admin key)")
        yield Target(
            opts.server, opts.api_key, False, opts.tenant, opts.redis_url, opts.http_server
        )
        return
    with tempfile.TemporaryDirectory(prefix="cm-bench-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        key = create_admin_key(data)
        console.print(f"starting creditmeter serve (embedded Redis, SQLite ledger) in {data}")
        server = Server(data, None, flusher=True, backlog_cap=None, http="http" in opts.scenarios)
        try:
            url = endpoint_file(data).read_text().strip()
            yield Target(server.address, key, True, "bench", url, server.http_address)
        finally:
            server.stop()


class _Ledger:
    """GetLedgerStatus through its own channel; off when the key may not call it."""

    def __init__(self, target: Target) -> None:
        self.channel = grpc.insecure_channel(target.address)
        self.stub = pb_grpc.CreditsStub(self.channel)
        self.md = (("authorization", f"Bearer {target.api_key}"),)
        self.available = True

    def sample(self) -> tuple[int, int] | None:
        """(backlog, flush lag in ms), or None when unavailable."""
        if not self.available:
            return None
        try:
            status = self.stub.GetLedgerStatus(
                pb.GetLedgerStatusRequest(), metadata=self.md, timeout=5
            )
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED):
                self.available = False
            return None
        return status.backlog, status.flush_lag.ToMilliseconds()

    def drain(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the backlog to reach 0 after the load: whether it did, and how long."""
        t0 = time.monotonic()
        while True:
            sample = self.sample()
            if sample is None:
                return {"drained": None, "drain_s": None}
            if sample[0] == 0:
                return {"drained": True, "drain_s": time.monotonic() - t0}
            if time.monotonic() - t0 > timeout_s:
                return {"drained": False, "drain_s": None, "backlog_left": sample[0]}
            time.sleep(BENCH_LEDGER_SAMPLE_S)

    def close(self) -> None:
        self.channel.close()


def run_load(
    spec: LoadSpec, label: str, console: Console, ledger: _Ledger | None
) -> dict[str, Any]:
    """Run `spec` in `spec.processes` processes; their merged figures (and the ledger's
    flush lag sampled meanwhile)."""
    ctx = spawn_context()
    counter = ctx.Array("q", spec.processes, lock=False)
    barrier = ctx.Barrier(spec.processes + 1)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(spec, i, counter, barrier, out), daemon=True)
        for i in range(spec.processes)
    ]
    for p in procs:
        p.start()
    results: dict[int, WorkerResult | str] = {}
    lags: list[int] = []
    backlogs: list[int] = []
    try:
        t0 = time.monotonic()
        while barrier.n_waiting < spec.processes:
            if not all(p.is_alive() for p in procs) or not out.empty():
                # A process failed before starting (its message is in the queue): release
                # the others from the barrier rather than leave them waiting.
                barrier.abort()
                break
            if time.monotonic() - t0 > PROCESS_START_TIMEOUT_S:
                raise RuntimeError(f"{label}: load processes did not start in time")
            time.sleep(0.02)
        else:
            barrier.wait()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(label, total=spec.duration_s)
            started = time.monotonic()
            while len(results) < len(procs):
                try:
                    index, result = out.get(timeout=BENCH_LEDGER_SAMPLE_S)
                    results[index] = result
                    continue
                except queue.Empty:
                    pass
                if not any(p.is_alive() for p in procs) and out.empty():
                    break
                elapsed = time.monotonic() - started
                calls = sum(counter)
                if ledger is not None and elapsed <= spec.duration_s:
                    sample = ledger.sample()
                    if sample is not None:
                        backlogs.append(sample[0])
                        lags.append(sample[1])
                progress.update(
                    task,
                    completed=min(elapsed, spec.duration_s),
                    description=f"{label}: {calls:,} calls ({calls / max(elapsed, 1e-9):,.0f}/s)",
                )
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    return _summarise(spec, results, lags, backlogs)


def _summarise(
    spec: LoadSpec,
    results: dict[int, WorkerResult | str],
    lags: list[int],
    backlogs: list[int],
) -> dict[str, Any]:
    histogram = new_histogram()
    errors: Counter[str] = Counter()
    details: dict[str, str] = {}
    crashes = [r for r in results.values() if isinstance(r, str)]
    done = [r for r in results.values() if isinstance(r, WorkerResult)]
    for r in done:
        histogram.add(HdrHistogram.decode(r.histogram))
        errors.update(r.errors)
        details.update(r.error_details)
    elapsed = max((r.elapsed_s for r in done), default=0.0)
    calls = sum(r.calls for r in done)
    deductions = sum(r.deductions for r in done)
    if crashes or len(results) < spec.processes:
        status = "crashed"
    elif errors.get("UNIMPLEMENTED"):
        status = "unimplemented"
    elif calls == 0:
        status = "failed"
    else:
        status = "ok"
    summary: dict[str, Any] = {
        "status": status,
        "processes": spec.processes,
        "concurrency": spec.concurrency if spec.rate is None else None,
        "open_loop_rate_per_s": spec.rate * spec.processes if spec.rate else None,
        "batch_size": spec.batch_size if spec.scenario in ("batch", "meter") else None,
        "duration_s": spec.duration_s,
        "elapsed_s": elapsed,
        "calls": calls,
        "calls_per_s": calls / elapsed if elapsed else 0.0,
        "deductions": deductions,
        "deductions_per_s": deductions / elapsed if elapsed else 0.0,
        "errors": dict(errors),
        "error_details": details,
        "latency_ms": latency_figures(histogram),
    }
    if crashes:
        summary["crashes"] = crashes
    if lags:
        ordered = sorted(lags)
        summary["ledger"] = {
            "samples": len(lags),
            "flush_lag_ms_p50": ordered[len(ordered) // 2],
            "flush_lag_ms_p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
            "flush_lag_ms_max": ordered[-1],
            "backlog_max": max(backlogs),
        }
    return summary


# --- the ceilings ---------------------------------------------------------------------
def _empty_ceiling(spec: LoadSpec, console: Console) -> dict[str, Any]:
    """The empty call on a bare grpc.aio server of its own: closed loop as `spec` says,
    or open loop at `spec.rate`."""
    ctx = spawn_context()
    ports = ctx.Queue()
    server = ctx.Process(target=empty_server_main, args=(ports,), daemon=True)
    server.start()
    try:
        port = ports.get(timeout=EMPTY_SERVER_START_TIMEOUT_S)
        return run_load(
            replace(spec, address=f"127.0.0.1:{port}", scenario="empty"),
            "empty call" if spec.rate is None else "empty call (open loop)",
            console,
            None,
        )
    finally:
        server.terminate()
        server.join(timeout=10)


def redis_ceiling(target: Target, account: str, opts: Options, console: Console) -> dict[str, Any]:
    """redis-benchmark running FCALL of the consume function, with the KEYS and ARGV a
    unary Consume of one text message sends, at several pipelining depths; with each,
    the function's usec_per_call from INFO commandstats."""
    binary = benchmark_binary()
    if binary is None:
        reason = "redis-benchmark not installed (apt-get install redis-tools)"
        return {"status": "skipped", "reason": reason}
    if not target.redis_url or not target.tenant:
        return {"status": "skipped", "reason": "needs --redis-url and --tenant with --server"}
    client = redis.Redis.from_url(target.redis_url)
    try:
        try:
            client.function_load(scripts.library())
        except redis.ResponseError as exc:  # loaded by the server already
            if "already exists" not in str(exc):
                raise
        # redis-benchmark replaces every __rand_int__ with its own random number: each
        # call gets a fresh request id and transaction id (two numbers each, so they
        # never repeat).
        rand = "__rand_int__-__rand_int__"
        keys = AccountKeys(target.tenant, account).script_keys(request_id=rand)
        fingerprint = uuid.uuid4().hex
        argv = [str(int(time.time() * 1000)), fingerprint, str(BENCH_REDIS_IDEM_TTL_S), rand,
                target.tenant, account, rand, "1", "text", "1", *NO_LIMITS.argv()]  # fmt: skip
        command = ["FCALL", scripts.function_name("consume"), str(len(keys)), *keys, *argv]
        base = [binary, *redis_args(target.redis_url), "-c", str(opts.redis_clients)]
        variants = []
        for pipeline in BENCH_REDIS_PIPELINES:
            with console.status(f"redis-benchmark FCALL consume -P {pipeline} ..."):
                variants.append(timed_script(client, base, command, pipeline, opts.duration_s))
    finally:
        client.close()
    calls = sum(v["script_calls"] for v in variants)
    return {
        "status": "ok",
        "clients": opts.redis_clients,
        "idempotency_ttl_s": BENCH_REDIS_IDEM_TTL_S,
        "server_idempotency_ttl_s": IDEMPOTENCY_TTL_S,
        "variants": variants,
        # Over every variant: the consume script's Redis time per call (one deduction each).
        "usec_per_call": (
            sum(v["usec_per_call"] * v["script_calls"] for v in variants) / calls if calls else 0.0
        ),
    }


def reference(target: Target, opts: Options, console: Console) -> dict[str, Any]:
    """The reference script under redis-benchmark, in the server's Redis."""
    if not target.redis_url:
        return {"status": "skipped", "reason": "needs --redis-url with --server"}
    with console.status("redis-benchmark EVALSHA of the reference script ..."):
        return reference_run(target.redis_url, opts.redis_clients, opts.duration_s)


def _workers(spec: LoadSpec, opts: Options, console: Console) -> dict[str, Any]:
    """Unary Consume against `serve --workers N` for each N of BENCH_WORKERS_COMPARED,
    each on a server of its own (embedded Redis, SQLite ledger, one flusher) started the
    same way, with the same load: calls/s and latency per N, and the ratio of the last to
    the first. Every process (load, workers, Redis, flusher) shares this machine's cores."""
    if opts.server:
        return {"status": "skipped", "reason": "starts servers of its own (not with --server)"}
    load = replace(spec, scenario="consume", channels=max(spec.channels, BENCH_WORKERS_CHANNELS))
    variants = []
    for workers in BENCH_WORKERS_COMPARED:
        with tempfile.TemporaryDirectory(prefix="cm-bench-workers-") as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            key = create_admin_key(data)
            with console.status(f"workers: starting creditmeter serve --workers {workers} ..."):
                server = Server(data, None, flusher=True, backlog_cap=None, workers=workers)
            try:
                grant_accounts(server.address, key, spec.account_prefix, opts.accounts)
                target = Target(server.address, key, True, "bench", None)
                ledger = _Ledger(target)
                try:
                    label = f"Consume, --workers {workers}"
                    summary = run_load(replace(load, address=server.address, api_key=key),
                                       label, console, ledger)  # fmt: skip
                    if summary["status"] == "ok":
                        summary.setdefault("ledger", {}).update(
                            ledger.drain(opts.drain_timeout_s)
                        )
                finally:
                    ledger.close()
            finally:
                server.stop()
        summary["workers"] = workers
        variants.append(summary)
    ok = all(v["status"] == "ok" for v in variants)
    first, last = variants[0]["calls_per_s"], variants[-1]["calls_per_s"]
    return {
        "status": "ok" if ok else "failed",
        "channels_per_process": load.channels,
        "variants": variants,
        "ratio": last / first if ok and first else None,
    }


def _http(
    results: dict[str, Any],
    spec: LoadSpec,
    console: Console,
    ledger: _Ledger,
    opts: Options,
    target: Target,
) -> dict[str, Any]:
    """Unary Consume over gRPC and over HTTP/JSON (the Connect protocol, through the
    server's `--http-listen` gateway), with the same load against the same server, one
    after the other: both figures and the ratio of HTTP's calls/s to gRPC's. The gRPC
    figure is the `consume` scenario's when this run has it."""
    if not target.http_address:
        return {"status": "skipped", "reason": "with --server: needs --http-server"}
    if "consume" not in results:
        results["consume"] = _scenario(spec, "consume", console, ledger, opts, target)
    over_http = _scenario(
        replace(spec, http_address=target.http_address), "http", console, ledger, opts, target,
        "Consume over HTTP/JSON",
    )  # fmt: skip
    variants = [{"transport": "grpc", **results["consume"]}, {"transport": "http", **over_http}]
    ok = all(v["status"] == "ok" for v in variants)
    grpc_rate = results["consume"]["calls_per_s"]
    return {
        "status": "ok" if ok else "failed",
        "http_address": target.http_address,
        "variants": variants,
        "ratio": over_http["calls_per_s"] / grpc_rate if ok and grpc_rate else None,
    }


def _lua_cost(console: Console) -> dict[str, Any]:
    """Instructions per script call under callgrind (deterministic), beside the reference."""
    if not luacost.available():
        return {"status": "skipped", "reason": "needs valgrind (apt-get install valgrind)"}
    with console.status("lua-cost: counting instructions per script call under callgrind ..."):
        cost = luacost.measure()
    return {"status": "ok", "instructions_per_call": cost.per_call, "vs_reference": cost.ratios}


# --- the run ---------------------------------------------------------------------------
def _spec(opts: Options, target: Target | None, prefix: str) -> LoadSpec:
    """The load of every scenario (each sets its own scenario, and the open loop its rate);
    without a target, for servers the caller starts (it sets address and key)."""
    return LoadSpec(
        address=target.address if target else "",
        api_key=target.api_key if target else "",
        scenario="consume",
        processes=opts.processes,
        concurrency=opts.concurrency,
        channels=opts.channels,
        duration_s=opts.duration_s,
        rate=None,
        account_prefix=prefix,
        accounts=opts.accounts,
        batch_size=opts.batch_size,
    )


def run(opts: Options) -> int:
    # Piped output keeps the table whole rather than folded at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 160)
    started_at = datetime.now(UTC)
    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    if opts.cluster:
        from creditmeter.bench import shards  # it imports this module

        results = shards.run(opts, _spec(opts, None, prefix), console)
        figures = report.build(results, opts, True, started_at)
    else:
        figures = _run_scenarios(opts, console, prefix, started_at)
    report.show(figures, console)
    json_path, png_path = report.write(figures, opts.out_dir)
    console.print(f"figures: {json_path}\nplot:    {png_path}")
    return 0


def _run_scenarios(
    opts: Options, console: Console, prefix: str, started_at: datetime
) -> dict[str, Any]:
    """The usual run: every selected scenario against one server (--server, or one of its
    own); the figures as report.build makes them."""
    wanted = set(opts.scenarios)
    if wanted & set(REFERENCED_SCENARIOS):
        wanted.add("reference")  # their Redis figures are ratios to it
    selected = [s for s in SCENARIOS if s in wanted]
    results: dict[str, Any] = {}
    with _target(opts, console) as target:
        spec = _spec(opts, target, prefix)
        if any(s in (*REFERENCED_SCENARIOS, "check", "http") for s in selected):
            with console.status(f"granting {opts.accounts + 1} bench accounts ..."):
                # The last one is the Redis ceiling's.
                grant_accounts(target.address, target.api_key, prefix, opts.accounts + 1)
        ledger = _Ledger(target)
        try:
            for name in selected:
                if name == "empty":
                    results[name] = _empty_ceiling(spec, console)
                elif name == "redis":
                    results[name] = redis_ceiling(target, f"{prefix}{opts.accounts}", opts, console)
                    if results[name]["status"] == "ok":
                        results[name]["ledger"] = ledger.drain(opts.drain_timeout_s)
                elif name == "reference":
                    results[name] = reference(target, opts, console)
                elif name == "memory":
                    with console.status(f"memory: granting {opts.memory_accounts:,} accounts ..."):
                        results[name] = memory.run(opts.memory_accounts)
                elif name == "peer":
                    with console.status(f"peer: PostgreSQL, pgbench x {opts.peer_clients} ..."):
                        results[name] = peer.run(
                            opts.accounts, opts.peer_clients, opts.duration_s, BENCH_GRANT
                        )
                elif name == "drain":
                    results[name] = drain_backlog(opts.drain_backlog, console)
                elif name == "lua-cost":
                    results[name] = _lua_cost(console)
                elif name == "workers":
                    results[name] = _workers(spec, opts, console)
                elif name == "http":
                    results[name] = _http(results, spec, console, ledger, opts, target)
                elif name == "latency":
                    if "consume" not in results:
                        results["consume"] = _scenario(
                            spec, "consume", console, ledger, opts, target
                        )
                    best = results["consume"]["calls_per_s"]
                    rate = BENCH_LATENCY_LOAD_SHARE * best / opts.processes
                    if rate <= 0:
                        results[name] = {"status": "failed", "reason": "consume measured 0 calls/s"}
                        continue
                    results[name] = _scenario(
                        replace(spec, rate=rate), "consume", console, ledger, opts, target, name
                    )
                    results[name]["share_of_max"] = BENCH_LATENCY_LOAD_SHARE
                    # The empty call at the same offered rate: what the latency is judged
                    # against (the gRPC call alone, on the same machine, loaded alike).
                    at_rate = replace(spec, rate=rate)
                    results[report.LATENCY_EMPTY] = _empty_ceiling(at_rate, console)
                else:
                    results[name] = _scenario(spec, name, console, ledger, opts, target)
        finally:
            ledger.close()
        return report.build(results, opts, target.embedded, started_at)


def _scenario(
    spec: LoadSpec,
    name: str,
    console: Console,
    ledger: _Ledger,
    opts: Options,
    target: Target,
    label: str | None = None,
) -> dict[str, Any]:
    """One load scenario, then the ledger's drain; Redis's statistics are reset before it
    and read once the drain is over, so they hold what the scenario's load and the flush
    of its events cost."""
    meter = RedisMeter(target.redis_url) if target.redis_url else None
    try:
        if meter is not None:
            meter.start()
        summary = run_load(replace(spec, scenario=name), label or name, console, ledger)
        if summary["status"] == "ok":
            with console.status(f"{label or name}: waiting for the ledger to catch up ..."):
                summary.setdefault("ledger", {}).update(ledger.drain(opts.drain_timeout_s))
        if meter is None:
            summary["redis"] = {"status": "skipped", "reason": "needs --redis-url with --server"}
        else:
            summary["redis"] = meter.finish(summary["deductions"])
    finally:
        if meter is not None:
            meter.close()
    return summary
