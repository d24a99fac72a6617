"""The Redis Cluster fixture itself: it comes up whole, spreads slots over 3 primaries, and
fails over when a primary is killed (the server's cluster tests rely on all three)."""

from __future__ import annotations

import itertools

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import MovedError

from tests.cluster import PRIMARIES, RedisClusterNodes, RedisNode

#: Generous bound on a failover with a 1000 ms node timeout: failure detection (node timeout
#: plus a gossip round to reach a majority of primaries), then the replica's election delay
#: (500 ms + up to 500 ms random + rank x 1000 ms). It takes about 2-3 s on loopback.
FAILOVER_BOUND_S = 15.0


def keys_on_distinct_primaries(cluster: RedisClusterNodes) -> dict[RedisNode, str]:
    """One key per primary, each in its own slot."""
    found: dict[RedisNode, str] = {}
    for i in itertools.count():
        key = f"k{i}"
        found.setdefault(cluster.primary_for_key(key), key)
        if len(found) == PRIMARIES:
            return found
    raise AssertionError("unreachable")


def test_cluster_comes_up(redis_cluster: RedisClusterNodes) -> None:
    print(f"\ncluster startup: {redis_cluster.startup_s:.2f} s")
    roles = redis_cluster.roles()
    assert sorted(role for _, role in roles) == ["master"] * 3 + ["slave"] * 3
    assert all(node.cluster_state() == "ok" for node, _ in roles)
    primaries = redis_cluster.primaries()
    # Each primary has its own replica, linked and in sync.
    for primary in primaries:
        (replica,) = redis_cluster.replicas_of(primary)
        replication = replica.info("replication")
        assert replication["master_port"] == primary.port
        assert replication["master_link_status"] == "up"
    # The URL's seeds are primaries, and every slot has a primary.
    seeds = redis_cluster.url.removeprefix("redis+cluster://").split(",")
    assert {f"127.0.0.1:{n.port}" for n in primaries} == set(seeds)
    assert {redis_cluster.primary_of_slot(s) for s in (0, 8191, 16383)} <= set(primaries)


def test_writes_land_on_three_primaries(redis_cluster: RedisClusterNodes) -> None:
    redis_cluster.flushall()
    keys = keys_on_distinct_primaries(redis_cluster)
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in redis_cluster.seeds],
        decode_responses=True,
    )
    try:
        slots = {client.keyslot(key) for key in keys.values()}
        for key in keys.values():
            client.set(key, f"value of {key}")
    finally:
        client.close()
    assert len(slots) == PRIMARIES
    for primary, key in keys.items():
        # On its primary alone: another primary answers MOVED, not the value.
        assert primary.client().get(key) == f"value of {key}"
        for other in set(keys) - {primary}:
            with pytest.raises(MovedError) as moved:
                other.client().get(key)
            assert moved.value.port == primary.port


def test_failover_and_rejoin(failover_cluster: RedisClusterNodes) -> None:
    cluster = failover_cluster
    primary = cluster.primary_for_key("survivor")
    primary.client().set("survivor", "1")
    # One replica has it before the kill, so the promoted one holds it.
    assert primary.client().wait(1, 1000) == 1
    (replica,) = cluster.replicas_of(primary)

    cluster.kill(primary)
    took = cluster.wait_failover(primary, timeout=FAILOVER_BOUND_S * 2)
    print(f"\nfailover after kill -9 (node timeout {cluster.node_timeout_ms} ms): {took:.2f} s")
    assert took < FAILOVER_BOUND_S
    assert replica.role() == "master"
    assert cluster.primary_for_key("survivor") is replica
    assert replica.client().get("survivor") == "1"
    assert all(node.cluster_state() == "ok" for node, _ in cluster.roles())
    replica.client().set("survivor", "2")

    cluster.restart(primary)
    assert primary.role() == "slave"
    replication = primary.info("replication")
    assert replication["master_port"] == replica.port
    assert replication["master_link_status"] == "up"
    assert cluster.replicas_of(replica) == [primary]
    # It synced from its successor: the write made while it was down is there.
    assert replica.client().wait(1, 1000) == 1
    reader = redis.Redis(port=primary.port, decode_responses=True, single_connection_client=True)
    try:
        reader.execute_command("READONLY")  # a replica answers reads only after it
        assert reader.get("survivor") == "2"
    finally:
        reader.close()


def test_frozen_primary_fails_over_and_rejoins(failover_cluster: RedisClusterNodes) -> None:
    cluster = failover_cluster
    primary = cluster.primaries()[0]
    (replica,) = cluster.replicas_of(primary)

    cluster.freeze(primary)
    took = cluster.wait_failover(primary, timeout=FAILOVER_BOUND_S * 2)
    print(f"\nfailover after SIGSTOP (node timeout {cluster.node_timeout_ms} ms): {took:.2f} s")
    assert took < FAILOVER_BOUND_S
    assert replica.role() == "master"

    # Resumed, it learns it was replaced and follows its successor.
    cluster.thaw(primary)
    assert primary.role() == "slave"
    assert primary.info("replication")["master_port"] == replica.port
