"""The real server as a subprocess (`python -m creditmeter serve`) with its own embedded
redis-server: restarts, graceful and hard shutdown, live key changes, a missing
redis-server, reflection without the proto files, the CLI client commands, and the
metrics endpoint and JSON logs the serve flags turn on."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
import redis
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from tests.conftest import free_port, rid
from tests.helpers import Failure, failure

Metadata = tuple[tuple[str, str], ...]

#: The environment of every child: no CREDITMETER_* setting leaks in from the caller's shell.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CREDITMETER_")}
READY_TIMEOUT_S = 30.0
CREDITS_SERVICE = "credits.v1.Credits"
#: Calls in flight during the drain test. Kept under 100: the server's Redis client refuses
#: more concurrent commands than that (see test_more_than_100_concurrent_calls_are_served).
DRAIN_CALLS = 90


# --- helpers ---------------------------------------------------------------------------
def auth(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m creditmeter ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "creditmeter", *args],
        capture_output=True, text=True, env=env or ENV, timeout=60, check=False,
    )


def create_key(data_dir: Path, tenant: str, role: str) -> tuple[str, str]:
    """`creditmeter keys create`: the key (from stdout) and its id (from the stderr note)."""
    result = cli("keys", "create", "--tenant", tenant, "--role", role, "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    match = re.search(r"key (\S+) for tenant", result.stderr)
    assert match, result.stderr
    assert key.startswith(f"cm_{match[1]}_"), (key, result.stderr)
    return key, match[1]


def rejected(call: Callable[[], object]) -> Failure:
    """Run a sync call that must fail, and describe how it failed."""
    try:
        call()
    except grpc.RpcError as error:
        return failure(error)  # type: ignore[arg-type]
    raise AssertionError("the call succeeded but was expected to fail")


def eventually(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> float:
    """Poll `check` until it is true; the seconds it took, or AssertionError on timeout."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
    return time.monotonic() - start


def processes_using(data_dir: Path) -> list[str]:
    """Live processes whose command line names the data dir (the server, its redis-server)."""
    result = subprocess.run(
        ["pgrep", "-af", str(data_dir)], capture_output=True, text=True, check=False
    )
    return result.stdout.splitlines()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # state, ppid, ...


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def redis_socket(data_dir: Path) -> Path:
    return data_dir / "redis" / "redis.sock"


def redis_answers(data_dir: Path) -> bool:
    """Whether anything accepts connections on the embedded Redis's unix socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(redis_socket(data_dir)))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True


class ServerProcess:
    """One `creditmeter serve` child in its own session (so its process group holds it and
    its redis-server, and teardown can kill both)."""

    def __init__(
        self,
        data_dir: Path,
        log_dir: Path,
        env: dict[str, str] | None,
        args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"serve-{self.port}.out"
        self.stderr_path = log_dir / f"serve-{self.port}.err"
        self._out: IO[bytes] = self.stdout_path.open("wb")
        self._err: IO[bytes] = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            # One process: these tests check its children (Redis, flusher) and its drain.
            # `--workers N` has tests/test_workers.py.
            [sys.executable, "-m", "creditmeter", "serve", "--workers", "1",
             "--listen", self.address, "--data-dir", str(data_dir), *args],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            env=env or ENV, start_new_session=True,
        )
        self.pgid = self.proc.pid

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Poll grpc.health.v1 Check until the credits service is SERVING."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        request = health_pb2.HealthCheckRequest(service=CREDITS_SERVICE)
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.stderr()}"
                    )
                with suppress(grpc.RpcError):
                    reply = health.Check(request, timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"server not ready in {READY_TIMEOUT_S} s:\n{self.stderr()}"
                    )
                time.sleep(0.05)

    def redis_pid(self) -> int:
        """The pid of the server's redis-server (its other child is its flusher)."""
        kids = {k: Path(f"/proc/{k}/cmdline").read_bytes() for k in children(self.pid)}
        redis_kids = [k for k, cmdline in kids.items() if b"redis-server" in cmdline]
        assert len(redis_kids) == 1, kids
        flushers = [k for k, cmdline in kids.items() if b"\0flush\0" in cmdline]
        assert len(kids) == 2 and len(flushers) == 1, kids
        return redis_kids[0]

    def terminate(self, timeout_s: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def cleanup(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.close()
        self._err.close()


Launch = Callable[..., ServerProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start `creditmeter serve` on a data dir and wait until it is ready. Every process
    group started is killed at teardown, whatever the test did."""
    started: list[ServerProcess] = []

    def _launch(
        data_dir: Path, env: dict[str, str] | None = None, args: Sequence[str] = ()
    ) -> ServerProcess:
        """`args`: more `serve` flags (say, --redis-url)."""
        server = ServerProcess(data_dir, tmp_path / "logs", env, args)
        started.append(server)
        server.wait_ready()
        return server

    yield _launch
    for server in started:
        server.cleanup()


def snapshot(stub: pb_grpc.CreditsStub, md: Metadata, *accounts: str) -> list[Any]:
    """Every read of the given accounts and the rate card."""
    reads: list[Any] = [stub.ListRates(pb.ListRatesRequest(), metadata=md, timeout=10)]
    for account in accounts:
        reads.append(stub.GetBalance(pb.GetBalanceRequest(account_id=account), metadata=md,
                                     timeout=10))
        reads.append(stub.GetUsage(pb.GetUsageRequest(account_id=account), metadata=md,
                                   timeout=10))
    return reads


def balance(stub: pb_grpc.CreditsStub, md: Metadata, account: str) -> int:
    reply = stub.GetBalance(pb.GetBalanceRequest(account_id=account), metadata=md, timeout=10)
    return int(reply.balance)


def pause_redis_writes(data_dir: Path, ms: int) -> None:
    """Hold every write (and so every Lua script) in the embedded Redis for `ms`."""
    url = (data_dir / "redis" / "endpoint").read_text().strip()
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("CLIENT", "PAUSE", str(ms), "WRITE")
    finally:
        client.close()


def redis_blocked_clients(data_dir: Path) -> int:
    """Clients of the embedded Redis waiting on a command (paused writes count)."""
    url = (data_dir / "redis" / "endpoint").read_text().strip()
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("clients")["blocked_clients"])
    finally:
        client.close()


# --- 1. restart ------------------------------------------------------------------------
def test_restart_keeps_balances_usage_rates_options_keys_and_idempotency(
    launch: Launch, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    admin_key, _ = create_key(data, "acme", "admin")
    meter_key, _ = create_key(data, "acme", "meter")
    read_key, _ = create_key(data, "acme", "read")
    admin, meter, reader = auth(admin_key), auth(meter_key), auth(read_key)
    server = launch(data)
    assert (data / "redis" / "endpoint").read_text().startswith("unix://")

    consume_text = pb.ConsumeRequest(account_id="alice", feature="text", quantity=7,
                                     request_id=rid())
    grant_promo = pb.GrantRequest(
        account_id="alice", amount=100, valid_for=Duration(seconds=30 * 86400), priority=10,
        source=pb.LOT_SOURCE_PROMOTION, reference="spring", request_id=rid(),
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        first_grant = stub.Grant(grant_promo, metadata=admin, timeout=10)
        stub.Grant(pb.GrantRequest(account_id="alice", amount=50, source=pb.LOT_SOURCE_PURCHASE,
                                   request_id=rid()), metadata=admin, timeout=10)
        rate = stub.SetRate(pb.SetRateRequest(
            rate=pb.Rate(feature="sms_out", credits_per_unit=3, unit=pb.RATE_UNIT_COUNT),
            request_id=rid()), metadata=admin, timeout=10)
        assert rate.rate.credits_per_unit == 3
        first_consume = stub.Consume(consume_text, metadata=meter, timeout=10)
        assert (first_consume.amount, first_consume.balance) == (7, 143)
        sms = stub.Consume(pb.ConsumeRequest(account_id="alice", feature="sms_out", quantity=2,
                                             request_id=rid()), metadata=meter, timeout=10)
        assert (sms.amount, sms.balance) == (6, 137)
        options = stub.SetAccountOptions(pb.SetAccountOptionsRequest(
            account_id="bob", unlimited=True, request_id=rid()), metadata=admin, timeout=10)
        assert options.options.unlimited
        stub.Consume(pb.ConsumeRequest(account_id="bob", feature="text", quantity=5,
                                       request_id=rid()), metadata=meter, timeout=10)
        before = snapshot(stub, reader, "alice", "bob")

    rates, alice_balance, alice_usage, bob_balance, bob_usage = before
    assert {r.feature: r.credits_per_unit for r in rates.rates}["sms_out"] == 3
    assert alice_balance.balance == 137
    assert [lot.remaining for lot in alice_balance.lots] == [87, 50]
    assert alice_balance.lots[0].HasField("expires_at")
    assert not alice_balance.lots[1].HasField("expires_at")
    assert (alice_usage.total, alice_usage.used, alice_usage.remaining) == (150, 13, 137)
    assert {f.feature: (f.credits, f.units) for f in alice_usage.features} == {
        "text": (7, 7), "sms_out": (6, 2)}
    assert bob_balance.unlimited and bob_balance.balance == -1
    assert bob_usage.unlimited and bob_usage.used == 5

    # SIGTERM: clean exit, and the redis-server child goes with it.
    redis_pid = server.redis_pid()
    # The server, its redis-server and its flusher.
    assert len(processes_using(data)) == 3, processes_using(data)
    assert redis_answers(data)
    assert server.terminate() == 0, server.stderr()
    assert not alive(redis_pid)
    assert processes_using(data) == []
    assert not redis_answers(data)

    server = launch(data)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        assert snapshot(stub, reader, "alice", "bob") == before

        # Every key still works, with its role.
        assert balance(stub, admin, "alice") == 137
        assert balance(stub, meter, "alice") == 137
        denied = rejected(lambda: stub.Consume(
            pb.ConsumeRequest(account_id="alice", feature="text", request_id=rid()),
            metadata=reader, timeout=10))
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED
        assert denied.reason == "ROLE_NOT_ALLOWED"

        # A retry after the restart replays the first response and charges nothing.
        again = stub.Consume(consume_text, metadata=meter, timeout=10)
        assert again.transaction_id == first_consume.transaction_id
        assert again.SerializeToString() == first_consume.SerializeToString()
        regrant = stub.Grant(grant_promo, metadata=admin, timeout=10)
        assert regrant.SerializeToString() == first_grant.SerializeToString()
        assert balance(stub, reader, "alice") == 137

        # The same request id with other parameters is refused and changes nothing.
        changed = pb.ConsumeRequest()
        changed.CopyFrom(consume_text)
        changed.quantity = 8
        reused = rejected(lambda: stub.Consume(changed, metadata=meter, timeout=10))
        assert reused.code == grpc.StatusCode.INVALID_ARGUMENT
        assert reused.reason == "IDEMPOTENCY_KEY_REUSED"
        assert reused.metadata.get("request_id") == consume_text.request_id
        assert snapshot(stub, reader, "alice", "bob") == before
    assert server.terminate() == 0


# --- 2. SIGTERM drains -----------------------------------------------------------------
def test_sigterm_drains_in_flight_calls(launch: Launch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "drain", "admin")
    md = auth(key)
    initial = 100_000
    server = launch(data)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(pb.GrantRequest(account_id="dana", amount=initial, request_id=rid()),
                   metadata=md, timeout=10)

        def consume(request_id: str) -> grpc.Future:
            return stub.Consume.future(  # type: ignore[no-any-return]
                pb.ConsumeRequest(account_id="dana", feature="text", request_id=request_id),
                metadata=md, timeout=60,
            )

        # Make every write slow: Redis holds scripts for 3 s, so the calls are still in
        # flight (inside the server's handlers) when SIGTERM arrives. Make sure every one
        # of them is in a handler: a call still queued in the transport was never in
        # flight. Concurrent Consume calls share pipelines (the coalescer), so only the
        # first round trip is at Redis and the others wait for it inside the server.
        # Instead, a Consume that fails validation (it never reaches Redis) is sent after
        # them on the same connection: the server takes the calls of a method in the order
        # their streams open, so once it is answered every earlier one is in a handler.
        pause_redis_writes(data, 3000)
        in_flight = {r: consume(r) for r in (rid() for _ in range(DRAIN_CALLS))}
        marker = rejected(lambda: stub.Consume(
            pb.ConsumeRequest(account_id="dana", feature="text"), metadata=md, timeout=2.5))
        assert marker.reason == "INVALID_REQUEST"
        assert redis_blocked_clients(data) >= 1, "no call reached Redis"
        assert not any(f.done() for f in in_flight.values()), "calls were not slowed down"
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # Calls arriving while the server drains are refused, not accepted.
        late = {r: consume(r) for r in (rid() for _ in range(20))}

        outcomes: dict[str, grpc.StatusCode] = {}
        responses: dict[str, pb.ConsumeResponse] = {}
        for request_id, future in {**in_flight, **late}.items():
            try:
                responses[request_id] = future.result()
                outcomes[request_id] = grpc.StatusCode.OK
            except grpc.RpcError as error:
                outcomes[request_id] = error.code()  # type: ignore[attr-defined]

    assert server.proc.wait(30) == 0, server.stderr()
    assert processes_using(data) == []
    unexpected = set(outcomes.values()) - {
        grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert not unexpected, unexpected
    # Every call that was in flight when SIGTERM came was allowed to finish.
    assert all(outcomes[r] == grpc.StatusCode.OK for r in in_flight), (
        [outcomes[r] for r in in_flight if outcomes[r] != grpc.StatusCode.OK], server.stderr())
    assert all(outcomes[r] != grpc.StatusCode.OK for r in late)
    successes = [r for r, code in outcomes.items() if code == grpc.StatusCode.OK]
    failures = [r for r, code in outcomes.items() if code != grpc.StatusCode.OK]
    assert len({responses[r].transaction_id for r in successes}) == len(successes)

    server = launch(data)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        after = balance(stub, md, "dana")
        # No acknowledged charge lost; nothing charged beyond what may have been applied.
        assert after <= initial - len(successes)
        assert after >= initial - len(successes) - len(failures)
        assert after == initial - len(successes)  # the refused calls never reached Redis
        # Retrying everything with the same request ids settles every call exactly once.
        for request_id in successes[:5]:
            replay = stub.Consume(pb.ConsumeRequest(account_id="dana", feature="text",
                                                    request_id=request_id), metadata=md, timeout=10)
            assert replay.SerializeToString() == responses[request_id].SerializeToString()
        for request_id in failures:
            stub.Consume(pb.ConsumeRequest(account_id="dana", feature="text",
                                           request_id=request_id), metadata=md, timeout=10)
        assert balance(stub, md, "dana") == initial - len(outcomes)
    assert server.terminate() == 0


def test_more_than_100_concurrent_calls_are_served(launch: Launch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "burst", "admin")
    md = auth(key)
    server = launch(data)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(pb.GrantRequest(account_id="hal", amount=1000, request_id=rid()),
                   metadata=md, timeout=10)
        pause_redis_writes(data, 1500)  # a slow disk: every call waits on Redis a while
        futures = [
            stub.Consume.future(
                pb.ConsumeRequest(account_id="hal", feature="text", request_id=rid()),
                metadata=md, timeout=30,
            )
            for _ in range(150)
        ]
        codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in futures]
        refused = [c for c in codes if c != grpc.StatusCode.OK]
        assert refused == [], f"{len(refused)} of 150 calls failed: {set(refused)}"
        assert balance(stub, md, "hal") == 850
    assert server.terminate() == 0


# --- 3. kill -9 ------------------------------------------------------------------------
def test_kill_9_loses_no_acknowledged_change(launch: Launch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "crash", "admin")
    md = auth(key)
    server = launch(data)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(pb.GrantRequest(account_id="carol", amount=500, request_id=rid()),
                   metadata=md, timeout=10)
        stub.Grant(pb.GrantRequest(account_id="carol", amount=40, valid_for=Duration(seconds=3600),
                                   request_id=rid()), metadata=md, timeout=10)
        last = None
        for quantity in range(1, 21):
            last = stub.Consume(pb.ConsumeRequest(account_id="carol", feature="text",
                                                  quantity=quantity, request_id=rid()),
                                metadata=md, timeout=10)
        assert last is not None and last.balance == 540 - 210
        before = snapshot(stub, md, "carol")

    # SIGKILL the server alone: the kernel sends its redis-server SIGTERM (PDEATHSIG).
    redis_pid = server.redis_pid()
    os.kill(server.pid, signal.SIGKILL)
    assert server.proc.wait(10) == -signal.SIGKILL
    eventually(lambda: not alive(redis_pid), 10)
    eventually(lambda: processes_using(data) == [], 5)
    assert not redis_answers(data)

    server = launch(data)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        assert snapshot(stub, md, "carol") == before
        assert before[1].balance == 330
        assert before[2].used == 210
        more = stub.Consume(pb.ConsumeRequest(account_id="carol", feature="text", quantity=30,
                                              request_id=rid()), metadata=md, timeout=10)
        assert more.balance == 300
        stub.Grant(pb.GrantRequest(account_id="erin", amount=9, request_id=rid()),
                   metadata=md, timeout=10)
        before = snapshot(stub, md, "carol", "erin")

    # Now kill -9 both at once (the whole process group), as a crash would: Redis gets no
    # chance to flush, so only what its append-only file already held survives.
    os.killpg(server.pgid, signal.SIGKILL)
    assert server.proc.wait(10) == -signal.SIGKILL
    eventually(lambda: processes_using(data) == [], 10)

    server = launch(data)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        assert snapshot(stub, md, "carol", "erin") == before
        assert balance(stub, md, "carol") == 300
        assert balance(stub, md, "erin") == 9
    assert server.terminate() == 0


# --- 4. keys change while the server runs ----------------------------------------------
def test_keys_created_and_revoked_while_running_take_effect_within_a_second(
    launch: Launch, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    keep_key, keep_id = create_key(data, "live", "read")
    server = launch(data)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)

        def authenticated(key: str) -> bool:
            try:
                stub.ListRates(pb.ListRatesRequest(), metadata=auth(key), timeout=5)
            except grpc.RpcError as error:
                info = failure(error)  # type: ignore[arg-type]
                assert info.code == grpc.StatusCode.UNAUTHENTICATED, info
                assert info.reason == "API_KEY_INVALID", info
                return False
            return True

        assert authenticated(keep_key)
        new_key, new_id = create_key(data, "live", "admin")
        took = eventually(lambda: authenticated(new_key), 1.5)
        assert took <= 1.0, took
        granted = stub.Grant(pb.GrantRequest(account_id="frank", amount=3, request_id=rid()),
                             metadata=auth(new_key), timeout=10)
        assert granted.balance == 3

        listing = cli("keys", "list", "--tenant", "live", "--data-dir", str(data))
        assert listing.returncode == 0, listing.stderr
        assert new_id in listing.stdout and keep_id in listing.stdout
        for key in (new_key, keep_key):
            secret = key.split("_", 2)[2]
            assert secret not in listing.stdout + listing.stderr

        revoked = cli("keys", "revoke", new_id, "--data-dir", str(data))
        assert revoked.returncode == 0, revoked.stderr
        took = eventually(lambda: not authenticated(new_key), 1.5)
        assert took <= 1.0, took
        assert authenticated(keep_key)  # only the revoked key stops working

        again = cli("keys", "revoke", new_id, "--data-dir", str(data))
        assert again.returncode == 1
        listing = cli("keys", "list", "--tenant", "live", "--data-dir", str(data))
        dates = {
            key_id: len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d", line))
            for line in listing.stdout.splitlines()
            for key_id in (new_id, keep_id)
            if key_id in line
        }
        assert dates == {new_id: 2, keep_id: 1}  # created (and revoked) dates
    assert server.terminate() == 0


# --- 5. no redis-server ----------------------------------------------------------------
def test_missing_redis_server_exits_with_one_line_install_hint(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    assert shutil.which("redis-server", path=str(bin_dir)) is None
    data = tmp_path / "data"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "creditmeter", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--data-dir", str(data)],
        capture_output=True, text=True, env={**ENV, "PATH": str(bin_dir)}, timeout=30,
        start_new_session=True, check=False,
    )
    assert time.monotonic() - start < 10
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "redis-server" in lines[0]
    assert "apt-get install -y redis-server" in lines[0]
    assert processes_using(data) == []


# --- 6. reflection ---------------------------------------------------------------------
def test_reflection_lets_a_client_call_grant_without_the_proto_files(
    launch: Launch, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "refl", "admin")
    server = launch(data)

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = database.get_services()
        assert CREDITS_SERVICE in services
        assert "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName(CREDITS_SERVICE)
        method = service.methods_by_name["Grant"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        assert request_class.DESCRIPTOR.full_name == "credits.v1.GrantRequest"

        request = request_class(account_id="gina", amount=25, request_id=rid(),
                                reference="via-reflection")
        request.valid_for.seconds = 3600
        grant = channel.unary_unary(
            f"/{CREDITS_SERVICE}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        reply = grant(request, metadata=auth(key), timeout=10)
        assert reply.balance == 25
        assert reply.lot.amount == 25 and reply.lot.reference == "via-reflection"
        assert reply.lot.HasField("expires_at")

        denied = rejected(lambda: grant(request, timeout=10))  # no key
        assert denied.code == grpc.StatusCode.UNAUTHENTICATED

        stub = pb_grpc.CreditsStub(channel)
        assert balance(stub, auth(key), "gina") == 25
    assert server.terminate() == 0


# --- 7. CLI client commands ------------------------------------------------------------
def test_cli_client_commands_against_the_running_server(launch: Launch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "clit", "admin")
    server = launch(data)
    flags = ("--api-key", key, "--server", server.address)

    granted = cli("grant", "acct", "100", *flags)
    assert granted.returncode == 0, granted.stderr
    assert "granted 100 credits to acct: balance 100" in granted.stdout

    consumed = cli("consume", "acct", "text", "--quantity", "3", *flags)
    assert consumed.returncode == 0, consumed.stderr
    assert "charged 3 credits (3 text units) to acct: balance 97" in consumed.stdout

    checked = cli("check", "acct", "voice", "--quantity", "61", *flags)
    assert checked.returncode == 0, checked.stderr
    assert "acct: allowed; would cost 2 credits (2 voice units), balance 97" in checked.stdout
    refused = cli("check", "acct", "text", "--amount", "98", *flags)
    assert refused.returncode == 1, refused.stderr
    assert "not allowed: INSUFFICIENT_CREDITS" in refused.stdout
    assert "balance=97  required=98" in refused.stdout

    shown = cli("balance", "acct", *flags)
    assert shown.returncode == 0, shown.stderr
    assert "acct: balance 97" in shown.stdout

    usage = cli("usage", "acct", *flags)
    assert usage.returncode == 0, usage.stderr
    rows = [re.findall(r"\w+", line) for line in usage.stdout.splitlines()]
    assert ["total", "used", "remaining", "expired", "removed", "refunded"] in rows, usage.stdout
    assert ["100", "3", "97", "0", "0", "0"] in rows, usage.stdout
    assert ["text", "3", "3"] in rows, usage.stdout

    too_much = cli("consume", "acct", "text", "--quantity", "1000", *flags)
    assert too_much.returncode == 1, too_much.stdout
    assert "INSUFFICIENT_CREDITS" in too_much.stderr
    assert too_much.stdout == ""

    with grpc.insecure_channel(server.address) as channel:
        assert balance(pb_grpc.CreditsStub(channel), auth(key), "acct") == 97  # all or nothing
    assert server.terminate() == 0


def test_cli_usage_limit_commands(launch: Launch, tmp_path: Path) -> None:
    data = tmp_path / "data"
    key, _ = create_key(data, "clil", "admin")
    server = launch(data)
    flags = ("--api-key", key, "--server", server.address)
    assert cli("grant", "lim", "100", *flags).returncode == 0

    tenant_limit = cli("limits", "set", "text", "day", "3", *flags)
    assert tenant_limit.returncode == 0, tenant_limit.stderr
    assert "tenant default: text limited to 3 units a day" in tenant_limit.stdout
    own = cli("limits", "set", "voice", "month", "10", "--unit", "credits",
              "--account", "lim", *flags)  # fmt: skip
    assert own.returncode == 0, own.stderr
    assert "lim: voice limited to 10 credits a month" in own.stdout

    listed = cli("limits", "list", *flags)
    assert listed.returncode == 0, listed.stderr
    rows = [re.findall(r"\w+", line) for line in listed.stdout.splitlines()]
    assert ["text", "day", "3", "units"] in rows, listed.stdout
    assert not any("voice" in row for row in rows), listed.stdout  # the account's own

    assert cli("consume", "lim", "text", "--quantity", "2", *flags).returncode == 0
    over = cli("consume", "lim", "text", "--quantity", "2", *flags)
    assert over.returncode == 1 and "USAGE_LIMIT_EXCEEDED" in over.stderr, over.stderr
    refused = cli("check", "lim", "text", "--quantity", "2", *flags)
    assert refused.returncode == 1 and "USAGE_LIMIT_EXCEEDED" in refused.stdout

    mine = cli("limits", "list", "--account", "lim", *flags)
    assert mine.returncode == 0, mine.stderr
    rows = [re.findall(r"\w+", line) for line in mine.stdout.splitlines()]
    # feature, period, limit, unit, used, reserved, remaining, then the reset time
    text_row = next(r[:7] for r in rows if r[:1] == ["text"])
    assert text_row == ["text", "day", "3", "units", "2", "0", "1"], mine.stdout
    assert any(r[:4] == ["voice", "month", "10", "credits"] and r[-1] == "yes" for r in rows)
    usage = cli("usage", "lim", *flags)
    assert usage.returncode == 0 and "period" in usage.stdout, usage.stdout

    tz = cli("account-options", "lim", "--time-zone", "Asia/Tokyo", "--ignore-usage-limits",
             *flags)  # fmt: skip
    assert tz.returncode == 0, tz.stderr
    assert "time_zone=Asia/Tokyo ignore_usage_limits=True" in tz.stdout
    assert cli("consume", "lim", "text", "--quantity", "2", *flags).returncode == 0
    bad = cli("account-options", "lim", "--time-zone", "Mars/Olympus", *flags)
    assert bad.returncode == 1 and "time_zone" in bad.stderr, bad.stderr

    recharge = cli("recharge", "set", "50", *flags)
    assert recharge.returncode == 0, recharge.stderr
    assert "tenant default: recharge below 50" in recharge.stdout
    own = cli("recharge", "set", "20", "--account", "lim", *flags)
    assert "lim: recharge below 20 (its own)" in own.stdout, own.stdout
    assert "lim: recharges off" in cli("recharge", "off", "lim", *flags).stdout
    shown = cli("recharge", "remove", "--account", "lim", *flags)
    assert "lim: recharge below 50" in shown.stdout, shown.stdout
    bad = cli("recharge", "set", "0", *flags)
    assert bad.returncode == 1 and "policy.threshold" in bad.stderr, bad.stderr
    assert "no recharge policy" in cli("recharge", "remove", *flags).stdout

    removed = cli("limits", "remove", "text", "day", *flags)
    assert removed.returncode == 0, removed.stderr
    assert "no usage limits" in cli("limits", "list", *flags).stdout
    assert server.terminate() == 0


def test_serve_exports_metrics_and_logs_json_without_keys(launch: Launch, tmp_path: Path) -> None:
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    data = tmp_path / "data"
    admin, _ = create_key(data, "obs", "admin")
    reader, _ = create_key(data, "obs", "read")
    metrics_port = free_port()
    env = {
        **ENV,
        "CREDITMETER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "CREDITMETER_LOG_FORMAT": "json",
        "CREDITMETER_LOG_LEVEL": "DEBUG",  # the access log line of every call
    }
    server = launch(data, env)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        stub.Grant(
            pb.GrantRequest(account_id="zoe", amount=4, request_id=rid()),
            metadata=auth(admin),
            timeout=10,
        )
        stub.Consume(
            pb.ConsumeRequest(account_id="zoe", feature="text", quantity=3, request_id=rid()),
            metadata=auth(admin),
            timeout=10,
        )
        denied = rejected(
            lambda: stub.Consume(
                pb.ConsumeRequest(account_id="zoe", feature="text", request_id=rid()),
                metadata=auth(reader),
                timeout=10,
            )
        )
        assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for code in ("OK", "PERMISSION_DENIED"):
        labels = (("code", code), ("method", "Consume"), ("service", CREDITS_SERVICE))
        assert samples[("creditmeter_rpcs_total", labels)] == 1
    assert samples[("creditmeter_credits_consumed_total", (("feature", "text"),))] == 3
    assert server.terminate() == 0

    log = server.stderr()
    for key in (admin, reader):
        assert key.split("_", 2)[2] not in log
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    calls = {(line.get("rpc_method"), line.get("code")) for line in lines}
    assert {("Grant", "OK"), ("Consume", "OK"), ("Consume", "PERMISSION_DENIED")} <= calls
