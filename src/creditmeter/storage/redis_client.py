"""Connecting to Redis: one node (`redis://`, `unix://`) or a Redis Cluster
(`redis+cluster://HOST:PORT[,HOST:PORT...]`, seed nodes), behind one client type.

A cluster is driven by redis-py's asyncio `RedisCluster`: it learns the slot map from the
seeds, routes each command by its keys' slot, follows MOVED and ASK, rediscovers the
topology after a failover, and sends a pipeline as one batch per node, in parallel. Every
command creditmeter sends keeps its keys in one slot (every key of a bucket starts with the
bucket's hash tag, see `layout`), so nothing is ever sent across slots.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from creditmeter.constants import REDIS_POOL_SIZE, REDIS_POOL_TIMEOUT_S
from creditmeter.errors import BackendUnavailable

#: The URL scheme of a Redis Cluster: the comma-separated nodes are seeds only.
CLUSTER_SCHEME = "redis+cluster"
#: Connections per cluster node. redis-py's cluster client refuses a command (rather than
#: waiting) when a node's connections are all busy, so this is well above a node's share of
#: the single-node pool: bursts queue in Redis, not fail here.
CLUSTER_CONNECTIONS_PER_NODE = 4 * REDIS_POOL_SIZE
#: Timeouts of a cluster node's connections: a dead primary is given up on this soon, and
#: the slot map fetched again, so a failover is followed within the cluster's own
#: node timeout rather than a TCP timeout.
CLUSTER_SOCKET_TIMEOUT_S = 2.0
CLUSTER_CONNECT_TIMEOUT_S = 0.5

#: redis-py retries a command that met a timeout or a lost connection, by default: a
#: script that ran, but whose reply was lost or late, would run again (a helper saw one
#: slow function run 11 times). Nothing is retried here: the caller gets UNAVAILABLE and
#: retries with its request id, which replays a change that was made.
def _no_retries() -> Retry:
    return Retry(NoBackoff(), 0)


#: A client of either kind: the commands creditmeter sends exist on both.
Client = aioredis.Redis | RedisCluster


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() == CLUSTER_SCHEME


def is_cluster_client(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The (host, port) seed nodes of a `redis+cluster://` URL; ValueError if it has none."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    seeds = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a {CLUSTER_SCHEME}:// URL lists HOST:PORT seed nodes: {url!r}")
        seeds.append((host.strip("[]"), int(port)))
    return seeds


#: Errors after which the client's slot map may be out of date: a node died or hangs, or
#: the cluster is failing over (redis-py's own list of them).
TOPOLOGY_ERRORS = RedisCluster.ERRORS_ALLOW_RETRY


class _Pipeline(ClusterPipeline):
    """redis-py's cluster pipeline, asking for a fresh slot map after a node failed it.

    redis-py does that for a single command, but for a pipeline only when it retries, and
    retries are off here: without this, every pipeline -- the charges, the flusher's reads
    -- kept going to a dead primary's address after its replica had taken over, and that
    shard never came back (tests/test_scale_out.py)."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        try:
            results = await super().execute(raise_on_error, allow_redirections)
        except TOPOLOGY_ERRORS:
            self._stale()
            raise
        if any(isinstance(r, TOPOLOGY_ERRORS) for r in results):
            self._stale()
        return results

    def _stale(self) -> None:
        # What redis-py's single commands set on a lost node: the next command, of any
        # caller, fetches the slot map first. (Its aclose() would also cut the other
        # nodes' connections, in use by calls in flight.)
        self.cluster_client._initialize = True


class Cluster(RedisCluster):
    """redis-py's cluster client, finding the keys of FCALL, XREAD and XREADGROUP in their
    arguments, as it already does for EVAL and EVALSHA. Redis flags those commands
    'movablekeys', for which redis-py otherwise asks a node (COMMAND GETKEYS) on every
    call: one extra round trip per FCALL, the hot path's every charge. Its pipelines
    follow a failover (`_Pipeline`)."""

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        # redis-py's own ClusterPipeline(...) call: its class declares an attribute that
        # mypy takes for abstract (set by a base class's __init__).
        return _Pipeline(self, transaction)  # type: ignore[abstract]

    async def _determine_slot(self, command: str, *args: Any) -> int:
        name = str(command).upper()
        keys: list[Any] = []
        if name in ("FCALL", "FCALL_RO") and len(args) >= 2:
            keys = list(args[2 : 2 + int(args[1])])
        elif name in ("XREAD", "XREADGROUP"):
            # ... STREAMS key... id...; XREADGROUP's group and consumer (GROUP g c) come
            # first and might themselves be called "streams".
            words = [a.upper() if isinstance(a, str) else a for a in args]
            first = 3 if name == "XREADGROUP" else 0
            for marker in ("STREAMS", b"STREAMS"):
                if marker in words[first:]:
                    rest = args[words.index(marker, first) + 1 :]
                    keys = list(rest[: len(rest) // 2])
                    break
        if not keys:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise RedisClusterException(f"{name} with keys in {len(slots)} slots")
        return slots.pop()


def connect(
    url: str,
    *,
    pool_size: int = REDIS_POOL_SIZE,
    pool_timeout_s: float = REDIS_POOL_TIMEOUT_S,
    single_connection: bool = False,
) -> Client:
    """A client for `url` (decoding replies as text). One node: a blocking pool of
    `pool_size` (a call waits up to `pool_timeout_s` for a free connection), or one
    connection of its own with `single_connection`. A cluster: `Cluster`."""
    if is_cluster_url(url):
        parts = urlsplit(url)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return Cluster(
            startup_nodes=[ClusterNode(host, port) for host, port in cluster_seeds(url)],
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else options.get("password"),
            decode_responses=True,
            max_connections=CLUSTER_CONNECTIONS_PER_NODE,
            socket_timeout=CLUSTER_SOCKET_TIMEOUT_S,
            socket_connect_timeout=CLUSTER_CONNECT_TIMEOUT_S,
            retry=_no_retries(),
        )
    if single_connection:
        return aioredis.Redis.from_url(
            url, decode_responses=True, single_connection_client=True, retry=_no_retries()
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        max_connections=pool_size,
        timeout=pool_timeout_s,
        retry=_no_retries(),
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it


async def primaries(client: Client) -> list[Any]:
    """The nodes that take writes: each primary of a cluster (as `target_nodes` values), or
    [None] for a single node (no target)."""
    if isinstance(client, RedisCluster):
        await client.initialize()
        return list(client.get_primaries())
    return [None]


async def on_every_primary(client: Client, *command: Any) -> list[Any]:
    """Run one command on every primary (a cluster's each, or the one node); the replies,
    or the exception of a node that refused it."""
    replies: list[Any] = []
    for node in await primaries(client):
        try:
            if node is None:
                replies.append(await client.execute_command(*command))
            else:
                replies.append(await client.execute_command(*command, target_nodes=node))
        except Exception as exc:
            replies.append(exc)
    return replies


#: What a Redis that is away (or too slow) raises, and a cluster failing over:
#: CLUSTERDOWN until a replica took over, TRYAGAIN and an uncovered slot meanwhile. Never
#: an answer to the call itself.
UNREACHABLE = (
    RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, TryAgainError,
    SlotNotCoveredError,
)  # fmt: skip


def unavailable(exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(f"redis unavailable: {exc}", {"backend": "redis"})


@asynccontextmanager
async def reachable() -> AsyncIterator[None]:
    """Report a lost Redis as UNAVAILABLE: the caller retries with the same request id,
    which is safe whether or not the script ran."""
    try:
        yield
    except UNREACHABLE as exc:
        raise unavailable(exc) from exc


def check_reachable(results: Iterable[Any]) -> None:
    """Raise UNAVAILABLE if a pipeline's results hold a lost connection or a timeout: a
    cluster pipeline (`raise_on_error=False`) leaves them there, one per command of the
    node that failed, rather than raising. Some commands of the pipeline may have run:
    a retry with the same request ids replays them."""
    for result in results:
        if isinstance(result, UNREACHABLE):
            raise unavailable(result) from result
