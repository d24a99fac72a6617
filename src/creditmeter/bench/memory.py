"""The `memory` scenario: Redis bytes per account holding one lot.

On a server of its own (embedded Redis, SQLite ledger, flusher running), N accounts get
one Grant each through the server; INFO memory's used_memory is read before and after,
once the flusher has drained the grants. The outbox entries the grants wrote (kept after
the flush for balance watchers) and the idempotency records of their request ids
(expiring after 24 hours) are measured apart with MEMORY USAGE and taken out, so the
figure is the account's own keys with their share of the keyspace's tables. A sample of
accounts is also measured key by key.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import redis

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.bench.ledger import Server, create_admin_key, grant_accounts
from creditmeter.constants import (
    BENCH_DRAIN_TIMEOUT_S,
    BENCH_GRANT,
    BENCH_LEDGER_SAMPLE_S,
    BENCH_MEMORY_SAMPLE_ACCOUNTS,
)
from creditmeter.storage.embedded_redis import endpoint_file
from creditmeter.storage.layout import (
    ACCOUNT_KINDS,
    IDEMPOTENCY_KIND,
    AccountKeys,
    buckets,
    outbox_key,
)

TENANT = "bench"
PREFIX = "mem-"
#: MEMORY USAGE ... SAMPLES 0: every element, not an estimate from a sample.
ALL_SAMPLES = 0


def _memory_usage(client: redis.Redis, keys: list[str]) -> list[int]:
    """MEMORY USAGE of each key (0 for a key that does not exist)."""
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.memory_usage(key, samples=ALL_SAMPLES)
        return [int(n or 0) for n in pipe.execute()]


def _outboxes(client: redis.Redis) -> tuple[int, int]:
    """(bytes, entries ever added) of every bucket's outbox."""
    streams = [outbox_key(b) for b in range(buckets())]
    with client.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_stream(stream)
        infos = pipe.execute(raise_on_error=False)
    added = sum(int(i["entries-added"]) for i in infos if isinstance(i, dict))
    return sum(_memory_usage(client, streams)), added


#: MEMORY STATS parts of used_memory that are no account's: connections (the server's
#: pool grows while the grants run), buffers and caches.
NOT_DATA = ("clients.normal", "clients.slaves", "aof.buffer", "replication.backlog",
            "lua.caches", "functions.caches", "cluster.links")  # fmt: skip


def _used_memory(client: redis.Redis) -> tuple[int, int]:
    """(used_memory, the part of it that is no data: see NOT_DATA)."""
    stats: dict[str, Any] = client.memory_stats()
    not_data = sum(int(stats.get(name, 0)) for name in NOT_DATA)
    return int(client.info("memory")["used_memory"]), not_data


def _wait_drained(address: str, api_key: str) -> None:
    md = (("authorization", f"Bearer {api_key}"),)
    deadline = time.monotonic() + BENCH_DRAIN_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        while stub.GetLedgerStatus(pb.GetLedgerStatusRequest(), metadata=md, timeout=5).backlog:
            if time.monotonic() > deadline:
                raise RuntimeError("memory: the grants' outbox entries did not drain")
            time.sleep(BENCH_LEDGER_SAMPLE_S)


def run(accounts: int) -> dict[str, Any]:
    """Bytes per one-lot account, per outbox entry and per idempotency record."""
    with tempfile.TemporaryDirectory(prefix="cm-bench-mem-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        key = create_admin_key(data, TENANT)
        server = Server(data, None, flusher=True, backlog_cap=None)
        client = redis.Redis.from_url(endpoint_file(data).read_text().strip())
        try:
            _wait_drained(server.address, key)
            used_before, not_data_before = _used_memory(client)
            outbox_before, added_before = _outboxes(client)
            t0 = time.monotonic()
            grant_accounts(server.address, key, PREFIX, accounts, BENCH_GRANT)
            grant_s = time.monotonic() - t0
            _wait_drained(server.address, key)
            used_after, not_data_after = _used_memory(client)
            outbox_after, added_after = _outboxes(client)
            pattern = f"*:{TENANT}:{PREFIX}*:{IDEMPOTENCY_KIND}:*"
            idem_keys = [k.decode() for k in client.scan_iter(match=pattern, count=1000)]
            idem_bytes = sum(_memory_usage(client, idem_keys))
            sample = min(accounts, BENCH_MEMORY_SAMPLE_ACCOUNTS)
            by_kind = {kind: 0 for kind in ACCOUNT_KINDS}
            for i in range(sample):
                keys = AccountKeys(TENANT, f"{PREFIX}{i}")
                sizes = _memory_usage(client, [keys.key(kind) for kind in ACCOUNT_KINDS])
                for kind, size in zip(ACCOUNT_KINDS, sizes, strict=True):
                    by_kind[kind] += size
            # How Redis stores each kind of key (a listpack is compact; a value longer
            # than *-max-listpack-value turns a hash or zset into a hashtable or skiplist).
            first = AccountKeys(TENANT, f"{PREFIX}0")
            encodings = {
                kind: (client.object("encoding", first.key(kind)) or b"absent").decode()
                for kind in ACCOUNT_KINDS
            }
        finally:
            client.close()
            server.stop()
    outbox_bytes = outbox_after - outbox_before
    entries = added_after - added_before
    not_data = not_data_after - not_data_before
    account_bytes = used_after - used_before - not_data - outbox_bytes - idem_bytes
    return {
        "status": "ok",
        "accounts": accounts,
        "grants_per_s": accounts / grant_s if grant_s else 0.0,
        "used_memory_before": used_before,
        "used_memory_after": used_after,
        # Growth of connections, buffers and caches meanwhile (taken out: see NOT_DATA).
        "not_data_bytes": not_data,
        "outbox_entries": entries,
        "outbox_bytes": outbox_bytes,
        "idempotency_records": len(idem_keys),
        "idempotency_bytes": idem_bytes,
        # used_memory's growth less connections and buffers, the outbox and the
        # idempotency records, per account.
        "bytes_per_account": account_bytes / accounts,
        "bytes_per_outbox_entry": outbox_bytes / entries if entries else 0.0,
        "bytes_per_idempotency_record": idem_bytes / len(idem_keys) if idem_keys else 0.0,
        # MEMORY USAGE of each key of the sample accounts, per account (the rest of
        # bytes_per_account is the keyspace's own tables).
        "sample_accounts": sample,
        "sample_bytes_by_key": {kind: size / sample for kind, size in by_kind.items()},
        "sample_bytes_per_account": sum(by_kind.values()) / sample,
        "encodings": encodings,
    }
