"""`creditmeter bench` end to end: a short run of unary Consume and the empty-call ceiling
against the bench's own embedded server, with Redis's time per deduction beside the
reference script's; the memory, PostgreSQL peer and flusher drain figures on servers of
their own; the accounting of Redis's time; and the honesty of the target verdicts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from creditmeter.bench import postgres, report, shards
from creditmeter.bench.redis_cost import script_called_commands, time_per_deduction
from creditmeter.constants import (
    BENCH_BATCH_SIZE,
    BENCH_LUA_COST_BATCH,
    CLUSTER_DEFAULT_BUCKETS,
    TARGET_CLUSTER_SHARE_TOLERANCE,
)

ENV = {k: v for k, v in os.environ.items() if not k.startswith("CREDITMETER_")}
BENCH_TIMEOUT_S = 90
#: `bench --cluster` starts a cluster and three servers, and runs each scenario three times.
CLUSTER_BENCH_TIMEOUT_S = 240


def _ok_scenario(calls_per_s: float, **extra: Any) -> dict[str, Any]:
    return {"status": "ok", "calls_per_s": calls_per_s, "deductions_per_s": calls_per_s, **extra}


def _bench(
    tmp_path: Path, *args: str, timeout: float = BENCH_TIMEOUT_S
) -> tuple[dict[str, Any], str]:
    """Run `creditmeter bench` with `args`: its JSON figures (the plot checked) and stdout."""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "creditmeter", "bench", *args, "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=timeout, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    [json_path] = out.glob("bench-*.json")
    [png_path] = out.glob("bench-*.png")
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads(json_path.read_text()), done.stdout


def test_short_run_writes_sane_figures_and_a_plot(tmp_path: Path) -> None:
    figures, stdout = _bench(
        tmp_path, "--scenario", "consume", "--scenario", "empty", "--scenario", "check",
        "--duration", "1.5", "--processes", "1", "--concurrency", "8", "--accounts", "10",
    )  # fmt: skip

    for name in ("consume", "empty", "check"):
        r = figures["scenarios"][name]
        assert r["status"] == "ok", r
        assert r["errors"] == {}, r
        assert r["calls"] > 10
        assert 0 < r["calls_per_s"] < 1e6
        latency = r["latency_ms"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    consume = figures["scenarios"]["consume"]
    # One credit taken per call, and every event reached the ledger afterwards.
    assert consume["deductions"] == consume["calls"]
    assert consume["ledger"]["drained"] is True
    assert consume["ledger"]["samples"] > 0
    assert figures["scenarios"]["empty"]["deductions"] == 0
    # Check deducts nothing, and every check of the granted bench accounts is allowed (a
    # denial would count as an error); it is reported beside Consume.
    check = figures["scenarios"]["check"]
    assert check["deductions"] == 0
    assert figures["ratios"]["check_vs_consume"] == check["calls_per_s"] / consume["calls_per_s"]
    assert "Check" in stdout
    ratio = figures["ratios"]["consume_vs_empty_call"]
    assert ratio == consume["calls_per_s"] / figures["scenarios"]["empty"]["calls_per_s"]
    [unary] = [t for t in figures["targets"] if t["target"] == "unary Consume throughput"]
    assert unary["verdict"] == ("met" if ratio >= 0.8 else "missed")

    # Redis's time per deduction: measured by commandstats over the scenario, every
    # Consume a charge in an FCALL of the consume functions (plus the flusher's acks),
    # beside the reference script run under redis-benchmark in the same Redis.
    redis = consume["redis"]
    assert redis["status"] == "ok"
    assert redis["deductions"] == consume["deductions"]
    # Concurrent charges share a consume_batch call (one per bucket per round trip); the
    # flusher's acks and the backlog checks (64 functions every 0.2 s) are FCALLs too.
    assert redis["commands"]["fcall"]["calls"] > 0
    assert redis["commands"]["fcall"]["runs"] == "script"
    assert redis["commands"]["xadd"]["runs"] == "inside scripts"
    assert 0 < redis["scripts_us_per_deduction"] <= redis["all_us_per_deduction"]
    assert redis["scripts_us_per_deduction"] == redis["scripts_usec"] / consume["deductions"]
    assert redis["cpu_us_per_deduction"] > 0
    assert redis["cpu_wait_us_per_deduction"] is not None  # the embedded Redis is local
    reference = figures["scenarios"]["reference"]
    assert reference["status"] == "ok", reference
    assert reference["script_calls"] >= reference["calls"] > 0
    assert 0 < reference["usec_per_call"] < redis["scripts_us_per_deduction"]
    # Every reference call charged its credit (calibration and measured run).
    assert reference["charged"] >= reference["calls"]
    ratio = figures["ratios"]["consume_redis_us_vs_reference"]
    assert ratio == redis["scripts_us_per_deduction"] / reference["usec_per_call"]
    [target] = [t for t in figures["targets"] if t["target"].endswith("unary Consume")]
    assert target["verdict"] == ("met" if ratio <= 2 else "missed")
    assert "Redis time per deduction" in stdout and "where Redis's time goes" in stdout

    # Nothing the bench started is left running: no process names its data directory.
    match = re.search(r"serve \(.*\) in (\S+)", stdout)
    assert match, stdout
    assert not _processes_naming(match[1])


def test_workers_scenario_compares_one_and_two_workers(tmp_path: Path) -> None:
    figures, stdout = _bench(
        tmp_path, "--scenario", "workers", "--duration", "1.5", "--processes", "1",
        "--concurrency", "8", "--accounts", "10",
    )  # fmt: skip
    r = figures["scenarios"]["workers"]
    assert r["status"] == "ok", r
    assert [v["workers"] for v in r["variants"]] == [1, 2]
    for v in r["variants"]:
        assert v["status"] == "ok" and v["errors"] == {}, v
        assert v["calls"] > 10 and v["deductions"] == v["calls"]
        assert v["ledger"]["drained"] is True  # the one flusher drained both workers' events
    one, two = (v["calls_per_s"] for v in r["variants"])
    assert r["ratio"] == figures["ratios"]["consume_workers_2_vs_1"] == two / one
    assert "Consume, --workers 2" in stdout and "ratio consume workers 2 vs 1" in stdout
    assert not list(Path("/tmp").glob("cm-bench-workers-*"))  # each server's dir removed


def test_http_scenario_measures_consume_over_http_beside_grpc(tmp_path: Path) -> None:
    figures, stdout = _bench(
        tmp_path, "--scenario", "http", "--duration", "1.5", "--processes", "1",
        "--concurrency", "8", "--accounts", "10",
    )  # fmt: skip
    r = figures["scenarios"]["http"]
    assert r["status"] == "ok", r
    assert [v["transport"] for v in r["variants"]] == ["grpc", "http"]
    for v in r["variants"]:
        assert v["status"] == "ok" and v["errors"] == {}, v
        assert v["calls"] > 10 and v["deductions"] == v["calls"]
        assert v["ledger"]["drained"] is True
        # Every deduction is Redis's own work, whichever way it came in.
        assert v["redis"]["status"] == "ok" and v["redis"]["deductions"] == v["calls"]
    # The gRPC figure is the consume scenario's, measured in the same run.
    grpc_side, http_side = r["variants"]
    assert figures["scenarios"]["consume"]["calls"] == grpc_side["calls"]
    ratio = http_side["calls_per_s"] / grpc_side["calls_per_s"]
    assert r["ratio"] == figures["ratios"]["consume_http_vs_grpc"] == ratio
    assert "Consume over HTTP/JSON" in stdout and "ratio consume http vs grpc" in stdout


@pytest.mark.timeout(CLUSTER_BENCH_TIMEOUT_S + 30)
def test_cluster_run_beside_standalone(tmp_path: Path) -> None:
    accounts = 60
    figures, stdout = _bench(
        tmp_path, "--cluster", "--scenario", "consume", "--scenario", "batch", "--duration", "1",
        "--processes", "1", "--concurrency", "8", "--accounts", str(accounts),
        timeout=CLUSTER_BENCH_TIMEOUT_S,
    )  # fmt: skip
    scenarios = figures["scenarios"]
    # The standalone peers under their usual names, everything of the cluster apart.
    assert set(scenarios) == {"consume", "batch", "cluster"}
    cluster = scenarios["cluster"]
    assert cluster["status"] == "ok", cluster
    assert cluster["buckets"] == CLUSTER_DEFAULT_BUCKETS
    primaries = cluster["primaries"]
    assert len(primaries) == 3
    assert set(cluster["replicas"]) == set(primaries)
    assert all(len(replicas) == 1 for replicas in cluster["replicas"].values())
    nodes = [*primaries, *(r for replicas in cluster["replicas"].values() for r in replicas)]
    ports = [int(address.rsplit(":", 1)[1]) for address in nodes]
    assert len(set(ports)) == 6 and all(port < 65535 - 10000 for port in ports)
    # Where the accounts live: computed from their keys' slots, and found there by SCAN.
    placed = cluster["accounts_per_primary"]
    assert sum(p["accounts"] for p in placed.values()) == accounts
    assert all(p["account_keys_found"] == p["accounts"] > 0 for p in placed.values()), placed

    ratios = figures["ratios"]
    acked = cluster["replica_acks"]
    assert acked["acks"] == 1
    for name in ("consume", "batch"):
        alone, plain = scenarios[name], cluster["scenarios"][name]
        with_acks = acked["scenarios"][name]
        for r in (alone, plain, with_acks):
            assert r["status"] == "ok", r
            assert r["calls"] > 0 and r["ledger"]["drained"] is True
            assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert ratios[f"cluster_{name}_vs_standalone"] == (
            plain["calls_per_s"] / alone["calls_per_s"]
        )
        assert ratios[f"cluster_{name}_replica_acks_vs_without"] == (
            with_acks["calls_per_s"] / plain["calls_per_s"]
        )
        for p in ("p50", "p99"):
            assert ratios[f"cluster_{name}_replica_acks_{p}_vs_without"] == (
                with_acks["latency_ms"][p] / plain["latency_ms"][p]
            )
            assert ratios[f"cluster_{name}_{p}_vs_standalone"] == (
                plain["latency_ms"][p] / alone["latency_ms"][p]
            )
        assert alone["errors"] == plain["errors"] == {}, (alone, plain)
        # With acks, a call may be refused when its replica is late (the bench does not
        # retry); that is the only error it may meet.
        assert set(with_acks["errors"]) <= {"UNAVAILABLE"}, with_acks
        if with_acks["errors"]:
            assert "replica" in with_acks["error_details"]["UNAVAILABLE"], with_acks
        for r, waited in ((plain, False), (with_acks, True)):
            # Every deduction the load counted shows in its account's usage, on the primary
            # that holds it; a call refused for a late replica ack has charged as well.
            per_primary = r["per_primary"]
            assert [p["address"] for p in per_primary] == primaries
            items = 1 if name == "consume" else BENCH_BATCH_SIZE
            late = r["errors"].get("UNAVAILABLE", 0) * items
            assert 0 < r["deductions"] <= r["deductions_counted"] <= r["deductions"] + late
            assert sum(p["deductions"] for p in per_primary) == r["deductions_counted"]
            assert sum(p["share"] for p in per_primary) == pytest.approx(1)
            for p in per_primary:
                assert p["deductions"] > 0, per_primary
                assert p["deductions_per_s"] == p["deductions"] / r["elapsed_s"]
                assert p["redis"]["status"] == "ok" and p["redis"]["deductions"] == p["deductions"]
                assert p["redis"]["commands"]["fcall"]["calls"] > 0
                # --replica-acks 1 is in force on its server only: a WAIT per node written to.
                assert ("wait" in p["redis"]["commands"]) is waited
                assert 0 < p["redis_cpu_busy"] < 2
        mean = sum(p["deductions_per_s"] for p in plain["per_primary"]) / 3
        assert ratios[f"cluster_{name}_per_primary_vs_standalone"] == pytest.approx(
            mean / alone["deductions_per_s"]
        )

    shares = cluster["shares"]
    assert shares["status"] == "ok"
    assert sum(shares["share"].values()) == pytest.approx(1)
    assert sum(shares["accounts"].values()) == pytest.approx(1)
    runs = [*cluster["scenarios"].values(), *acked["scenarios"].values()]
    for address, made in shares["deductions"].items():
        assert made == sum(p["deductions"] for r in runs for p in r["per_primary"]
                           if p["address"] == address)  # fmt: skip
    assert shares["max_deviation"] == pytest.approx(
        max(abs(share * 3 - 1) for share in shares["share"].values())
    )
    assert shares["balanced"] == (shares["max_deviation"] <= TARGET_CLUSTER_SHARE_TOLERANCE)
    [target] = [t for t in figures["targets"] if t["target"].startswith("Redis Cluster")]
    # 60 accounts are too few to judge the balance by.
    assert target["verdict"].startswith("not judged"), target
    for log in cluster["logs"].values():
        assert log["lines"] > 0 and log["error"] == log["critical"] == 0, log
    assert "beside the standalone server" in stdout and "balanced within" in stdout

    # Everything it started is gone: the nodes, the servers and their directories.
    match = re.search(r"and the servers in (\S+)", stdout)
    assert match, stdout
    assert not Path(match[1]).exists()
    assert not _processes_naming(match[1])
    assert not [a for port in ports for a in _processes_naming(f"127.0.0.1:{port}")]


def test_cluster_shares_are_judged_against_the_mean() -> None:
    addresses = ["a", "b", "c"]
    placement = shards.Placement(["a"] * 400 + ["b"] * 300 + ["c"] * 300, {})

    def run(*made: int) -> dict[str, Any]:
        per_primary = zip(addresses, made, strict=True)
        return {"per_primary": [{"address": a, "deductions": n} for a, n in per_primary]}

    # 40 % is 20 % above the mean share: not balanced, over two runs as over one.
    lopsided = shards.shares(addresses, [run(200, 150, 150), run(200, 150, 150)], placement, 1000)
    assert lopsided["share"] == {"a": 0.4, "b": 0.3, "c": 0.3}
    assert lopsided["max_deviation"] == pytest.approx(0.2)
    assert lopsided["balanced"] is False
    assert lopsided["accounts"] == {"a": 0.4, "b": 0.3, "c": 0.3}
    even = shards.shares(addresses, [run(350, 330, 320)], placement, 1000)
    assert even["balanced"] is True and even["max_deviation"] == pytest.approx(0.05)
    assert shards.shares(addresses, [run(0, 0, 0)], placement, 1000)["balanced"] is None

    def verdict(figures: dict[str, Any], accounts: int) -> str:
        results = {"cluster": {"status": "ok", "accounts": accounts, "shares": figures}}
        [target] = report._cluster_targets(results)
        return target["verdict"]

    assert verdict(lopsided, 1000) == "missed"
    assert verdict(even, 1000) == "met"
    assert verdict(even, 999) == "not judged (< 1,000 accounts; would be met)"
    assert report._cluster_targets({}) == []


@pytest.mark.skipif(
    postgres.find_bindir("pgbench") is None, reason="PostgreSQL is not installed"
)
def test_memory_peer_and_drain_figures(tmp_path: Path) -> None:
    figures, stdout = _bench(
        tmp_path, "--scenario", "memory", "--scenario", "peer", "--scenario", "drain",
        "--duration", "1", "--accounts", "10", "--peer-clients", "4",
        "--memory-accounts", "300", "--drain-backlog", "6000",
    )  # fmt: skip
    scenarios = figures["scenarios"]
    # No Redis scenario: no reference run either.
    assert set(scenarios) == {"memory", "peer", "drain"}

    mem = scenarios["memory"]
    assert mem["status"] == "ok", mem
    assert mem["accounts"] == mem["idempotency_records"] == 300
    # One grant = one outbox entry (its event and its request record).
    assert mem["outbox_entries"] == 300
    # An account holds a few keys of a few hundred bytes: plausible, not a fixed figure.
    assert 100 < mem["bytes_per_account"] < 20_000
    assert 0 < mem["sample_bytes_per_account"] < 20_000
    assert 0 < mem["bytes_per_outbox_entry"] < 5_000
    assert 0 < mem["bytes_per_idempotency_record"] < 5_000
    [target] = [t for t in figures["targets"] if t["target"] == "Redis bytes per one-lot account"]
    assert target["verdict"] == ("met" if mem["bytes_per_account"] <= 600 else "missed")

    p = scenarios["peer"]
    assert p["status"] == "ok", p
    variants = {v["variant"]: v for v in p["variants"]}
    assert set(variants) == {"update+insert", "update"}
    for v in variants.values():
        assert v["failed"] == 0 and v["transactions"] > 0 and v["calls_per_s"] > 0
        assert 0 < v["latency_ms"]["p50"] <= v["latency_ms"]["p99"]
    # Every committed update+insert transaction left one ledger row.
    assert p["ledger_rows"] == variants["update+insert"]["transactions"]
    assert "PostgreSQL" in stdout and not list(Path("/tmp").glob("cm-bench-pg-*/data"))

    drain = scenarios["drain"]
    assert drain["status"] == "ok", drain
    assert drain["outbox_entries"] >= 6000 and drain["buckets"] == 64
    assert drain["entries_per_s"] == drain["outbox_entries"] / drain["seconds"]
    # The same backlog again, into PostgreSQL.
    pg = drain["postgres"]
    assert pg["status"] == "ok", pg
    assert pg["outbox_entries"] == drain["outbox_entries"]
    assert pg["entries_per_s"] == pg["outbox_entries"] / pg["seconds"]
    assert "drain into PostgreSQL" in stdout
    [target] = [t for t in figures["targets"] if t["target"] == "flusher drain into SQLite"]
    assert target["verdict"].startswith("not judged")  # 6,000 is no backlog of a million


def test_redis_time_counts_each_microsecond_once() -> None:
    """Redis counts a script's commands in its own time and under their names: `all`
    adds only what clients sent directly."""
    assert {"hget", "hincrby", "xadd", "xack"} <= script_called_commands()
    commands = {
        "evalsha": (10, 1000),  # 100 us per script call, its redis.calls included
        "hget": (90, 300),  # inside the scripts
        "xadd": (20, 200),  # inside the scripts
        "xreadgroup": (2, 100),  # the flusher, directly
        "config|resetstat": (1, 50),  # the bench itself
    }
    figures = time_per_deduction(commands, cpu_s=0.002, deductions=10, cpu_wait_s=0.001)
    assert figures["scripts_us_per_deduction"] == 100
    assert figures["all_us_per_deduction"] == 110
    assert figures["inside_scripts_us_per_deduction"] == 50
    assert figures["script_code_us_per_deduction"] == 50
    assert figures["cpu_us_per_deduction"] == 200
    assert figures["cpu_wait_us_per_deduction"] == 100
    assert "config|resetstat" not in figures["commands"]
    assert figures["commands"]["hget"]["calls_per_deduction"] == 9
    assert time_per_deduction(commands, 0.0, 0) == {"status": "no deductions"}


def _processes_naming(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if text in args:
            found.append(args)
    return found


def test_targets_are_judged_only_on_what_was_measured() -> None:
    results = {
        "consume": _ok_scenario(700.0, redis={"status": "ok", "scripts_us_per_deduction": 30.0}),
        "empty": _ok_scenario(1000.0),
        # Fast enough and drained, but only 10 s: the 60 s target is not judged as met.
        "batch": _ok_scenario(
            200_000.0,
            duration_s=10.0,
            elapsed_s=10.0,
            ledger={"flush_lag_ms_p99": 100, "drained": True},
            redis={"status": "ok", "scripts_us_per_deduction": 12.0},
        ),
        "meter": {"status": "unimplemented"},
        "latency": _ok_scenario(350.0, open_loop_rate_per_s=350.0, latency_ms={"p99": 5.0}),
        "latency-empty": _ok_scenario(350.0, open_loop_rate_per_s=350.0, latency_ms={"p99": 2.5}),
        "reference": {"status": "ok", "usec_per_call": 10.0},
        "memory": {"status": "ok", "bytes_per_account": 600.0, "accounts": 100},
        "peer": {"status": "skipped", "reason": "no PostgreSQL"},
        # As fast as asked, but of a backlog too small to judge.
        "drain": {"status": "ok", "entries_per_s": 150_000.0, "outbox_entries": 5_000},
    }
    ratios = report._ratios(results)
    verdicts = {t["target"]: t["verdict"] for t in report._targets(results, ratios)}
    assert ratios["consume_vs_empty_call"] == 0.7
    assert ratios["latency_p99_vs_empty_call_p99"] == 2.0
    assert ratios["consume_redis_us_vs_reference"] == 3.0
    assert ratios["batch_redis_us_vs_reference"] == 1.2
    assert "batch_vs_peer" not in ratios
    assert verdicts == {
        "unary Consume throughput": "missed",
        "batch sustained": "not judged (run < 60 s; would be met)",
        "meter sustained": "missed",
        "Redis time per deduction, unary Consume": "missed",  # 3 x, not <= 2 x
        "Redis time per deduction, ConsumeBatch": "met",  # 1.2 x is <= 1.2 x
        "Redis time per deduction, Meter": "missed",
        "unary latency at load": "missed",  # 5.0 ms is not below 5 ms
        "unary latency at load vs empty call": "met",  # 2 x is <= 2 x
        "Redis bytes per one-lot account": "met",
        "ConsumeBatch vs the PostgreSQL peer": "not measured",  # skipped: no peer figure
        "Meter vs the PostgreSQL peer": "not measured",
        "flusher drain into SQLite": "not judged (backlog < 1,000,000; would be met)",
    }

    # Without the reference, no Redis ratio and no verdict on it.
    del results["reference"]
    ratios = report._ratios(results)
    verdicts = {t["target"]: t["verdict"] for t in report._targets(results, ratios)}
    assert verdicts["Redis time per deduction, unary Consume"] == "not measured"
    # Without the empty call at the same rate, no latency ratio.
    del results["latency-empty"]
    ratios = report._ratios(results)
    verdicts = {t["target"]: t["verdict"] for t in report._targets(results, ratios)}
    assert "latency_p99_vs_empty_call_p99" not in ratios
    assert verdicts["unary latency at load vs empty call"] == "not measured"


def test_lua_cost_counts_instructions_beside_the_reference() -> None:
    """Instructions per call under callgrind: deterministic, so the order is certain (the
    empty script under the reference, the consume script far above it)."""
    from creditmeter.bench import luacost

    assert luacost.available(), "valgrind is not installed: run ./scripts/test, which installs it"
    cost = luacost.measure(calls=100)
    n = cost.per_call
    assert 0 < n["empty script"] < n["reference"] < n["consume, no request id"]
    assert 0 < n["empty function"] < n["reference"]
    assert n["consume, request id"] > n["consume, no request id"]
    # In a batch a charge costs less than alone (one FCALL for many), but not nothing.
    batched = n[f"consume in batches of {BENCH_LUA_COST_BATCH}, request id, per charge"]
    assert n["reference"] < batched < n["consume, request id"]
    assert cost.ratios["consume, request id"] == n["consume, request id"] / n["reference"]
