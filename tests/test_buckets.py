"""The deployment's number of buckets (storage/deployment.py) and the leases by which
flushers share the buckets (storage/leases.py), on a real Redis."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.constants import CLUSTER_DEFAULT_BUCKETS, DEFAULT_BUCKETS
from creditmeter.storage import layout
from creditmeter.storage.deployment import BUCKETS_KEY, BucketsMismatch, resolve_buckets
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.leases import BucketLeases, lease_key
from creditmeter.storage.redis_client import cluster_seeds, connect, is_cluster_url
from creditmeter.transport.server import App, Settings
from tests.cluster import RedisClusterNodes
from tests.conftest import empty_redis, make_tenant, rid
from tests.helpers import failure

PRIVATE_REDIS_DB = 9


@pytest.fixture
def private_redis_url(redis_url: str) -> Iterator[str]:
    url = f"{redis_url.rsplit('/', 1)[0]}/{PRIVATE_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()
    layout.use_buckets(DEFAULT_BUCKETS)  # what the other tests' deployments have


@pytest.fixture
async def client(private_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(private_redis_url, decode_responses=True)
    yield c
    await c.aclose()


def test_cluster_urls() -> None:
    url = "redis+cluster://10.0.0.1:7000,[::1]:7001, node-3:7002"
    assert is_cluster_url(url) and not is_cluster_url("redis://10.0.0.1:7000")
    assert cluster_seeds(url) == [("10.0.0.1", 7000), ("::1", 7001), ("node-3", 7002)]
    with pytest.raises(ValueError, match="HOST:PORT"):
        cluster_seeds("redis+cluster://10.0.0.1")


async def test_a_new_deployment_stores_its_number_and_every_process_reads_it(
    client: aioredis.Redis, private_redis_url: str
) -> None:
    assert await resolve_buckets(client, 16) == 16
    assert await client.get(BUCKETS_KEY) == "16"
    assert layout.buckets() == 16
    assert {layout.bucket_of("t", f"a{i}") for i in range(500)} == set(range(16))
    layout.use_buckets(DEFAULT_BUCKETS)
    # Another process: no number asked, the stored one holds.
    other = connect(private_redis_url)
    try:
        assert await resolve_buckets(other) == 16
        assert layout.buckets() == 16
        # Asking an initialised deployment for another number is refused.
        with pytest.raises(BucketsMismatch, match="initialised with 16 buckets"):
            await resolve_buckets(other, 32)
    finally:
        await other.aclose()


async def test_data_of_a_release_before_the_number_was_stored_has_64(
    client: aioredis.Redis,
) -> None:
    await client.hset("cm:{b07}:t:a:a", "seq", "1")  # an account, no cm:buckets
    assert await resolve_buckets(client) == DEFAULT_BUCKETS
    assert await client.get(BUCKETS_KEY) == str(DEFAULT_BUCKETS)


async def test_bad_numbers_are_refused_before_they_are_stored(client: aioredis.Redis) -> None:
    for bad in (0, 16385):
        with pytest.raises(ValueError, match="buckets must be from 1 to 16384"):
            await resolve_buckets(client, bad)
    assert await client.get(BUCKETS_KEY) is None


async def test_a_server_on_a_deployment_of_16_buckets(
    private_redis_url: str, tmp_path: Path
) -> None:
    """A whole server with a non-default number: its flusher's groups and its backlog cover
    exactly those buckets."""
    app = App(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "d", redis_url=private_redis_url,
                       buckets=16, shutdown_grace_s=1.0))  # fmt: skip
    await app.start()
    try:
        assert layout.buckets() == 16
        assert app.redis is not None
        streams = [k async for k in app.redis.scan_iter(match="cm:{b*}:outbox")]
        assert sorted(streams) == sorted(layout.outbox_key(b) for b in range(16))
    finally:
        await app.stop()


# --- leases ---------------------------------------------------------------------------
async def rounds(*holders: BucketLeases, n: int = 3) -> None:
    for _ in range(n):
        for h in holders:
            await h.refresh()


async def test_flushers_share_the_buckets_and_take_over_a_dead_ones(
    client: aioredis.Redis,
) -> None:
    layout.use_buckets(64)
    a = BucketLeases(client, "flush", "a", lease_ms=600)
    await a.refresh()
    assert a.owned == set(range(64))  # alone: every bucket
    b = BucketLeases(client, "flush", "b", lease_ms=600)
    await rounds(b, a, b)
    assert len(a.owned) == len(b.owned) == 32 and not a.owned & b.owned
    c = BucketLeases(client, "flush", "c", lease_ms=600)
    await rounds(c, a, b, c)
    assert max(len(h.owned) for h in (a, b, c)) == 22  # at most ceil(64 / 3) each
    assert a.owned | b.owned | c.owned == set(range(64))
    assert not (a.owned & b.owned or a.owned & c.owned or b.owned & c.owned)
    # c dies: it stops renewing; once its leases and its word lapse, a and b take its buckets.
    await asyncio.sleep(0.7)
    await rounds(a, b)
    assert a.owned | b.owned == set(range(64)) and not a.owned & b.owned
    # b stops cleanly: a takes everything at once.
    await b.release_all()
    await a.refresh()
    assert a.owned == set(range(64))
    # A holder in the same name (a restart before the leases lapsed) has them again.
    again = BucketLeases(client, "flush", "a", lease_ms=600)
    await again.refresh()
    assert again.owned == set(range(64))
    assert await client.get(lease_key(5, "flush")) == "a"


# --- on a Redis Cluster ---------------------------------------------------------------
def test_a_clusters_1024_buckets_spread_evenly_over_its_primaries(
    redis_cluster: RedisClusterNodes,
) -> None:
    """The cluster default: each of 3 primaries holds within 15 % of a third of the buckets
    (the slots of their hash tags, as the cluster itself assigns them)."""
    held: Counter[int] = Counter()
    for bucket in range(CLUSTER_DEFAULT_BUCKETS):
        tag = layout.bucket_tag(bucket)
        held[redis_cluster.primary_of_slot(key_slot(tag.encode())).port] += 1
    mean = CLUSTER_DEFAULT_BUCKETS / 3
    assert len(held) == 3 and all(abs(n - mean) <= 0.15 * mean for n in held.values()), held


async def test_nothing_asks_the_cluster_for_keys_and_nothing_crosses_slots(
    redis_cluster: RedisClusterNodes, tmp_path: Path
) -> None:
    """Calls of every kind on a cluster server: no `COMMAND GETKEYS` round trip (the keys of
    FCALL and XREAD are found locally) and no command refused for crossing slots."""
    empty_redis(redis_cluster.url)
    for node in redis_cluster.primaries():
        node.client().config_resetstat()
    url = redis_cluster.url
    settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path / "d", redis_url=url,
                        flusher=True, shutdown_grace_s=1.0)  # fmt: skip
    app = App(settings)
    await app.start()
    t = await make_tenant(app)
    try:
        accounts = [f"spread{i}" for i in range(40)]
        for a in accounts:
            await t.admin.Grant(pb.GrantRequest(account_id=a, amount=10, request_id=rid()))
            await t.meter.Consume(pb.ConsumeRequest(account_id=a, feature="text", request_id=rid()))
        items = [
            pb.ConsumeRequest(account_id=a, feature="text", request_id=rid()) for a in accounts
        ]
        batch = await t.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items))
        assert {r.response.balance for r in batch.results} == {8}
        assert app.flusher is not None
        for _ in range(100):
            if not await app.flusher.backlog():
                break
            await asyncio.sleep(0.05)
        assert await app.flusher.backlog() == 0
        history = await t.read.ListTransactions(pb.ListTransactionsRequest(account_id="spread3"))
        assert len(history.transactions) == 3
    finally:
        await t.channel.close()
        await app.stop()
    stats = [node.info("commandstats") for node in redis_cluster.primaries()]
    assert sum(s.get("cmdstat_fcall", {}).get("calls", 0) for s in stats) > 0
    assert all(s.get("cmdstat_fcall", {}).get("calls", 0) > 0 for s in stats)  # every shard
    assert sum(s.get("cmdstat_command|getkeys", {}).get("calls", 0) for s in stats) == 0
    for s in stats:
        # CROSSSLOT, MOVED and the like are rejections (refused before running); the
        # failures expected are XGROUP CREATE's BUSYGROUP and FUNCTION LOAD's "already
        # exists" (FLUSHALL keeps the groups' streams gone but the library loaded).
        refused = {k: v for k, v in s.items() if int(v.get("rejected_calls", 0))}
        failed = {k: v for k, v in s.items() if int(v.get("failed_calls", 0))}
        assert not refused, refused
        assert set(failed) <= {"cmdstat_xgroup|create", "cmdstat_function|load"}, failed


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


async def test_a_hung_primary_fails_batches_unavailable_not_internal(
    failover_cluster: RedisClusterNodes, tmp_path: Path
) -> None:
    """A primary that stops answering: a cluster pipeline leaves its read timeouts in the
    commands' results rather than raising them. A batch or a lone Consume on its slots
    fails UNAVAILABLE (retry with the same request ids), never INTERNAL; once its replica
    took over, the retries succeed, each charged once."""
    empty_redis(failover_cluster.url)
    settings = Settings(listen="127.0.0.1:0", data_dir=tmp_path / "d",
                        redis_url=failover_cluster.url, shutdown_grace_s=1.0)  # fmt: skip
    app = App(settings)
    await app.start()
    t = await make_tenant(app)
    try:
        await t.admin.Grant(pb.GrantRequest(account_id="hung", amount=10, request_id=rid()))
        hung = failover_cluster.primary_for_key(AccountKeys(t.name, "hung").account_key)
        # And accounts on the other primaries: the batch goes to every node, in parallel.
        others = [a for a in (f"ok{i}" for i in range(40))
                  if failover_cluster.primary_for_key(AccountKeys(t.name, a).account_key) != hung]
        for account in others:
            await t.admin.Grant(pb.GrantRequest(account_id=account, amount=10, request_id=rid()))
        items = [pb.ConsumeRequest(account_id=a, feature="text", request_id=rid())
                 for a in ("hung", *others[:5], "hung", "hung")]  # fmt: skip
        failover_cluster.freeze(hung)
        try:
            # The other nodes' charges stand; the hung one's fail UNAVAILABLE (or, if the
            # client lost every node's connection, the whole call does).
            try:
                batch = await t.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items), timeout=20)
                outcomes = [r.error.code or 0 for r in batch.results]
                assert outcomes == [14, 0, 0, 0, 0, 0, 14, 14], batch
            except grpc.aio.AioRpcError as error:
                whole = failure(error)
                assert (whole.code, whole.reason) == (UNAVAILABLE, "BACKEND_UNAVAILABLE")
            # A lone Consume: UNAVAILABLE too, or, if the replica has taken over by now (the
            # batch waited out the 2 s read timeout), charged there; its retry in the batch
            # below replays it either way.
            try:
                await t.meter.Consume(items[0], timeout=20)
            except grpc.aio.AioRpcError as error:
                lone = failure(error)
                assert (lone.code, lone.reason) == (UNAVAILABLE, "BACKEND_UNAVAILABLE")
            failover_cluster.wait_failover(hung)
        finally:
            failover_cluster.thaw(hung)
        for _ in range(50):  # the client finds the new primary
            batch = await t.meter.ConsumeBatch(pb.ConsumeBatchRequest(items=items), timeout=20)
            if all(r.HasField("response") for r in batch.results):
                break
            await asyncio.sleep(0.2)
        # Retried with the same request ids: each charged once.
        assert [r.response.balance for r in batch.results] == [9, 9, 9, 9, 9, 9, 8, 7]
    finally:
        await t.channel.close()
        await app.stop()
