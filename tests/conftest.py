"""Fixtures: a real redis-server on a free port, the gRPC server in-process on port 0, and a
fresh tenant per test (with one key of each role) so tests never see each other's data.

A test module that sets `ON_CLUSTER = True` runs each of its tests that uses `redis_url`
twice: on the single redis-server and on the session's Redis Cluster (tests/cluster.py,
3 primaries + 3 replicas), as the ledger suites run on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import redis
from redis.cluster import ClusterNode

from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import DEFAULT_BUCKETS
from creditmeter.domain import keys as api_keys
from creditmeter.domain.clock import ManualClock
from creditmeter.storage.config_store import ConfigStore, KeyRow
from creditmeter.storage.deployment import BUCKETS_KEY
from creditmeter.storage.redis_client import cluster_seeds, is_cluster_url
from creditmeter.transport.server import App, Settings
from tests.cluster import failover_cluster, redis_cluster  # noqa: F401
from tests.pg import fresh_postgres_url, postgres_server, postgres_url  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: What `redis_url` is in the modules that run on both (`ON_CLUSTER`).
REDIS_BACKENDS = ("standalone", "cluster")
#: Buckets of the tests' cluster deployment: the single Redis's number, so a test's keys
#: and indexes are the same on both (the bench runs the cluster's default, 1,024).
TEST_CLUSTER_BUCKETS = DEFAULT_BUCKETS


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "ON_CLUSTER", False) and "redis_url" in metafunc.fixturenames:
        metafunc.parametrize("redis_url", REDIS_BACKENDS, indirect=True, scope="session")


def sync_client(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client of a single Redis or of a cluster, decoding replies."""
    if is_cluster_url(url):
        return redis.RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster_seeds(url)],
            decode_responses=True,
        )
    return redis.Redis.from_url(url, decode_responses=True)


def empty_redis(url: str) -> None:
    """Remove every key (of the database of a single Redis; of every primary of a cluster,
    which is then a deployment of TEST_CLUSTER_BUCKETS buckets again)."""
    client = sync_client(url)
    try:
        if isinstance(client, redis.RedisCluster):
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
            client.set(BUCKETS_KEY, str(TEST_CLUSTER_BUCKETS))
        else:
            client.flushdb()
    finally:
        client.close()


def private_redis(url: str, db: int) -> str:
    """A Redis only this module uses, emptied: database `db` of the single Redis, or the
    cluster itself (a cluster has one database; tests run one at a time)."""
    private = url if is_cluster_url(url) else f"{url.rsplit('/', 1)[0]}/{db}"
    empty_redis(private)
    return private


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, standalone_redis_url: str) -> str:
    """The tests' Redis: the single redis-server, or (parametrized, `ON_CLUSTER`) the
    session's Redis Cluster."""
    if getattr(request, "param", "standalone") == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        empty_redis(cluster.url)
        return str(cluster.url)
    return standalone_redis_url


@pytest.fixture(scope="session")
def standalone_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the whole session, on a free loopback port."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run ./scripts/test, which installs it"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.02)
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A blocking client of the tests' Redis (a cluster client on the cluster: the commands
    tests send are the same)."""
    client = sync_client(redis_url)
    yield cast(redis.Redis, client)
    client.close()


@pytest.fixture
def clock() -> ManualClock:
    """The server's clock; tests move it with advance()."""
    return ManualClock()


@pytest.fixture
async def app(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[App]:
    """The server in-process. Its flusher runs only for tests marked `flusher`: the others
    read the outbox streams directly, which a flusher would trim. A `settings` marker's
    kwargs go to its Settings (say, metrics_listen)."""
    marker = request.node.get_closest_marker("flusher")
    if marker is not None:
        # Redis is shared by the session but the ledger is this test's own: without a flush,
        # the flusher would drain other tests' leftovers (an expiry whose grant went to an
        # earlier test's ledger) into it, and a rebuild from it could not replay them.
        empty_redis(redis_url)
    extra = request.node.get_closest_marker("settings")
    app = App(
        Settings(
            listen="127.0.0.1:0",
            data_dir=tmp_path / "data",
            redis_url=redis_url,
            clock=clock,
            shutdown_grace_s=1.0,
            flusher=marker is not None,
            **(marker.kwargs if marker else {}),
            **(extra.kwargs if extra else {}),
        )
    )
    await app.start()
    yield app
    await app.stop()


@asynccontextmanager
async def another_server(first: App, data_dir: Path, **settings: Any) -> AsyncIterator[App]:
    """Another server process beside `first`, on its Redis, ledger URL and clock (and, with
    its data_dir, its SQLite ledger and config store), without a flusher unless told:
    started for the block, stopped after it."""
    s = first.settings
    options: dict[str, Any] = {
        "redis_url": s.redis_url, "ledger_url": s.ledger_url, "clock": s.clock,
        "flusher": False, "shutdown_grace_s": 1.0, **settings,
    }  # fmt: skip
    other = App(Settings(listen="127.0.0.1:0", data_dir=data_dir, **options))
    await other.start()
    try:
        yield other
    finally:
        await other.stop()


class Caller:
    """A Credits stub that sends one API key with every call."""

    def __init__(self, stub: pb_grpc.CreditsStub, key: str) -> None:
        self._stub = stub
        self.key = key
        self.metadata = (("authorization", f"Bearer {key}"),)

    def __getattr__(self, method: str) -> Any:
        rpc = getattr(self._stub, method)

        def call(request: Any, **kwargs: Any) -> Any:
            return rpc(request, metadata=self.metadata, **kwargs)

        return call


@dataclass
class Tenant:
    name: str
    admin: Caller
    meter: Caller
    read: Caller
    stub: pb_grpc.CreditsStub
    channel: grpc.aio.Channel


def add_key(store: ConfigStore, tenant: str, role: api_keys.Role) -> str:
    """Create an API key in a config store (as `creditmeter keys create` does)."""
    plaintext, rec = api_keys.generate(tenant, role, "test", int(time.time() * 1000))
    store.add_key(
        KeyRow(
            rec.key_id, rec.tenant, str(rec.role), rec.secret_hash, rec.label, rec.created_ms, None
        )
    )
    return plaintext


def tenant_keys(store: ConfigStore) -> tuple[str, dict[api_keys.Role, str]]:
    """A fresh tenant name and one key of each role for it, created in `store`."""
    name = f"t{uuid.uuid4().hex[:12]}"
    return name, {role: add_key(store, name, role) for role in api_keys.Role}


async def make_tenant(app: App) -> Tenant:
    """A fresh tenant with one key of each role, in the app's own config store."""
    assert app.live is not None
    name, keys = tenant_keys(app.live.store)
    return await tenant_of(app, name, keys)


async def tenant_of(app: App, name: str, keys: dict[api_keys.Role, str]) -> Tenant:
    """The tenant `name` on the app, calling with `keys` (which the app reloads first)."""
    assert app.live is not None
    await app.live.refresh()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = pb_grpc.CreditsStub(channel)
    return Tenant(
        name=name,
        admin=Caller(stub, keys[api_keys.Role.ADMIN]),
        meter=Caller(stub, keys[api_keys.Role.METER]),
        read=Caller(stub, keys[api_keys.Role.READ]),
        stub=stub,
        channel=channel,
    )


@pytest.fixture
async def tenant(app: App) -> AsyncIterator[Tenant]:
    t = await make_tenant(app)
    yield t
    await t.channel.close()


@pytest.fixture
async def other_tenant(app: App) -> AsyncIterator[Tenant]:
    t = await make_tenant(app)
    yield t
    await t.channel.close()


def rid() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex
