"""What `creditmeter bench` prints and writes: the figures table, the ratios to the
ceilings, the targets with an honest met/missed, the JSON file and the latency plot."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from creditmeter.constants import (
    BENCH_LATENCY_LOAD_SHARE,
    TARGET_BULK_DEDUCTIONS_PER_S,
    TARGET_BULK_SUSTAINED_S,
    TARGET_FLUSH_LAG_P99_MS,
    TARGET_LATENCY_AT_LOAD_P99_MS,
    TARGET_UNARY_SHARE_OF_EMPTY,
)

if TYPE_CHECKING:
    from creditmeter.bench.runner import Options


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results.get(name)
    return r if r and r.get("status") == "ok" else None


def _ratios(results: dict[str, Any]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    consume, empty, redis = _ok(results, "consume"), _ok(results, "empty"), _ok(results, "redis")
    if consume and empty and empty["calls_per_s"]:
        ratios["consume_vs_empty_call"] = consume["calls_per_s"] / empty["calls_per_s"]
    if redis:
        best = max(v["rps"] for v in redis["variants"])
        unpipelined = next(v["rps"] for v in redis["variants"] if v["pipeline"] == 1)
        if consume and unpipelined:
            ratios["consume_vs_redis_evalsha"] = consume["deductions_per_s"] / unpipelined
        for name in ("batch", "meter"):
            bulk = _ok(results, name)
            if bulk and best:
                ratios[f"{name}_vs_redis_evalsha_pipelined"] = bulk["deductions_per_s"] / best
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
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
        "scenarios": results,
        "ratios": ratios,
        "targets": _targets(results, ratios),
    }


def _ms(latency: dict[str, Any], key: str) -> str:
    return f"{latency[key]:.2f}" if key in latency else "-"


def show(figures: dict[str, Any], console: Console) -> None:
    table = Table(title="creditmeter bench", show_lines=False)
    for column in ("scenario", "status", "calls/s", "deductions/s", "p50 ms", "p95 ms",
                   "p99 ms", "errors", "flush lag p99", "drained"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("scenario", "errors") else "right")
    for name, r in figures["scenarios"].items():
        if name == "redis":
            drained = str(r.get("ledger", {}).get("drained", "-"))
            for v in r.get("variants", []):
                table.add_row(f"redis EVALSHA -P {v['pipeline']}", r["status"],
                              f"{v['rps']:,.0f}", f"{v['rps']:,.0f}", f"{v['p50_ms']:.2f}",
                              "-", f"{v['p99_ms']:.2f}", "", "-", drained)  # fmt: skip
            if r["status"] != "ok":
                table.add_row(
                    "redis EVALSHA", r["status"], *["-"] * 5, r.get("reason", ""), "-", ""
                )
            continue
        latency = r.get("latency_ms", {})
        ledger = r.get("ledger", {})
        lag = ledger.get("flush_lag_ms_p99")
        errors = ", ".join(f"{k} {v:,}" for k, v in sorted(r.get("errors", {}).items()))
        label = {"empty": "empty call (ceiling)"}.get(name, name)
        if name == "latency":
            label = f"latency (open loop {r.get('open_loop_rate_per_s') or 0:,.0f}/s)"
        table.add_row(
            label,
            r.get("status", "-"),
            f"{r.get('calls_per_s', 0):,.0f}",
            f"{r.get('deductions_per_s', 0):,.0f}",
            _ms(latency, "p50"),
            _ms(latency, "p95"),
            _ms(latency, "p99"),
            errors or r.get("reason", ""),
            "-" if lag is None else f"{lag:,} ms",
            str(ledger.get("drained", "-")),
        )
    console.print(table)
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

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5))
    names, rates = [], []
    for name, r in figures["scenarios"].items():
        curve = r.get("latency_ms", {}).get("curve") if r.get("status") == "ok" else None
        if curve:
            # x: 1 / (1 - percentile), so the tail (99, 99.9, 99.99) spreads out evenly.
            xs = [1 / (1 - p / 100) if p < 100 else 1e6 for p, _ in curve]
            curves.plot(xs, [ms for _, ms in curve], marker=".", label=name)
        if name == "redis":
            for v in r.get("variants", []):
                names.append(f"redis -P{v['pipeline']}")
                rates.append(v["rps"])
        elif r.get("status") == "ok":
            names.append(name)
            rates.append(r["deductions_per_s"] if name != "empty" else r["calls_per_s"])
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
    bars.set_xlabel("deductions/s (empty call: calls/s)")
    bars.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
