"""Fixtures: a real Redis Cluster of Debian's redis-server, 3 primaries and 3 replicas on free
loopback ports, joined by `redis-cli --cluster create`. `redis_cluster` lasts the session;
`failover_cluster` is a test's own, with a short node timeout, for tests that kill nodes (a
killed node never reaches another test).

The launcher is creditmeter.bench.cluster's (`creditmeter bench --cluster` runs the same
one); its names are re-exported here, so tests import them from tests.cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from creditmeter.bench.cluster import (
    BUS_PORT_OFFSET,
    FAILOVER_NODE_TIMEOUT_MS,
    FAILOVER_TIMEOUT_S,
    LOG_TAIL_LINES,
    MAX_CLIENT_PORT,
    POLL_S,
    PORT_ATTEMPTS,
    PRIMARIES,
    REPLICAS_PER_PRIMARY,
    SESSION_NODE_TIMEOUT_MS,
    START_TIMEOUT_S,
    ClusterStartError,
    NodeView,
    RedisClusterNodes,
    RedisNode,
    free_cluster_port,
    parse_cluster_nodes,
    running_cluster,
)

__all__ = [
    "BUS_PORT_OFFSET",
    "FAILOVER_NODE_TIMEOUT_MS",
    "FAILOVER_TIMEOUT_S",
    "LOG_TAIL_LINES",
    "MAX_CLIENT_PORT",
    "POLL_S",
    "PORT_ATTEMPTS",
    "PRIMARIES",
    "REPLICAS_PER_PRIMARY",
    "SESSION_NODE_TIMEOUT_MS",
    "START_TIMEOUT_S",
    "ClusterStartError",
    "NodeView",
    "RedisClusterNodes",
    "RedisNode",
    "failover_cluster",
    "free_cluster_port",
    "parse_cluster_nodes",
    "redis_cluster",
    "running_cluster",
]


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    """A Redis Cluster for the whole session. Tests must not kill or freeze its nodes (use
    failover_cluster) and should flushall() or use their own keys for isolation."""
    with running_cluster(SESSION_NODE_TIMEOUT_MS, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def failover_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A test's own Redis Cluster with a short node timeout, for killing nodes."""
    with running_cluster(FAILOVER_NODE_TIMEOUT_MS, tmp_path / "cluster") as cluster:
        yield cluster
