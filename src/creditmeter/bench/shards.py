"""`creditmeter bench --cluster`: the throughput scenarios on a Redis Cluster beside the usual
standalone server, in one run.

It starts a cluster of 3 primaries and 3 replicas (bench/cluster.py, the same launcher as the
tests'), and runs each scenario (consume, batch, meter by default) three times, on servers
started one after the other with the same load and accounts:

1. the usual standalone server (`serve`: embedded Redis, SQLite ledger, flusher child), the
   peer every cluster figure is a ratio to;
2. `serve --redis-url redis+cluster://...` on the cluster (a new deployment: the cluster
   default of 1,024 buckets);
3. the same data directory and cluster again, with `--replica-acks 1` (every change round
   trip waits for a replica of each node it wrote to).

The cluster's nodes fsync their append-only files as the standalone server's embedded Redis
does (`always`), so the comparison is of sharding, not of durability. Per cluster scenario,
per primary: the accounts whose keys it holds, the deductions it made (the accounts'
`GetUsage.used` before and after the scenario: one credit per deduction, as the scenarios
charge), its deductions/s and Redis's time and CPU per deduction there (INFO commandstats,
INFO cpu), and each primary's share of all the deductions of the run, judged against the
issue's target of every share within 15 % of the mean.

Everything it starts -- the cluster, the servers and their data directories -- is stopped and
removed when the run ends, however it ends.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from redis.crc import key_slot
from rich.console import Console

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.bench.cluster import (
    SESSION_NODE_TIMEOUT_MS,
    RedisClusterNodes,
    RedisNode,
    running_cluster,
)
from creditmeter.bench.ledger import Server, create_admin_key, grant_accounts
from creditmeter.bench.load import LoadSpec
from creditmeter.bench.redis_cost import RedisMeter
from creditmeter.bench.runner import Options, Target, _Ledger, _scenario, run_load
from creditmeter.constants import (
    BENCH_CLUSTER_ACCOUNTS,
    BENCH_CLUSTER_APPENDFSYNC,
    BENCH_CLUSTER_REPLICA_ACKS,
    BENCH_CLUSTER_SCENARIOS,
    BENCH_SEED_IN_FLIGHT,
    TARGET_CLUSTER_SHARE_TOLERANCE,
)
from creditmeter.storage import layout
from creditmeter.storage.deployment import BUCKETS_KEY
from creditmeter.storage.embedded_redis import endpoint_file

#: The tenant of the bench's admin key (create_admin_key's).
TENANT = "bench"
#: Log levels counted in each server's log, and how many of their lines are kept.
LOG_LEVELS = ("WARNING", "ERROR", "CRITICAL")
LOG_LINES_KEPT = 5
#: Where a data directory keeps the admin key made for it (its second server reuses it).
KEY_FILE = "bench.key"


@dataclass(frozen=True)
class Placement:
    """Which primary holds each bench account's keys."""

    #: Primary address of account i (`<prefix>i`).
    owners: list[str]
    #: Account hashes each primary holds, counted by SCAN on the node itself.
    keys_found: dict[str, int]


def check_options(opts: Options) -> None:
    """Refuse what --cluster cannot do (it starts every server itself; only the load
    scenarios whose deductions are one credit each)."""
    if opts.server:
        raise SystemExit("creditmeter bench: --cluster starts its own servers (not with --server)")
    other = sorted(set(opts.scenarios) - set(BENCH_CLUSTER_SCENARIOS))
    if other:
        raise SystemExit(
            f"creditmeter bench --cluster runs {', '.join(BENCH_CLUSTER_SCENARIOS)}, not "
            + ", ".join(other)
        )


def run(opts: Options, spec: LoadSpec, console: Console) -> dict[str, Any]:
    """The standalone scenarios under their names, and under `cluster` every cluster
    figure (see the module docstring)."""
    check_options(opts)
    names = [s for s in BENCH_CLUSTER_SCENARIOS if s in opts.scenarios]
    results: dict[str, Any] = {}
    logs: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        # Removed last, once the nodes and servers in it are stopped.
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cm-bench-cluster-")))
        console.print(
            "starting a Redis Cluster (3 primaries + 3 replicas, "
            f"appendfsync {BENCH_CLUSTER_APPENDFSYNC}) and the servers in {tmp}"
        )
        cluster = stack.enter_context(
            running_cluster(
                SESSION_NODE_TIMEOUT_MS, tmp / "nodes", appendfsync=BENCH_CLUSTER_APPENDFSYNC
            )
        )
        primaries = cluster.primaries()
        replicas = {p.address: [r.address for r in cluster.replicas_of(p)] for p in primaries}

        # 1. The standalone peer, as the plain bench runs it.
        with _server(tmp / "standalone", console, "standalone", logs) as (server, key):
            grant_accounts(server.address, key, spec.account_prefix, opts.accounts)
            redis_url = endpoint_file(tmp / "standalone").read_text().strip()
            target = Target(server.address, key, True, TENANT, redis_url)
            with _ledger(target) as ledger:
                for name in names:
                    results[name] = _scenario(_on(spec, server, key), name, console, ledger,
                                              opts, target, f"{name} (standalone)")  # fmt: skip

        # 2. and 3. The cluster, without and with replica acks, on one data directory.
        data = tmp / "cluster"
        with _server(data, console, "cluster", logs, redis_url=cluster.url) as (server, key):
            grant_accounts(server.address, key, spec.account_prefix, opts.accounts)
            buckets = int(cluster.primary_for_key(BUCKETS_KEY).client().get(BUCKETS_KEY) or 0)
            placement = _placement(cluster, primaries, buckets, spec)
            plain = _cluster_runs(_on(spec, server, key), names, console, opts, placement,
                                  primaries, "cluster")  # fmt: skip
        acks = BENCH_CLUSTER_REPLICA_ACKS
        with _server(data, console, "replica_acks", logs, redis_url=cluster.url,
                     replica_acks=acks) as (server, key):  # fmt: skip
            with_acks = _cluster_runs(_on(spec, server, key), names, console, opts, placement,
                                      primaries, f"cluster, --replica-acks {acks}")  # fmt: skip

    runs = [*plain.values(), *with_acks.values()]
    results["cluster"] = {
        "status": "ok" if all(r["status"] == "ok" for r in runs) else "failed",
        "primaries": [p.address for p in primaries],
        "replicas": replicas,
        "appendfsync": BENCH_CLUSTER_APPENDFSYNC,
        "startup_s": cluster.startup_s,
        "buckets": buckets,
        "accounts": opts.accounts,
        "accounts_per_primary": {
            p.address: {
                "accounts": placement.owners.count(p.address),
                "account_keys_found": placement.keys_found[p.address],
            }
            for p in primaries
        },
        "scenarios": plain,
        "replica_acks": {"acks": acks, "scenarios": with_acks},
        "shares": shares([p.address for p in primaries], runs, placement, opts.accounts),
        "logs": logs,
    }
    return results


def _on(spec: LoadSpec, server: Server, key: str) -> LoadSpec:
    return replace(spec, address=server.address, api_key=key)


@contextlib.contextmanager
def _server(
    data: Path,
    console: Console,
    name: str,
    logs: dict[str, dict[str, Any]],
    *,
    redis_url: str | None = None,
    replica_acks: int = 0,
) -> Iterator[tuple[Server, str]]:
    """A server on `data` (made, with an admin key, if new) and its key; when it stops, what
    its log says is kept in `logs[name]`."""
    saved = data / KEY_FILE
    if saved.exists():
        key = saved.read_text()
    else:
        data.mkdir(exist_ok=True)
        key = create_admin_key(data, TENANT)
        saved.write_text(key)
    where = "embedded Redis" if redis_url is None else "the cluster"
    acks = f", --replica-acks {replica_acks}" if replica_acks else ""
    log = data / f"serve-{name}.log"
    with console.status(f"starting creditmeter serve ({where}{acks}) ..."):
        server = Server(data, None, flusher=True, backlog_cap=None, redis_url=redis_url,
                        replica_acks=replica_acks, log=log)  # fmt: skip
    try:
        yield server, key
    finally:
        server.stop()
        logs[name] = log_findings(log)


@contextlib.contextmanager
def _ledger(target: Target) -> Iterator[_Ledger]:
    ledger = _Ledger(target)
    try:
        yield ledger
    finally:
        ledger.close()


def log_findings(path: Path) -> dict[str, Any]:
    """Lines of a server's log at each of LOG_LEVELS (and tracebacks), with the first few."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"status": "missing"}
    counts = dict.fromkeys(LOG_LEVELS, 0)
    kept: list[str] = []
    for line in lines:
        words = line.split(" ", 3)
        level = words[2] if len(words) > 2 else ""
        if level in counts or line.startswith("Traceback"):
            if level in counts:
                counts[level] += 1
            if len(kept) < LOG_LINES_KEPT:
                kept.append(line[:300])
    return {"lines": len(lines), **{k.lower(): n for k, n in counts.items()}, "first": kept}


def _placement(
    cluster: RedisClusterNodes, primaries: list[RedisNode], buckets: int, spec: LoadSpec
) -> Placement:
    """The primary of each bench account (its key's slot, under the deployment's number of
    buckets), and the account hashes SCAN finds on each primary."""
    before = layout.buckets()
    layout.use_buckets(buckets)
    try:
        keys = [
            layout.AccountKeys(TENANT, f"{spec.account_prefix}{i}").account_key
            for i in range(spec.accounts)
        ]
    finally:
        layout.use_buckets(before)
    by_slot: dict[int, str] = {}
    owners = []
    for key in keys:
        slot = key_slot(key.encode())
        if slot not in by_slot:
            by_slot[slot] = cluster.primary_of_slot(slot).address
        owners.append(by_slot[slot])
    found = {
        p.address: sum(1 for _ in p.client().scan_iter(match=layout.ACCOUNT_SCAN_PATTERN,
                                                       count=1000))
        for p in primaries
    }  # fmt: skip
    return Placement(owners, found)


def account_used(address: str, api_key: str, prefix: str, count: int) -> list[int]:
    """`GetUsage.used` (credits consumed) of accounts `<prefix>0` .. `<prefix><count - 1>`."""
    md = (("authorization", f"Bearer {api_key}"),)
    used: list[int] = []
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CreditsStub(channel)
        for start in range(0, count, BENCH_SEED_IN_FLIGHT):
            futures = [
                stub.GetUsage.future(
                    pb.GetUsageRequest(account_id=f"{prefix}{i}"), metadata=md, timeout=30
                )
                for i in range(start, min(count, start + BENCH_SEED_IN_FLIGHT))
            ]
            used.extend(int(f.result().used) for f in futures)
    return used


def _cluster_runs(
    spec: LoadSpec,
    names: list[str],
    console: Console,
    opts: Options,
    placement: Placement,
    primaries: list[RedisNode],
    label: str,
) -> dict[str, dict[str, Any]]:
    target = Target(spec.address, spec.api_key, True, TENANT, None)
    runs = {}
    with _ledger(target) as ledger:
        for name in names:
            runs[name] = _cluster_scenario(replace(spec, scenario=name), console, ledger, opts,
                                           placement, primaries, f"{name} ({label})")  # fmt: skip
    return runs


def _cluster_scenario(
    spec: LoadSpec,
    console: Console,
    ledger: _Ledger,
    opts: Options,
    placement: Placement,
    primaries: list[RedisNode],
    label: str,
) -> dict[str, Any]:
    """One scenario on the cluster server, then the ledger's drain; per primary, the
    deductions it made and Redis's figures there (statistics reset before the load and read
    after the drain, as `_scenario` does on one Redis)."""
    used_before = account_used(spec.address, spec.api_key, spec.account_prefix, spec.accounts)
    meters = {p.address: RedisMeter(p.url) for p in primaries}
    try:
        for meter in meters.values():
            meter.start()
        summary = run_load(spec, label, console, ledger)
        if summary["status"] == "ok":
            with console.status(f"{label}: waiting for the ledger to catch up ..."):
                summary.setdefault("ledger", {}).update(ledger.drain(opts.drain_timeout_s))
        used_after = account_used(spec.address, spec.api_key, spec.account_prefix, spec.accounts)
        made = dict.fromkeys(meters, 0)
        for owner, before, after in zip(placement.owners, used_before, used_after, strict=True):
            made[owner] += after - before
        total = sum(made.values())
        elapsed = summary["elapsed_s"]
        per_primary = []
        for address, meter in meters.items():
            redis = meter.finish(made[address])
            rate = made[address] / elapsed if elapsed else 0.0
            per_primary.append({
                "address": address,
                "accounts": placement.owners.count(address),
                "deductions": made[address],
                "share": made[address] / total if total else None,
                "deductions_per_s": rate,
                # The share of one core the node's main thread used per second of load (its
                # CPU per deduction, the flush of the deductions included, times their rate).
                "redis_cpu_busy": (
                    redis["cpu_us_per_deduction"] * rate / 1e6 if redis["status"] == "ok" else None
                ),
                "redis": redis,
            })  # fmt: skip
    finally:
        for meter in meters.values():
            meter.close()
    summary["per_primary"] = per_primary
    #: Deductions the accounts' usage shows, to set beside what the load counted.
    summary["deductions_counted"] = total
    return summary


def shares(
    addresses: list[str], runs: list[dict[str, Any]], placement: Placement, accounts: int
) -> dict[str, Any]:
    """Each primary's share of the deductions of `runs` (and of the accounts), and whether
    every share lies within TARGET_CLUSTER_SHARE_TOLERANCE of the mean."""
    made = dict.fromkeys(addresses, 0)
    for r in runs:
        for p in r.get("per_primary", []):
            made[p["address"]] += p["deductions"]
    total = sum(made.values())
    mean = 1 / len(addresses)
    figures: dict[str, Any] = {
        "deductions": made,
        "accounts": {a: placement.owners.count(a) / max(1, accounts) for a in addresses},
        "mean": mean,
        "tolerance": TARGET_CLUSTER_SHARE_TOLERANCE,
        "judged_on_accounts": BENCH_CLUSTER_ACCOUNTS,
    }
    if not total:
        return {**figures, "status": "no deductions", "share": None, "balanced": None}
    share = {a: n / total for a, n in made.items()}
    deviation = {a: s / mean - 1 for a, s in share.items()}
    worst = max(abs(d) for d in deviation.values())
    return {
        **figures,
        "status": "ok",
        "share": share,
        "deviation_from_mean": deviation,
        "max_deviation": worst,
        "balanced": worst <= TARGET_CLUSTER_SHARE_TOLERANCE,
    }
