"""The load generator of `creditmeter bench`: several processes, each with its own gRPC
channels and an asyncio loop running `concurrency` calls at once (closed loop) or calls
at a fixed rate (open loop), recording latencies into mergeable HDR histograms.

Each scenario is one coroutine per in-flight slot; failures are counted by status code
(and by reason for the items of a batch or stream), and UNIMPLEMENTED stops the scenario
at once: every further call would fail the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_json_codec
from connectrpc.errors import ConnectError
from hdrh.histogram import HdrHistogram

from creditmeter.api.credits.v1 import credits_connect
from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import (
    BENCH_CALL_TIMEOUT_S,
    BENCH_HISTOGRAM_DIGITS,
    BENCH_HISTOGRAM_MAX_US,
    BENCH_MIXED_TEXT_SHARE,
    BENCH_SESSION_SECONDS,
)

#: The empty-call ceiling: a generic handler with no (de)serialisation at all.
EMPTY_SERVICE = "creditmeter.bench.Empty"
EMPTY_METHOD = f"/{EMPTY_SERVICE}/Call"

#: What _Load._timed returns for a call that failed (an empty call's reply is b"").
FAILED = object()


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, BENCH_HISTOGRAM_MAX_US, BENCH_HISTOGRAM_DIGITS)


def _percentile_ms(h: HdrHistogram, p: float) -> float:
    return float(h.get_value_at_percentile(p)) / 1000.0


def latency_figures(h: HdrHistogram) -> dict[str, Any]:
    """Percentiles, maximum, mean and the percentile curve of a latency histogram (ms)."""
    if not h.get_total_count():
        return {}
    return {
        "p50": _percentile_ms(h, 50),
        "p95": _percentile_ms(h, 95),
        "p99": _percentile_ms(h, 99),
        "p999": _percentile_ms(h, 99.9),
        "max": float(h.get_max_value()) / 1000.0,
        "mean": float(h.get_mean_value()) / 1000.0,
        # For the plot: latency at each percentile, out to five nines.
        "curve": [
            [p, _percentile_ms(h, p)]
            for p in (0, 10, 25, 50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999)
        ],
    }


#: Channel options giving a channel a connection of its own.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True)
class LoadSpec:
    """What every load process runs (picklable: it crosses a spawn)."""

    address: str
    api_key: str
    scenario: str
    processes: int
    concurrency: int
    channels: int
    duration_s: float
    #: Calls per second of this process in open loop; None for a closed loop.
    rate: float | None
    account_prefix: str
    accounts: int
    batch_size: int
    #: http://HOST:PORT of the server's `--http-listen` (the `http` scenario).
    http_address: str = ""


@dataclass
class WorkerResult:
    """One process's figures; histograms travel encoded."""

    calls: int = 0
    deductions: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_details: dict[str, str] = field(default_factory=dict)
    histogram: bytes = b""
    elapsed_s: float = 0.0


class _Stats:
    def __init__(self, counter: Any, index: int) -> None:
        self.histogram = new_histogram()
        self.calls = 0
        self.deductions = 0
        self.errors: Counter[str] = Counter()
        #: The message of the first error of each status, to tell what went wrong.
        self.details: dict[str, str] = {}
        self.stop = False
        self._counter = counter
        self._index = index

    def ok(self, started: float, deductions: int) -> None:
        self.histogram.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
        self.calls += 1
        self.deductions += deductions
        # Shared memory read by the parent's progress bar.
        self._counter[self._index] = self.calls

    def failed(self, error: grpc.aio.AioRpcError) -> None:
        code = error.code()
        self.errors[code.name] += 1
        self.details.setdefault(code.name, str(error.details())[:300])
        if code == grpc.StatusCode.UNIMPLEMENTED:
            self.stop = True

    def connect_failed(self, error: ConnectError) -> None:
        """A failed HTTP/JSON call, counted under its gRPC code name like the others."""
        name = "CANCELLED" if error.code is Code.CANCELED else error.code.name
        self.errors[name] += 1
        self.details.setdefault(name, error.message[:300])
        if error.code is Code.UNIMPLEMENTED:
            self.stop = True

    def item_failed(self, result: pb.ConsumeResult) -> None:
        self.errors[f"item {result.error.reason or result.error.code}"] += 1


class _Load:
    """One process's clients and scenario operations."""

    def __init__(self, spec: LoadSpec, stats: _Stats, seed: int) -> None:
        self.spec = spec
        self.stats = stats
        self.rng = random.Random(seed)
        self.md = (("authorization", f"Bearer {spec.api_key}"),)
        # Each channel its own subchannel pool, so its own TCP connection: grpc otherwise
        # shares one connection between channels to the same target in a process, and
        # `serve --workers N` spreads connections, not calls, over its workers.
        self.channels = [
            grpc.aio.insecure_channel(spec.address, options=OWN_CONNECTION)
            for _ in range(spec.channels)
        ]
        self.stubs = [pb_grpc.CreditsStub(c) for c in self.channels]
        self.empties = [c.unary_unary(EMPTY_METHOD) for c in self.channels]
        # The `http` scenario's clients: connectrpc's generated client with plain JSON
        # (no compression), as a curl or PHP caller sends it; one per channel, each with
        # its own pool of keep-alive connections.
        self.http_headers = {"authorization": f"Bearer {spec.api_key}"}
        self.http_clients = [
            credits_connect.CreditsClient(
                spec.http_address, codec=google_protobuf_json_codec(), send_compression=None,
                accept_compression=(), timeout_ms=int(BENCH_CALL_TIMEOUT_S * 1000),
            )
            for _ in range(spec.channels if spec.scenario == "http" else 0)
        ]  # fmt: skip
        self._next = 0

    async def ready(self) -> None:
        await asyncio.gather(*(c.channel_ready() for c in self.channels))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels))
        await asyncio.gather(*(c.close() for c in self.http_clients))

    def _stub(self) -> pb_grpc.CreditsStub:
        self._next = (self._next + 1) % len(self.stubs)
        return self.stubs[self._next]

    def _account(self) -> str:
        return f"{self.spec.account_prefix}{self.rng.randrange(self.spec.accounts)}"

    def _consume_request(self) -> pb.ConsumeRequest:
        return pb.ConsumeRequest(
            account_id=self._account(), feature="text", request_id=uuid.uuid4().hex
        )

    async def _timed(
        self, call: Callable[[], Awaitable[Any]], started: float | None
    ) -> tuple[Any, float]:
        """Run one RPC: (its reply or FAILED, the time its latency counts from). In open
        loop that is the moment the call was due, so a late send is not hidden (no
        coordinated omission)."""
        t0 = time.perf_counter() if started is None else started
        try:
            return await call(), t0
        except grpc.aio.AioRpcError as error:
            self.stats.failed(error)
            return FAILED, t0

    # --- one operation each; `started` is set in open loop --------------------------
    async def empty(self, started: float | None = None) -> None:
        method = self.empties[self._next]
        self._next = (self._next + 1) % len(self.empties)
        reply, t0 = await self._timed(
            lambda: method(b"", metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S), started
        )
        if reply is not FAILED:
            self.stats.ok(t0, 0)

    async def consume(self, started: float | None = None) -> None:
        stub, req = self._stub(), self._consume_request()
        reply, t0 = await self._timed(
            lambda: stub.Consume(req, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S), started
        )
        if reply is not FAILED:
            self.stats.ok(t0, 1)

    async def http_consume(self, started: float | None = None) -> None:
        """Consume of one text message over HTTP/JSON: the `consume` operation otherwise."""
        self._next = (self._next + 1) % len(self.http_clients)
        client, req = self.http_clients[self._next], self._consume_request()
        t0 = time.perf_counter() if started is None else started
        try:
            await client.consume(req, headers=self.http_headers)
        except ConnectError as error:
            self.stats.connect_failed(error)
            return
        self.stats.ok(t0, 1)

    async def check(self, started: float | None = None) -> None:
        """Check of one text message: Consume's price and decision, nothing deducted."""
        stub = self._stub()
        req = pb.CheckRequest(account_id=self._account(), feature="text")
        reply, t0 = await self._timed(
            lambda: stub.Check(req, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S), started
        )
        if reply is FAILED:
            return
        if not reply.allowed:  # the bench accounts hold 10^12 credits: a wrong answer
            self.stats.errors[f"denied {reply.denial.reason}"] += 1
            return
        self.stats.ok(t0, 0)

    async def batch(self, started: float | None = None) -> None:
        stub = self._stub()
        req = pb.ConsumeBatchRequest(
            items=[self._consume_request() for _ in range(self.spec.batch_size)]
        )
        reply, t0 = await self._timed(
            lambda: stub.ConsumeBatch(req, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S),
            started,
        )
        if reply is FAILED:
            return
        charged = 0
        for result in reply.results:
            if result.WhichOneof("outcome") == "response":
                charged += 1
            else:
                self.stats.item_failed(result)
        self.stats.ok(t0, charged)

    async def session(self, started: float | None = None) -> None:
        """One voice call: start, one report of a full quota, end half-way into the next."""
        stub, account, sid = self._stub(), self._account(), uuid.uuid4().hex
        start = pb.StartSessionRequest(
            account_id=account,
            feature="voice",
            session_id=sid,
            requested_seconds=BENCH_SESSION_SECONDS,
        )
        reply, t0 = await self._timed(
            lambda: stub.StartSession(start, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S),
            started,
        )
        if reply is FAILED:
            return
        self.stats.ok(t0, 0)
        update = pb.UpdateSessionRequest(
            account_id=account,
            session_id=sid,
            sequence=1,
            used_seconds=BENCH_SESSION_SECONDS,
            requested_seconds=BENCH_SESSION_SECONDS,
        )
        reply, t0 = await self._timed(
            lambda: stub.UpdateSession(update, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S),
            None,
        )
        if reply is FAILED:
            return
        self.stats.ok(t0, 1 if reply.charged_amount else 0)
        end = pb.EndSessionRequest(
            account_id=account, session_id=sid, sequence=2, used_seconds=BENCH_SESSION_SECONDS // 2
        )
        reply, t0 = await self._timed(
            lambda: stub.EndSession(end, metadata=self.md, timeout=BENCH_CALL_TIMEOUT_S), None
        )
        if reply is not FAILED:
            self.stats.ok(t0, 1 if reply.charged_amount else 0)

    async def mixed(self, started: float | None = None) -> None:
        """A chat and call platform: mostly text messages, now and then a voice call."""
        if self.rng.random() < BENCH_MIXED_TEXT_SHARE:
            await self.consume(started)
        else:
            await self.session(started)

    async def meter_stream(self, deadline: float) -> None:
        """One Meter stream kept `batch_size` requests deep until the deadline."""
        call = self._stub().Meter(metadata=self.md)
        window = asyncio.Semaphore(self.spec.batch_size)
        sent: deque[float] = deque()

        def outcome(reply: pb.MeterResponse) -> None:
            started = sent.popleft()
            window.release()
            if reply.result.WhichOneof("outcome") == "response":
                self.stats.ok(started, 1)
            else:
                self.stats.item_failed(reply.result)

        # The first request alone, read before anything else is in flight: a stream the
        # server refuses (UNIMPLEMENTED, UNAUTHENTICATED) then mostly fails with that
        # status. Not always: a write racing the server's end of the stream fails the call
        # with a bare INTERNAL "Internal error from Core" in the client.
        try:
            await window.acquire()
            sent.append(time.perf_counter())
            await call.write(pb.MeterRequest(consume=self._consume_request()))
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            self.stats.failed(error)
            return
        if first is grpc.aio.EOF:
            self.stats.errors["stream ended early"] += 1
            return
        outcome(first)

        async def write() -> None:
            while time.perf_counter() < deadline and not self.stats.stop:
                await window.acquire()
                sent.append(time.perf_counter())
                await call.write(pb.MeterRequest(consume=self._consume_request()))
            await call.done_writing()

        async def read() -> None:
            # read(), not `async for`: grpc.aio refuses a mix of the two on one call.
            while (reply := await call.read()) is not grpc.aio.EOF:
                outcome(reply)

        writer, reader = asyncio.ensure_future(write()), asyncio.ensure_future(read())
        await asyncio.wait({writer, reader}, return_when=asyncio.FIRST_EXCEPTION)
        if not reader.done():
            # The writer failed; the reader ends with the call's status.
            await asyncio.wait({reader}, timeout=BENCH_CALL_TIMEOUT_S)
        if not reader.done():
            call.cancel()
        writer.cancel()
        read_error, write_error = await asyncio.gather(reader, writer, return_exceptions=True)
        for ended in (read_error, write_error):
            if isinstance(ended, grpc.aio.AioRpcError):
                self.stats.failed(ended)
                break
            if isinstance(ended, Exception) and not isinstance(ended, asyncio.CancelledError):
                # Not a status: a bug of the bench or the stream; counted, never hidden.
                self.stats.errors[type(ended).__name__] += 1
                self.stats.details.setdefault(type(ended).__name__, str(ended)[:300])
                break


def _operation(load: _Load, scenario: str) -> Callable[[float | None], Awaitable[None]]:
    ops: dict[str, Callable[[float | None], Awaitable[None]]] = {
        "empty": load.empty,
        "consume": load.consume,
        "check": load.check,
        "batch": load.batch,
        "sessions": load.session,
        "mixed": load.mixed,
        "http": load.http_consume,
    }
    return ops[scenario]


async def _closed_loop(load: _Load, deadline: float) -> None:
    if load.spec.scenario == "meter":
        await asyncio.gather(*(load.meter_stream(deadline) for _ in range(load.spec.concurrency)))
        return
    op = _operation(load, load.spec.scenario)

    async def slot() -> None:
        while time.perf_counter() < deadline and not load.stats.stop:
            await op(None)

    await asyncio.gather(*(slot() for _ in range(load.spec.concurrency)))


async def _open_loop(load: _Load, rate: float, deadline: float) -> None:
    """Send at a fixed rate whatever the answers do; each latency counts from the moment
    its call was due."""
    op = _operation(load, load.spec.scenario)
    interval = 1.0 / rate
    due = time.perf_counter()
    pending: set[asyncio.Task[None]] = set()
    while due < deadline and not load.stats.stop:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.ensure_future(op(due))
        pending.add(task)
        task.add_done_callback(pending.discard)
        due += interval
    await asyncio.gather(*pending)


async def _run(spec: LoadSpec, index: int, counter: Any, barrier: Any) -> WorkerResult:
    stats = _Stats(counter, index)
    load = _Load(spec, stats, seed=index)
    try:
        await load.ready()
        # Every process starts together, once all have connected (spawn and imports take
        # a while on a loaded machine and must not count).
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        started = time.perf_counter()
        deadline = started + spec.duration_s
        if spec.rate is None:
            await _closed_loop(load, deadline)
        else:
            await _open_loop(load, spec.rate, deadline)
        elapsed = time.perf_counter() - started
    finally:
        await load.close()
    return WorkerResult(
        calls=stats.calls,
        deductions=stats.deductions,
        errors=stats.errors,
        error_details=stats.details,
        histogram=stats.histogram.encode(),
        elapsed_s=elapsed,
    )


def worker_main(spec: LoadSpec, index: int, counter: Any, barrier: Any, out: Any) -> None:
    """Entry point of one load process."""
    try:
        out.put((index, uvloop.run(_run(spec, index, counter, barrier))))
    except BaseException as exc:  # the parent must hear of it rather than wait forever
        out.put((index, f"{type(exc).__name__}: {exc}"))
        raise


# --- the empty-call ceiling server --------------------------------------------------
async def _empty_server(port_out: Any) -> None:
    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    handler = grpc.method_handlers_generic_handler(
        EMPTY_SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_out.put(port)
    await server.wait_for_termination()


def empty_server_main(port_out: Any) -> None:
    """Entry point of the empty-call server process (ended by SIGTERM from the parent)."""
    uvloop.run(_empty_server(port_out))


def spawn_context() -> Any:
    # spawn, not fork: grpc's threads do not survive a fork.
    return mp.get_context("spawn")
