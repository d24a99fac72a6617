"""What `creditmeter bench` prints and writes: the figures table, Redis's time per
deduction beside the reference script's, memory, the PostgreSQL peer and the flusher's
drain, the ratios to the ceilings, the targets with an honest met/missed, the JSON file and
the plot."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from creditmeter.bench.peer import PEER_VARIANT
from creditmeter.constants import (
    BENCH_CLUSTER_ACCOUNTS,
    BENCH_LATENCY_LOAD_SHARE,
    TARGET_ACCOUNT_BYTES,
    TARGET_BULK_DEDUCTIONS_PER_S,
    TARGET_BULK_SUSTAINED_S,
    TARGET_BULK_VS_PEER,
    TARGET_CLUSTER_SHARE_TOLERANCE,
    TARGET_DRAIN_BACKLOG,
    TARGET_DRAIN_ENTRIES_PER_S,
    TARGET_FLUSH_LAG_P99_MS,
    TARGET_LATENCY_AT_LOAD_P99_MS,
    TARGET_LATENCY_VS_EMPTY_P99,
    TARGET_REDIS_BATCH_VS_REFERENCE,
    TARGET_REDIS_UNARY_VS_REFERENCE,
    TARGET_UNARY_SHARE_OF_EMPTY,
)

if TYPE_CHECKING:
    from creditmeter.bench.runner import Options


#: The empty call, open loop at the `latency` scenario's rate (the runner runs it with it).
LATENCY_EMPTY = "latency-empty"


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results.get(name)
    return r if r and r.get("status") == "ok" else None


def _reference_usec(results: dict[str, Any]) -> float | None:
    ref = _ok(results, "reference")
    return ref["usec_per_call"] if ref and ref.get("usec_per_call") else None


def _peer_tps(results: dict[str, Any]) -> float | None:
    r = _ok(results, "peer")
    if not r:
        return None
    variant = next(v for v in r["variants"] if v["variant"] == PEER_VARIANT)
    return float(variant["calls_per_s"]) or None


def _redis_figures(r: dict[str, Any] | None) -> dict[str, Any] | None:
    redis = (r or {}).get("redis")
    return redis if redis and redis.get("status") == "ok" else None


def _with_redis_figures(
    results: dict[str, Any],
) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, summary, Redis figures) of every scenario that has Redis figures."""
    rows = []
    for name, r in results.items():
        figures = _redis_figures(r)
        if figures is not None:
            rows.append((name, r, figures))
    return rows


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    consume, empty, redis = _ok(results, "consume"), _ok(results, "empty"), _ok(results, "redis")
    if consume and empty and empty["calls_per_s"]:
        ratios["consume_vs_empty_call"] = consume["calls_per_s"] / empty["calls_per_s"]
    check = _ok(results, "check")
    if consume and check:
        ratios.update(_compared("check", "consume", check, consume))
    latency, latency_empty = _ok(results, "latency"), _ok(results, LATENCY_EMPTY)
    if latency and latency_empty:
        p99, empty_p99 = latency["latency_ms"].get("p99"), latency_empty["latency_ms"].get("p99")
        if p99 and empty_p99:
            ratios["latency_p99_vs_empty_call_p99"] = p99 / empty_p99
    if redis:
        best = max(v["rps"] for v in redis["variants"])
        unpipelined = next(v["rps"] for v in redis["variants"] if v["pipeline"] == 1)
        if consume and unpipelined:
            ratios["consume_vs_redis_fcall"] = consume["deductions_per_s"] / unpipelined
        for name in ("batch", "meter"):
            bulk = _ok(results, name)
            if bulk and best:
                ratios[f"{name}_vs_redis_fcall_pipelined"] = bulk["deductions_per_s"] / best
    reference = _reference_usec(results)
    if reference:
        for name, r in results.items():
            figures = _redis_figures(r)
            if figures and r.get("status") == "ok":
                ratios[f"{name}_redis_us_vs_reference"] = (
                    figures["scripts_us_per_deduction"] / reference
                )
        if redis and redis.get("usec_per_call"):
            ratios["consume_script_us_vs_reference"] = redis["usec_per_call"] / reference
    http = _ok(results, "http")
    if http:
        over_grpc, over_http = http["variants"]
        # consume_http_vs_grpc (calls/s), consume_http_p50_vs_grpc, consume_http_p99_vs_grpc.
        ratios.update(_compared("consume_http", "grpc", over_http, over_grpc))
    workers = _ok(results, "workers")
    if workers and workers.get("ratio"):
        first, last = workers["variants"][0], workers["variants"][-1]
        ratios[f"consume_workers_{last['workers']}_vs_{first['workers']}"] = workers["ratio"]
    peer_tps = _peer_tps(results)
    if peer_tps:
        for name in ("consume", "batch", "meter"):
            r = _ok(results, name)
            if r:
                ratios[f"{name}_vs_peer"] = r["deductions_per_s"] / peer_tps
    ratios.update(_cluster_ratios(results))
    return ratios


def _compared(prefix: str, peer: str, r: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """`r` against `base`: calls/s, p50 and p99, each as `<prefix>[_pNN]_vs_<peer>`."""
    ratios = {}
    if base["calls_per_s"]:
        ratios[f"{prefix}_vs_{peer}"] = r["calls_per_s"] / base["calls_per_s"]
    for p in ("p50", "p99"):
        mine, theirs = r["latency_ms"].get(p), base["latency_ms"].get(p)
        if mine and theirs:
            ratios[f"{prefix}_{p}_vs_{peer}"] = mine / theirs
    return ratios


def _cluster_ratios(results: dict[str, Any]) -> dict[str, float]:
    """`bench --cluster`: each cluster scenario against its standalone peer (and the mean
    primary's deductions/s against it), and with replica acks against without."""
    cluster = results.get("cluster")
    if not cluster:
        return {}
    ratios: dict[str, float] = {}
    acked = cluster.get("replica_acks", {}).get("scenarios", {})
    for name, r in cluster.get("scenarios", {}).items():
        if r.get("status") != "ok":
            continue
        alone = _ok(results, name)
        if alone:
            ratios.update(_compared(f"cluster_{name}", "standalone", r, alone))
            per_primary = [p["deductions_per_s"] for p in r.get("per_primary", [])]
            if per_primary and alone["deductions_per_s"]:
                mean = sum(per_primary) / len(per_primary)
                ratios[f"cluster_{name}_per_primary_vs_standalone"] = (
                    mean / alone["deductions_per_s"]
                )
        with_acks = acked.get(name)
        if with_acks and with_acks.get("status") == "ok":
            ratios.update(_compared(f"cluster_{name}_replica_acks", "without", with_acks, r))
    return ratios


def _target(name: str, goal: str, value: str, verdict: str) -> dict[str, str]:
    return {"target": name, "goal": goal, "value": value, "verdict": verdict}


def _targets(results: dict[str, Any], ratios: dict[str, float]) -> list[dict[str, str]]:
    targets = []
    goal = f">= {TARGET_UNARY_SHARE_OF_EMPTY:g} x empty-call ceiling"
    if "consume_vs_empty_call" in ratios:
        ratio = ratios["consume_vs_empty_call"]
        verdict = "met" if ratio >= TARGET_UNARY_SHARE_OF_EMPTY else "missed"
        targets.append(_target("unary Consume throughput", goal, f"{ratio:.2f} x", verdict))
    else:
        targets.append(_target("unary Consume throughput", goal, "-", "not measured"))
    for name in ("batch", "meter"):
        goal = (
            f">= {TARGET_BULK_DEDUCTIONS_PER_S:,} deductions/s for {TARGET_BULK_SUSTAINED_S:g} s,"
            f" flush lag p99 < {TARGET_FLUSH_LAG_P99_MS:g} ms, backlog drained"
        )
        r = results.get(name)
        if r is None:
            targets.append(_target(f"{name} sustained", goal, "-", "not measured"))
            continue
        if r.get("status") != "ok":
            targets.append(_target(f"{name} sustained", goal, r.get("status", "-"), "missed"))
            continue
        ledger = r.get("ledger", {})
        lag = ledger.get("flush_lag_ms_p99")
        value = (
            f"{r['deductions_per_s']:,.0f}/s for {r['elapsed_s']:.0f} s, lag p99 "
            f"{'-' if lag is None else f'{lag:,} ms'}, drained {ledger.get('drained')}"
        )
        met = (
            r["deductions_per_s"] >= TARGET_BULK_DEDUCTIONS_PER_S
            and lag is not None
            and lag < TARGET_FLUSH_LAG_P99_MS
            and ledger.get("drained") is True
        )
        if r["duration_s"] < TARGET_BULK_SUSTAINED_S:
            verdict = f"not judged (run < {TARGET_BULK_SUSTAINED_S:g} s; would be " + (
                "met)" if met else "missed)"
            )
        else:
            verdict = "met" if met else "missed"
        targets.append(_target(f"{name} sustained", goal, value, verdict))
    targets.extend(_redis_targets(results, ratios))
    goal = f"p99 < {TARGET_LATENCY_AT_LOAD_P99_MS:g} ms at {BENCH_LATENCY_LOAD_SHARE:.0%} of max"
    latency = _ok(results, "latency")
    if latency and latency["latency_ms"]:
        p99 = latency["latency_ms"]["p99"]
        verdict = "met" if p99 < TARGET_LATENCY_AT_LOAD_P99_MS else "missed"
        rate = latency["open_loop_rate_per_s"]
        targets.append(
            _target("unary latency at load", goal, f"p99 {p99:.2f} ms at {rate:,.0f}/s", verdict)
        )
    else:
        status = results["latency"].get("status", "-") if "latency" in results else "-"
        verdict = "not measured" if "latency" not in results else "missed"
        targets.append(_target("unary latency at load", goal, status, verdict))
    targets.append(_latency_vs_empty(results, ratios))
    targets.extend(_other_targets(results, ratios))
    targets.extend(_cluster_targets(results))
    return targets


def _cluster_targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """`bench --cluster`: every primary's share of the deductions near the mean (none
    without a cluster run)."""
    cluster = results.get("cluster")
    if cluster is None:
        return []
    shares = cluster.get("shares", {})
    tolerance = TARGET_CLUSTER_SHARE_TOLERANCE
    title = "Redis Cluster: deductions per primary"
    goal = (
        f"every primary's share within ±{tolerance:.0%} of the mean "
        f"({BENCH_CLUSTER_ACCOUNTS:,} accounts)"
    )
    if shares.get("status") != "ok":
        return [_target(title, goal, str(shares.get("status", cluster.get("status"))), "missed")]
    value = (
        ", ".join(f"{share:.1%}" for share in shares["share"].values())
        + f" (at most {shares['max_deviation']:.1%} from the mean)"
    )
    met = bool(shares["balanced"])
    if cluster["accounts"] < BENCH_CLUSTER_ACCOUNTS:
        verdict = f"not judged (< {BENCH_CLUSTER_ACCOUNTS:,} accounts; would be " + (
            "met)" if met else "missed)"
        )
    else:
        verdict = "met" if met else "missed"
    return [_target(title, goal, value, verdict)]


def _latency_vs_empty(results: dict[str, Any], ratios: dict[str, float]) -> dict[str, str]:
    """Consume's p99 at half its maximum against the empty call's at the same rate."""
    title = "unary latency at load vs empty call"
    goal = (
        f"p99 <= {TARGET_LATENCY_VS_EMPTY_P99:g} x the empty call's p99 at the same rate "
        f"({BENCH_LATENCY_LOAD_SHARE:.0%} of Consume's max)"
    )
    ratio = ratios.get("latency_p99_vs_empty_call_p99")
    if ratio is None:
        measured = "latency" in results and LATENCY_EMPTY in results
        status = results["latency"].get("status", "-") if "latency" in results else "-"
        return _target(title, goal, status, "missed" if measured else "not measured")
    p99 = results["latency"]["latency_ms"]["p99"]
    empty_p99 = results[LATENCY_EMPTY]["latency_ms"]["p99"]
    value = f"{p99:.2f} ms vs {empty_p99:.2f} ms: {ratio:.2f} x"
    return _target(title, goal, value, "met" if ratio <= TARGET_LATENCY_VS_EMPTY_P99 else "missed")


def _not_measured(results: dict[str, Any], name: str) -> bool:
    """Whether scenario `name` did not run, or skipped (a failure is a miss)."""
    r = results.get(name)
    return r is None or r.get("status") == "skipped"


def _unmeasured(results: dict[str, Any], name: str) -> str:
    """What to show for a figure that needs scenario `name`: its status, or '-'."""
    r = results.get(name)
    if r is None:
        return "-"
    return str(r.get("reason") or r.get("status", "-"))


def _redis_targets(results: dict[str, Any], ratios: dict[str, float]) -> list[dict[str, str]]:
    """Redis time per deduction (scripts) against the reference script's."""
    targets = []
    wanted = (
        ("consume", "unary Consume", TARGET_REDIS_UNARY_VS_REFERENCE),
        ("batch", "ConsumeBatch", TARGET_REDIS_BATCH_VS_REFERENCE),
        ("meter", "Meter", TARGET_REDIS_BATCH_VS_REFERENCE),
    )
    reference = _reference_usec(results)
    for name, label, limit in wanted:
        title = f"Redis time per deduction, {label}"
        goal = f"<= {limit:g} x the reference script"
        r = results.get(name)
        ratio = ratios.get(f"{name}_redis_us_vs_reference")
        if r is None:
            targets.append(_target(title, goal, "-", "not measured"))
        elif r.get("status") != "ok":
            targets.append(_target(title, goal, r.get("status", "-"), "missed"))
        elif reference is None:
            why = f"reference {_unmeasured(results, 'reference')}"
            targets.append(_target(title, goal, why, "not measured"))
        elif ratio is None:
            why = str(r.get("redis", {}).get("reason") or r.get("redis", {}).get("status"))
            targets.append(_target(title, goal, why, "not measured"))
        else:
            us = r["redis"]["scripts_us_per_deduction"]
            value = f"{us:.1f} us vs {reference:.1f} us: {ratio:.2f} x"
            targets.append(_target(title, goal, value, "met" if ratio <= limit else "missed"))
    return targets


def _other_targets(results: dict[str, Any], ratios: dict[str, float]) -> list[dict[str, str]]:
    """Memory per account, the PostgreSQL peer and the flusher's drain rate."""
    targets = []
    title, goal = "Redis bytes per one-lot account", f"<= {TARGET_ACCOUNT_BYTES:,} B"
    mem = _ok(results, "memory")
    if mem:
        value = f"{mem['bytes_per_account']:,.0f} B ({mem['accounts']:,} accounts)"
        verdict = "met" if mem["bytes_per_account"] <= TARGET_ACCOUNT_BYTES else "missed"
        targets.append(_target(title, goal, value, verdict))
    else:
        verdict = "not measured" if _not_measured(results, "memory") else "missed"
        targets.append(_target(title, goal, _unmeasured(results, "memory"), verdict))
    peer_tps = _peer_tps(results)
    for name, label in (("batch", "ConsumeBatch"), ("meter", "Meter")):
        title = f"{label} vs the PostgreSQL peer"
        goal = f">= {TARGET_BULK_VS_PEER:g} x the peer's transactions/s"
        ratio = ratios.get(f"{name}_vs_peer")
        if ratio is None or peer_tps is None:
            missing = "peer" if peer_tps is None else name
            verdict = "not measured" if _not_measured(results, missing) else "missed"
            targets.append(_target(title, goal, f"{missing}: {_unmeasured(results, missing)}",
                                   verdict))  # fmt: skip
            continue
        value = f"{results[name]['deductions_per_s']:,.0f} vs {peer_tps:,.0f}/s: {ratio:.2f} x"
        verdict = "met" if ratio >= TARGET_BULK_VS_PEER else "missed"
        targets.append(_target(title, goal, value, verdict))
    title = "flusher drain into SQLite"
    goal = f">= {TARGET_DRAIN_ENTRIES_PER_S:,} entries/s (backlog of {TARGET_DRAIN_BACKLOG:,})"
    drain = _ok(results, "drain")
    if drain:
        rate = drain["entries_per_s"]
        value = f"{rate:,.0f}/s ({drain['outbox_entries']:,} entries)"
        met = rate >= TARGET_DRAIN_ENTRIES_PER_S
        if drain["outbox_entries"] < TARGET_DRAIN_BACKLOG:
            verdict = f"not judged (backlog < {TARGET_DRAIN_BACKLOG:,}; would be " + (
                "met)" if met else "missed)"
            )
        else:
            verdict = "met" if met else "missed"
        targets.append(_target(title, goal, value, verdict))
    else:
        verdict = "not measured" if _not_measured(results, "drain") else "missed"
        targets.append(_target(title, goal, _unmeasured(results, "drain"), verdict))
    return targets


def build(
    results: dict[str, Any], opts: Options, embedded: bool, started_at: datetime
) -> dict[str, Any]:
    """Everything the run measured, as written to JSON."""
    ratios = _ratios(results)
    return {
        "started_at": started_at.isoformat(),
        "config": {
            "server": "embedded (temporary data dir)" if embedded else opts.server,
            "processes": opts.processes,
            "concurrency": opts.concurrency,
            "channels_per_process": opts.channels,
            "duration_s": opts.duration_s,
            "batch_size": opts.batch_size,
            "accounts": opts.accounts,
            "redis_clients": opts.redis_clients,
            "memory_accounts": opts.memory_accounts,
            "peer_clients": opts.peer_clients,
            "drain_backlog": opts.drain_backlog,
            "cluster": opts.cluster,
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "scenarios": results,
        "ratios": ratios,
        "targets": _targets(results, ratios),
    }


def _ms(latency: dict[str, Any], key: str) -> str:
    return f"{latency[key]:.2f}" if key in latency else "-"


#: Scenario labels in the tables and the plot.
LABELS = {
    "empty": "empty call (ceiling)",
    "consume": "Consume",
    "check": "Check",
    "batch": "ConsumeBatch",
    "meter": "Meter",
}
#: Commands shown per scenario in the table of where Redis's time goes (JSON: all).
TOP_COMMANDS = 12


def _label(name: str, r: dict[str, Any]) -> str:
    if name == "latency":
        return f"latency (open loop {r.get('open_loop_rate_per_s') or 0:,.0f}/s)"
    if name == LATENCY_EMPTY:
        return f"empty call (open loop {r.get('open_loop_rate_per_s') or 0:,.0f}/s)"
    return LABELS.get(name, name)


def _times_reference(us: float | None, reference: float | None) -> str:
    return f"{us / reference:.2f} x" if us is not None and reference else "-"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _main_table(figures: dict[str, Any]) -> Table:
    results = figures["scenarios"]
    reference = _reference_usec(results)
    table = Table(title="creditmeter bench", show_lines=False)
    for column in ("scenario", "status", "calls/s", "deductions/s", "p50 ms", "p95 ms",
                   "p99 ms", "errors", "flush lag p99", "drained", "Redis us/deduction",
                   "x reference"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "errors") else "right")
    for name, r in results.items():
        if name in ("redis", "reference"):
            drained = str(r.get("ledger", {}).get("drained", "-"))
            title = "redis FCALL consume" if name == "redis" else "reference EVALSHA"
            variants = r.get("variants", []) if name == "redis" else [r] if "rps" in r else []
            for v in variants:
                table.add_row(f"{title} -P {v['pipeline']}", r["status"],
                              f"{v['rps']:,.0f}", f"{v['rps']:,.0f}", f"{v['p50_ms']:.2f}",
                              "-", f"{v['p99_ms']:.2f}", "", "-", drained,
                              _us(v["usec_per_call"]),
                              _times_reference(v["usec_per_call"], reference))  # fmt: skip
            if r["status"] != "ok":
                table.add_row(title, r["status"], *["-"] * 5, r.get("reason", ""),
                              *["-"] * 4)  # fmt: skip
            continue
        if name == "peer":
            for v in r.get("variants", []):
                latency = v["latency_ms"]
                table.add_row(f"peer: PostgreSQL {v['variant']} (pgbench x {v['clients']})",
                              v["status"], f"{v['calls_per_s']:,.0f}",
                              f"{v['deductions_per_s']:,.0f}", _ms(latency, "p50"),
                              _ms(latency, "p95"), _ms(latency, "p99"),
                              f"failed {v['failed']:,}" if v["failed"] else "",
                              "-", "-", "-", "-")  # fmt: skip
            if r["status"] != "ok":
                table.add_row("peer: PostgreSQL", r["status"], *["-"] * 5, r.get("reason", ""),
                              *["-"] * 4)  # fmt: skip
            continue
        if name == "workers":
            for v in r.get("variants", []):
                latency = v.get("latency_ms", {})
                lag = v.get("ledger", {}).get("flush_lag_ms_p99")
                errors = ", ".join(f"{k} {n:,}" for k, n in sorted(v.get("errors", {}).items()))
                table.add_row(f"Consume, --workers {v['workers']}", v["status"],
                              f"{v['calls_per_s']:,.0f}", f"{v['deductions_per_s']:,.0f}",
                              _ms(latency, "p50"), _ms(latency, "p95"), _ms(latency, "p99"),
                              errors, "-" if lag is None else f"{lag:,} ms",
                              str(v.get("ledger", {}).get("drained", "-")), "-", "-")  # fmt: skip
            if r["status"] != "ok" and not r.get("variants"):
                table.add_row("Consume, --workers N", r["status"], *["-"] * 5,
                              r.get("reason", ""), *["-"] * 4)  # fmt: skip
            continue
        if name == "http":
            for v in r.get("variants", []):
                if v["transport"] == "grpc":
                    continue  # the Consume row above
                latency = v.get("latency_ms", {})
                lag = v.get("ledger", {}).get("flush_lag_ms_p99")
                errors = ", ".join(f"{k} {n:,}" for k, n in sorted(v.get("errors", {}).items()))
                table.add_row("Consume over HTTP/JSON", v["status"],
                              f"{v['calls_per_s']:,.0f}", f"{v['deductions_per_s']:,.0f}",
                              _ms(latency, "p50"), _ms(latency, "p95"), _ms(latency, "p99"),
                              errors, "-" if lag is None else f"{lag:,} ms",
                              str(v.get("ledger", {}).get("drained", "-")), "-", "-")  # fmt: skip
            if r["status"] != "ok" and not r.get("variants"):
                table.add_row("Consume over HTTP/JSON", r["status"], *["-"] * 5,
                              r.get("reason", ""), *["-"] * 4)  # fmt: skip
            continue
        if name in ("memory", "drain", "cluster"):
            continue  # their own tables
        latency = r.get("latency_ms", {})
        ledger = r.get("ledger", {})
        lag = ledger.get("flush_lag_ms_p99")
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(r.get("errors", {}).items()))
        redis = _redis_figures(r)
        us = redis["scripts_us_per_deduction"] if redis else None
        table.add_row(
            _label(name, r),
            r.get("status", "-"),
            f"{r.get('calls_per_s', 0):,.0f}",
            f"{r.get('deductions_per_s', 0):,.0f}",
            _ms(latency, "p50"),
            _ms(latency, "p95"),
            _ms(latency, "p99"),
            errors or r.get("reason", ""),
            "-" if lag is None else f"{lag:,} ms",
            str(ledger.get("drained", "-")),
            _us(us),
            _times_reference(us, reference),
        )
    return table


def _redis_table(figures: dict[str, Any]) -> Table | None:
    """Redis's time per deduction, each way of counting it, beside the reference."""
    results = figures["scenarios"]
    reference = _reference_usec(results)
    rows = _with_redis_figures(results)
    if not rows:
        return None
    table = Table(
        title="Redis time per deduction (us, INFO commandstats; reference script "
        + (f"{reference:.1f} us per call)" if reference else "not measured)")
    )
    for column in ("scenario", "deductions", "scripts", "x ref", "inside scripts",
                   "Lua code", "direct", "all commands", "x ref", "Redis CPU",
                   "waiting for a CPU"):  # fmt: skip
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for name, r, f in rows:
        table.add_row(
            _label(name, r),
            f"{f['deductions']:,}",
            _us(f["scripts_us_per_deduction"]),
            _times_reference(f["scripts_us_per_deduction"], reference),
            _us(f["inside_scripts_us_per_deduction"]),
            _us(f["script_code_us_per_deduction"]),
            _us(f["direct_us_per_deduction"]),
            _us(f["all_us_per_deduction"]),
            _times_reference(f["all_us_per_deduction"], reference),
            _us(f["cpu_us_per_deduction"]),
            _us(f.get("cpu_wait_us_per_deduction")),
        )
    return table


def _commands_table(figures: dict[str, Any]) -> Table | None:
    """Where Redis's time per deduction goes, command by command."""
    results = figures["scenarios"]
    rows = _with_redis_figures(results)
    if not rows:
        return None
    table = Table(title="where Redis's time goes: us per deduction (calls per deduction)")
    table.add_column("command")
    table.add_column("runs")
    for name, r, _f in rows:
        table.add_column(_label(name, r), justify="right")
    ranked: dict[str, float] = {}
    for _name, _r, f in rows:
        for command, c in list(f["commands"].items())[:TOP_COMMANDS]:
            ranked[command] = max(ranked.get(command, 0.0), c["us_per_deduction"])
    for command in sorted(ranked, key=lambda c: -ranked[c]):
        runs = next(f["commands"][command]["runs"] for _n, _r, f in rows
                    if command in f["commands"])  # fmt: skip
        cells = []
        for _name, _r, f in rows:
            c = f["commands"].get(command)
            cells.append(
                f"{c['us_per_deduction']:.2f} ({c['calls_per_deduction']:.2f})" if c else "-"
            )
        table.add_row(command, runs, *cells)
    return table


def _other_table(figures: dict[str, Any]) -> Table | None:
    """Memory per account and the flusher's drain rate."""
    results = figures["scenarios"]
    table = Table("figure", "value", title="Redis memory and the flusher")
    mem = results.get("memory")
    if mem is not None:
        if mem.get("status") == "ok":
            by_key = ", ".join(f"{k} {v:,.0f}" for k, v in mem["sample_bytes_by_key"].items())
            table.add_row(f"Redis bytes per one-lot account ({mem['accounts']:,} accounts)",
                          f"{mem['bytes_per_account']:,.0f} B")  # fmt: skip
            table.add_row(f"  its keys (MEMORY USAGE, {mem['sample_accounts']} accounts)",
                          f"{mem['sample_bytes_per_account']:,.0f} B: {by_key}")  # fmt: skip
            encodings = ", ".join(f"{k} {v}" for k, v in mem["encodings"].items())
            table.add_row("  their encodings", encodings)
            table.add_row(f"Redis bytes per outbox entry kept ({mem['outbox_entries']:,})",
                          f"{mem['bytes_per_outbox_entry']:,.0f} B")  # fmt: skip
            table.add_row("Redis bytes per idempotency record",
                          f"{mem['bytes_per_idempotency_record']:,.0f} B")  # fmt: skip
        else:
            table.add_row("memory", str(mem.get("reason") or mem.get("status")))
    drain = results.get("drain")
    if drain is not None:
        if drain.get("status") == "ok":
            table.add_row(
                f"flusher drain into SQLite ({drain['outbox_entries']:,} entries, "
                f"{drain['buckets']} buckets)",
                f"{drain['entries_per_s']:,.0f} entries/s ({drain['seconds']:.1f} s)",
            )
            pg = drain.get("postgres", {})
            if pg.get("status") == "ok":
                table.add_row(
                    f"flusher drain into PostgreSQL {pg['postgres']} (the same backlog)",
                    f"{pg['entries_per_s']:,.0f} entries/s ({pg['seconds']:.1f} s)",
                )
            elif pg:
                table.add_row("drain into PostgreSQL", str(pg.get("reason") or pg.get("status")))
        else:
            table.add_row("drain", str(drain.get("reason") or drain.get("status")))
    cost = results.get("lua-cost")
    if cost is not None:
        if cost.get("status") == "ok":
            ratios = cost["vs_reference"]
            for script, n in cost["instructions_per_call"].items():
                ratio = f" ({ratios[script]:.2f}x the reference)" if script in ratios else ""
                table.add_row(f"instructions per call (callgrind): {script}", f"{n:,.0f}{ratio}")
        else:
            table.add_row("lua-cost", str(cost.get("reason") or cost.get("status")))
    return table if table.row_count else None


def _cluster_table(figures: dict[str, Any]) -> Table | None:
    """`bench --cluster`: each scenario on the standalone server, on the cluster and on the
    cluster with replica acks, each with its ratio to its peer."""
    results = figures["scenarios"]
    cluster = results.get("cluster")
    if cluster is None:
        return None
    ratios = figures["ratios"]
    acks = cluster["replica_acks"]["acks"]
    table = Table(
        title=f"Redis Cluster ({len(cluster['primaries'])} primaries + "
        f"{sum(len(r) for r in cluster['replicas'].values())} replicas, "
        f"{cluster['buckets']:,} buckets, appendfsync {cluster['appendfsync']}, "
        f"{cluster['accounts']:,} accounts) beside the standalone server; acks: "
        "--replica-acks, its peer the cluster without"
    )
    for column in ("scenario", "server", "status", "calls/s", "deductions/s", "p50 ms",
                   "p99 ms", "errors", "flush lag p99", "drained", "peer", "x calls/s",
                   "x p50", "x p99"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "server", "errors",
                                                              "peer") else "right")  # fmt: skip
    for name, on_cluster in cluster["scenarios"].items():
        rows = (
            ("standalone", results.get(name, {}), None, "-"),
            ("cluster", on_cluster, f"cluster_{name}", "standalone"),
            (f"cluster, acks {acks}", cluster["replica_acks"]["scenarios"].get(name, {}),
             f"cluster_{name}_replica_acks", "cluster"),
        )  # fmt: skip
        for server, r, prefix, peer in rows:
            latency, ledger = r.get("latency_ms", {}), r.get("ledger", {})
            lag = ledger.get("flush_lag_ms_p99")
            errors = ", ".join(f"{k} {v:,}" for k, v in sorted(r.get("errors", {}).items()))
            against = "without" if peer == "cluster" else peer

            def ratio(kind: str, prefix: str | None = prefix, against: str = against) -> str:
                value = ratios.get(f"{prefix}{kind}_vs_{against}") if prefix else None
                return "-" if value is None else f"{value:.2f}"

            table.add_row(
                LABELS.get(name, name), server, r.get("status", "-"),
                f"{r.get('calls_per_s', 0):,.0f}", f"{r.get('deductions_per_s', 0):,.0f}",
                _ms(latency, "p50"), _ms(latency, "p99"), errors,
                "-" if lag is None else f"{lag:,} ms", str(ledger.get("drained", "-")), peer,
                ratio(""), ratio("_p50"), ratio("_p99"),
            )  # fmt: skip
    return table


def _primaries_table(figures: dict[str, Any]) -> Table | None:
    """`bench --cluster`: per primary and scenario, its accounts, deductions, share and
    deductions/s, and Redis's time and CPU per deduction there."""
    cluster = figures["scenarios"].get("cluster")
    if cluster is None:
        return None
    table = Table(title="per primary: deductions (GetUsage of its accounts) and Redis per "
                  "deduction there (us, INFO commandstats / cpu)")  # fmt: skip
    for column in ("scenario", "primary", "accounts (keys found)", "deductions", "share",
                   "deductions/s", "Redis scripts", "Redis CPU", "waiting for a CPU",
                   "Redis CPU busy"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "primary") else "right")
    acks = cluster["replica_acks"]
    runs = [(n, "", r) for n, r in cluster["scenarios"].items()]
    runs += [(n, f", acks {acks['acks']}", r) for n, r in acks["scenarios"].items()]
    placed = cluster["accounts_per_primary"]
    for name, variant, r in runs:
        for p in r.get("per_primary", []):
            redis = p["redis"] if p["redis"].get("status") == "ok" else {}
            share = p.get("share")
            table.add_row(
                f"{LABELS.get(name, name)}{variant}", p["address"],
                f"{p['accounts']:,} ({placed[p['address']]['account_keys_found']:,})",
                f"{p['deductions']:,}", "-" if share is None else f"{share:.1%}",
                f"{p['deductions_per_s']:,.0f}", _us(redis.get("scripts_us_per_deduction")),
                _us(redis.get("cpu_us_per_deduction")),
                _us(redis.get("cpu_wait_us_per_deduction")),
                "-" if p.get("redis_cpu_busy") is None else f"{p['redis_cpu_busy']:.0%}",
            )  # fmt: skip
    return table


def _cluster_summary(figures: dict[str, Any], console: Console) -> None:
    cluster = figures["scenarios"].get("cluster")
    if cluster is None:
        return
    shares = cluster["shares"]
    if shares.get("status") != "ok":
        console.print(f"deductions per primary: {shares.get('status')}")
        return
    each = ", ".join(f"{a} {s:.1%}" for a, s in shares["share"].items())
    verdict = "yes" if shares["balanced"] else "no"
    console.print(
        f"deductions per primary over every cluster run: {each}; balanced within "
        f"±{shares['tolerance']:.0%} of the mean: {verdict} (at most "
        f"{shares['max_deviation']:.1%} from it)"
    )
    for address, log in cluster["logs"].items():
        if log.get("warning") or log.get("error") or log.get("critical"):
            console.print(f"server log ({address}): {log['error']} errors, {log['warning']} "
                          f"warnings; first: {log['first'][:1]}")  # fmt: skip


def show(figures: dict[str, Any], console: Console) -> None:
    console.print(_main_table(figures))
    extras = (_redis_table(figures), _commands_table(figures), _other_table(figures),
              _cluster_table(figures), _primaries_table(figures))  # fmt: skip
    for extra in extras:
        if extra is not None:
            console.print(extra)
    _cluster_summary(figures, console)
    for name, value in figures["ratios"].items():
        console.print(f"ratio {name.replace('_', ' ')}: {value:.2f}")
    targets = Table("target", "goal", "measured", "verdict", title="targets")
    for t in figures["targets"]:
        style = {"met": "green", "missed": "red"}.get(t["verdict"], "yellow")
        targets.add_row(t["target"], t["goal"], t["value"], f"[{style}]{t['verdict']}[/]")
    console.print(targets)
    config = figures["config"]
    console.print(
        f"{config['processes']} processes x {config['concurrency']} in flight, "
        f"{config['duration_s']:g} s per scenario, {config['cpu_count']} CPUs, load average "
        + " ".join(f"{x:.2f}" for x in config["load_average"])
    )


def write(figures: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """The JSON figures and the latency plot, named after the run's start time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(figures["started_at"]).strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(figures, indent=2))
    png_path = out_dir / f"bench-{stamp}.png"
    _plot(figures, png_path)
    return json_path, png_path


def _plot(figures: dict[str, Any], path: Path) -> None:
    import matplotlib

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font cache chatter
    matplotlib.use("Agg")  # no display: write a file
    import matplotlib.pyplot as plt

    fig, ((curves, bars), (redis_bars, memory_bars)) = plt.subplots(2, 2, figsize=(14, 10))
    results = figures["scenarios"]
    names, rates = [], []

    def curve(label: str, latency: dict[str, Any]) -> None:
        points = latency.get("curve")
        if points:
            # x: 1 / (1 - percentile), so the tail (99, 99.9, 99.99) spreads out evenly.
            xs = [1 / (1 - p / 100) if p < 100 else 1e6 for p, _ in points]
            curves.plot(xs, [ms for _, ms in points], marker=".", label=label)

    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        if name == "redis":
            for v in r["variants"]:
                names.append(f"redis consume -P{v['pipeline']}")
                rates.append(v["rps"])
        elif name == "reference":
            names.append(f"reference -P{r['pipeline']}")
            rates.append(r["rps"])
        elif name == "http":
            over_http = r["variants"][1]  # gRPC's is the consume scenario's, plotted already
            names.append("consume over HTTP/JSON")
            rates.append(over_http["deductions_per_s"])
            curve("consume over HTTP/JSON", over_http["latency_ms"])
        elif name == "workers":
            for v in r["variants"]:
                names.append(f"consume --workers {v['workers']}")
                rates.append(v["deductions_per_s"])
                curve(f"consume --workers {v['workers']}", v["latency_ms"])
        elif name == "peer":
            for v in r["variants"]:
                names.append(f"peer {v['variant']}")
                rates.append(v["deductions_per_s"])
                curve(f"peer {v['variant']}", v["latency_ms"])
        elif name == "cluster":
            acks = r["replica_acks"]
            runs = [(f"cluster {n}", v) for n, v in r["scenarios"].items()]
            runs += [(f"cluster {n} acks {acks['acks']}", v) for n, v in acks["scenarios"].items()]
            for label, v in runs:
                if v.get("status") == "ok":
                    names.append(label)
                    rates.append(v["deductions_per_s"])
                    curve(label, v["latency_ms"])
        elif "deductions_per_s" in r:
            names.append(name)
            rates.append(
                r["calls_per_s"] if name in ("empty", LATENCY_EMPTY) else r["deductions_per_s"]
            )
            curve(name, r.get("latency_ms", {}))
    curves.set_xscale("log")
    curves.set_yscale("log")
    ticks = [2, 10, 100, 1000, 10000, 100000]
    curves.set_xticks(ticks, ["50", "90", "99", "99.9", "99.99", "99.999"])
    curves.set_xlabel("percentile")
    curves.set_ylabel("latency (ms)")
    curves.set_title("latency by percentile")
    curves.grid(True, which="both", alpha=0.3)
    if curves.has_data():
        curves.legend()
    bars.barh(names, rates)
    bars.set_xlabel("deductions/s (empty call: calls/s; redis-benchmark: calls/s)")
    bars.set_title("throughput")
    _plot_redis_time(redis_bars, results)
    _plot_memory(memory_bars, results)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_redis_time(ax: Any, results: dict[str, Any]) -> None:
    """Redis us per deduction (scripts, all commands) against the reference's lines."""
    labels, scripts, everything = [], [], []
    for name, r in results.items():
        f = _redis_figures(r)
        if f is not None:
            labels.append(name)
            scripts.append(f["scripts_us_per_deduction"])
            everything.append(f["all_us_per_deduction"])
    redis = _ok(results, "redis")
    if redis and redis.get("usec_per_call"):
        labels.append("redis consume")
        scripts.append(redis["usec_per_call"])
        everything.append(redis["usec_per_call"])
    ys = list(range(len(labels)))
    ax.barh([y - 0.2 for y in ys], scripts, height=0.4, label="scripts")
    ax.barh([y + 0.2 for y in ys], everything, height=0.4, label="all commands")
    ax.set_yticks(ys, labels)
    reference = _reference_usec(results)
    if reference:
        for share, style in ((1.0, "-"), (TARGET_REDIS_BATCH_VS_REFERENCE, "--"),
                             (TARGET_REDIS_UNARY_VS_REFERENCE, ":")):  # fmt: skip
            ax.axvline(reference * share, color="black", linestyle=style,
                       label=f"{share:g} x reference ({reference * share:.1f} us)")  # fmt: skip
    ax.set_xlabel("Redis us per deduction (INFO commandstats)")
    ax.set_title("Redis time per deduction")
    if ax.has_data():
        ax.legend(loc="lower right", fontsize="small")


def _plot_memory(ax: Any, results: dict[str, Any]) -> None:
    """Redis bytes per account, outbox entry and idempotency record; the drain rate."""
    mem = _ok(results, "memory")
    if mem:
        labels = ["one-lot account", "outbox entry", "idempotency record"]
        values = [mem["bytes_per_account"], mem["bytes_per_outbox_entry"],
                  mem["bytes_per_idempotency_record"]]  # fmt: skip
        ax.barh(labels, values)
        ax.axvline(TARGET_ACCOUNT_BYTES, color="black", linestyle="--",
                   label=f"target per account ({TARGET_ACCOUNT_BYTES} B)")  # fmt: skip
        ax.legend()
    ax.set_xlabel("Redis bytes")
    title = "Redis memory"
    drain = _ok(results, "drain")
    if drain:
        title += (f"\nflusher drain into SQLite: {drain['entries_per_s']:,.0f} entries/s"
                  f" ({drain['outbox_entries']:,} entries)")  # fmt: skip
    ax.set_title(title)
