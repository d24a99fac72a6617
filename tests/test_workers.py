"""`creditmeter serve --workers 2` as real processes: a supervisor, two workers on one
port, one embedded Redis, one flusher. Calls spread over both workers (seen in their
access log lines, which name the worker), 64 clients racing one balance never overdraw
it and the ledger audits clean, /metrics counts every worker's calls, the expiry sweeper
runs (in worker 0), a `kill -9`ed worker is started again on the same port, and SIGTERM
or a `kill -9` of the supervisor leaves no process behind. The HTTP/JSON port
(`--http-listen`) is shared the same way: HTTP calls spread over both workers too."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.transport.cli import build_parser
from tests.conftest import rid
from tests.test_server_process import (
    ENV,
    alive,
    children,
    cli,
    create_key,
    eventually,
    processes_using,
)

WORKERS = 2
START_TIMEOUT_S = 40.0
#: The race: this many clients, each on its own channel (its own TCP connection, so the
#: kernel spreads them over the workers), Consume(1) until refused, against this balance.
RACERS = 64
RACE_CREDITS = 1_000
#: Channel options that give a channel its own connection: grpc otherwise shares one
#: subchannel between channels to the same target in a process.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
#: Tries of a call that meets a connection reset while a worker is down or starting.
RESET_RETRIES = 5
_LISTENING = re.compile(r"listening on (\S+):(\d+) \(redis .*, (\d+) workers\)")
_METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")
_HTTP = re.compile(r"HTTP/JSON \(Connect\) on (http://\S+) \(every worker\)")


class Supervisor:
    """`creditmeter serve --workers 2 --listen 127.0.0.1:0 --http-listen 127.0.0.1:0` in
    its own session, logging JSON at DEBUG (so every call leaves an access line naming its
    worker)."""

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = log_dir / f"supervisor-{time.monotonic_ns()}.err"
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "creditmeter", "serve", "--workers", str(WORKERS),
             "--listen", "127.0.0.1:0", "--data-dir", str(data_dir),
             "--metrics-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._err,
            env={**ENV, "CREDITMETER_LOG_LEVEL": "DEBUG"}, start_new_session=True,
        )  # fmt: skip
        self.address = ""
        self.metrics_port = 0
        self.http_address = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        """Every JSON log line so far (the supervisor's and every child's)."""
        out = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_ready(self) -> None:
        """Until the supervisor says every worker takes calls; learn the port it chose."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.address:
            if self.proc.poll() is not None:
                raise AssertionError(f"supervisor exited {self.proc.returncode}")
            for record in self.records():
                message = str(record.get("message", ""))
                if "worker" in record:
                    continue  # a worker's own line, not the supervisor's
                if metrics := _METRICS.search(message):
                    self.metrics_port = int(metrics[1])
                if http := _HTTP.search(message):
                    self.http_address = http[1]
                if listening := _LISTENING.search(message):
                    assert int(listening[3]) == WORKERS
                    self.address = f"{listening[1]}:{listening[2]}"
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready in {START_TIMEOUT_S} s")
            time.sleep(0.1)

    def workers(self) -> dict[int, int]:
        """Worker index -> pid, from the supervisor's children's command lines."""
        found = {}
        for kid in children(self.pid):
            with suppress(OSError):
                argv = Path(f"/proc/{kid}/cmdline").read_bytes().split(b"\0")
                if b"--worker-index" in argv:
                    found[int(argv[argv.index(b"--worker-index") + 1])] = kid
        return found

    def served_by(self, method: str) -> Counter[int]:
        """Access log lines of `method` per worker index."""
        return Counter(
            int(r["worker"]) for r in self.records()
            if r.get("rpc_method") == method and "worker" in r
        )  # fmt: skip

    def cleanup(self) -> None:
        # The workers, flusher and Redis are in sessions of their own: kill them by pid,
        # then the supervisor's group.
        for kid in children(self.pid):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(kid, signal.SIGKILL)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._err.close()


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[Supervisor, str]]:
    """A ready supervisor on a fresh data dir, and an admin key of tenant `workers`."""
    data = tmp_path / "data"
    key, _ = create_key(data, "workers", "admin")
    server = Supervisor(data, tmp_path / "logs")
    try:
        server.wait_ready()
        yield server, key
    finally:
        server.cleanup()


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def race(address: str, key: str, account: str) -> Counter[str]:
    """RACERS clients on their own channels, Consume(1) each until refused."""

    async def racer() -> Counter[str]:
        seen: Counter[str] = Counter()
        # A local subchannel pool: a TCP connection of its own, not grpc's shared one.
        async with grpc.aio.insecure_channel(address, options=OWN_CONNECTION) as channel:
            stub = pb_grpc.CreditsStub(channel)
            while True:
                try:
                    await stub.Consume(
                        pb.ConsumeRequest(account_id=account, feature="text", request_id=rid()),
                        metadata=md(key), timeout=20,
                    )  # fmt: skip
                    seen["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    seen[error.code().name] += 1
                    if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        return seen

    total: Counter[str] = Counter()
    for seen in await asyncio.gather(*(racer() for _ in range(RACERS))):
        total.update(seen)
    return total


def ledger_backlog(stub: pb_grpc.CreditsStub, key: str) -> int:
    status = stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md(key), timeout=5)
    return int(status.backlog)


# --- tests -----------------------------------------------------------------------------
async def test_racing_clients_spread_over_both_workers_never_overdraw(
    supervisor: tuple[Supervisor, str],
) -> None:
    server, key = supervisor
    assert sorted(server.workers()) == [0, 1]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(
            pb.GrantRequest(account_id="race", amount=RACE_CREDITS, request_id=rid()),
            metadata=md(key), timeout=10,
        )  # fmt: skip
        # A lot that expires during the race and that nothing touches: only the expiry
        # sweeper (worker 0's) records its expiry.
        stub.Grant(
            pb.GrantRequest(account_id="fading", amount=5, valid_for=Duration(seconds=1),
                            request_id=rid()),
            metadata=md(key), timeout=10,
        )  # fmt: skip

        seen = await race(server.address, key, "race")

        assert seen == {"OK": RACE_CREDITS, "FAILED_PRECONDITION": RACERS}, seen
        reply = stub.GetBalance(pb.GetBalanceRequest(account_id="race"), metadata=md(key),
                                timeout=10)  # fmt: skip
        assert reply.balance == 0
        # Both workers served the race (64 connections hashed over two sockets). A call's
        # access line and metrics are written once its reply is on its way: wait for them.
        eventually(lambda: sum(server.served_by("Consume").values()) == sum(seen.values()), 10)
        served = server.served_by("Consume")
        assert set(served) == {0, 1}, served
        # One /metrics over both workers.
        text = scrape(server.metrics_port)
        assert metric_sum(text, "creditmeter_rpcs_total", method="Consume") == sum(seen.values())
        assert metric_sum(text, "creditmeter_rpcs_total", method="Consume", code="OK") == (
            RACE_CREDITS
        )
        # The one flusher drains both workers' events; the ledger then equals Redis.
        eventually(lambda: ledger_backlog(stub, key) == 0, 20, 0.2)
        # The sweep's event (a read never writes one) is in the ledger once.
        kinds = lambda: [  # noqa: E731
            t.kind for t in stub.ListTransactions(
                pb.ListTransactionsRequest(account_id="fading"), metadata=md(key), timeout=10
            ).transactions
        ]  # fmt: skip
        eventually(lambda: pb.TRANSACTION_KIND_EXPIRE in kinds(), 10, 0.2)
        assert sorted(kinds()) == [pb.TRANSACTION_KIND_GRANT, pb.TRANSACTION_KIND_EXPIRE]
        history = stub.ListTransactions(
            pb.ListTransactionsRequest(account_id="race", page_size=1),
            metadata=md(key), timeout=10,
        )  # fmt: skip
        assert history.transactions[0].balance == 0
    audit = cli("audit", "--data-dir", str(server.data_dir), "--tenant", "workers")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def http_consume(http_address: str, key: str, account: str) -> dict[str, Any]:
    """One Consume over HTTP/JSON, on a connection of its own (urllib opens one per call,
    so the kernel hashes each over the workers' HTTP sockets)."""
    body = json.dumps({"accountId": account, "feature": "text", "requestId": rid()}).encode()
    request = urllib.request.Request(
        f"{http_address}/credits.v1.Credits/Consume", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as reply:
        return dict(json.loads(reply.read()))


HTTP_CALLS = 40


def test_http_calls_spread_over_both_workers(supervisor: tuple[Supervisor, str]) -> None:
    server, key = supervisor
    assert server.http_address.startswith("http://127.0.0.1:")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(pb.GrantRequest(account_id="web", amount=100, request_id=rid()),
                   metadata=md(key), timeout=10)  # fmt: skip
        balances = [int(http_consume(server.http_address, key, "web")["balance"])
                    for _ in range(HTTP_CALLS)]  # fmt: skip
        assert balances == list(range(99, 99 - HTTP_CALLS, -1))
        reply = stub.GetBalance(pb.GetBalanceRequest(account_id="web"), metadata=md(key),
                                timeout=10)  # fmt: skip
        assert reply.balance == 100 - HTTP_CALLS
    # Each worker's gateway forwards to its own gRPC server, whose access line names it.
    eventually(lambda: sum(server.served_by("Consume").values()) == HTTP_CALLS, 10)
    assert set(server.served_by("Consume")) == {0, 1}


def test_a_killed_worker_is_started_again_on_the_same_port(
    supervisor: tuple[Supervisor, str],
) -> None:
    server, key = supervisor
    before = server.workers()
    os.kill(before[1], signal.SIGKILL)
    # Once it is gone (a connection queued on its socket meanwhile is reset: UNAVAILABLE,
    # for the client to retry), worker 0 takes every new connection while worker 1 is down.
    eventually(lambda: not alive(before[1]), 5, 0.01)
    for amount in range(1, 9):
        request = pb.GrantRequest(account_id="k", amount=1, request_id=rid())
        for attempt in range(RESET_RETRIES):
            # A connection the kernel had already queued for the dead worker (or for its
            # successor while it starts) is reset: UNAVAILABLE, which a client retries,
            # with the same request id (so a grant that did go through is not doubled).
            try:
                with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
                    reply = pb_grpc.CreditsStub(channel).Grant(
                        request, metadata=md(key), timeout=10
                    )
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == RESET_RETRIES - 1:
                    raise
                time.sleep(0.2)
        assert reply.balance == amount

    eventually(lambda: server.workers().get(1, before[1]) != before[1], 15, 0.1)
    after = server.workers()
    assert after[0] == before[0] and alive(after[1]) and not alive(before[1])
    assert server.proc.poll() is None
    eventually(
        lambda: any(
            str(r.get("message")).startswith(f"worker 1 (pid {after[1]}) ready")
            for r in server.records()
        ),
        START_TIMEOUT_S,
        0.1,
    )
    # The new worker takes calls on the same port: new connections reach it again.
    old = server.served_by("GetBalance")[1]

    def reaches_new_worker() -> bool:
        for _ in range(16):
            with grpc.insecure_channel(server.address, options=OWN_CONNECTION) as channel:
                pb_grpc.CreditsStub(channel).GetBalance(
                    pb.GetBalanceRequest(account_id="k"), metadata=md(key), timeout=10
                )
        return server.served_by("GetBalance")[1] > old

    eventually(reaches_new_worker, 20, 0)


def test_sigterm_stops_every_process_in_order(supervisor: tuple[Supervisor, str]) -> None:
    server, _ = supervisor
    pids = {server.pid, *children(server.pid)}
    assert len(pids) == 1 + WORKERS + 2  # the supervisor, the workers, flusher, Redis
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not any(alive(pid) for pid in pids)
    assert processes_using(server.data_dir) == []
    assert not (server.data_dir / "redis" / "endpoint").exists()  # Redis stopped cleanly
    messages = [str(r.get("message")) for r in server.records()]
    drained = [i for i, m in enumerate(messages) if m.startswith("shutting down")]
    assert len(drained) == 1 + WORKERS  # the supervisor's line, then each worker's


def test_kill_9_of_the_supervisor_leaves_no_process(supervisor: tuple[Supervisor, str]) -> None:
    server, _ = supervisor
    pids = set(children(server.pid))
    assert len(pids) == WORKERS + 2
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    eventually(lambda: not any(alive(pid) for pid in pids), 30, 0.1)
    assert processes_using(server.data_dir) == []


def test_a_taken_port_fails_at_once_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as taken:  # a listener without SO_REUSEPORT
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "data"
        result = subprocess.run(
            [sys.executable, "-m", "creditmeter", "serve", "--workers", "2",
             "--listen", f"127.0.0.1:{port}", "--data-dir", str(data)],
            capture_output=True, text=True, env=ENV, timeout=30, check=False,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert processes_using(data) == []


def test_workers_flag_defaults_to_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDITMETER_WORKERS", raising=False)
    assert build_parser().parse_args(["serve"]).workers == (os.cpu_count() or 1)
    assert build_parser().parse_args(["serve", "--workers", "3"]).workers == 3
    monkeypatch.setenv("CREDITMETER_WORKERS", "1")
    assert build_parser().parse_args(["serve"]).workers == 1
