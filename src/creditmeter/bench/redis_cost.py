"""What Redis spends on the bench's load: its time per deduction, from INFO commandstats
between a CONFIG RESETSTAT before a scenario and the end of its drain, and the reference
script and the consume script run under redis-benchmark in the same Redis.

Redis counts a command a script runs (`redis.call`) under its own name as well as inside
the script's EVAL/EVALSHA time, so summing every command of INFO commandstats counts that
time twice. The figures here keep the two apart:

- `scripts`: EVAL, EVALSHA and FCALL (and their _RO forms): every script's whole time, the
  commands it runs included. This is what issue 10's targets judge.
- `all`: `scripts` plus every command a client sent directly (the flusher's XREADGROUP,
  the backlog checks' XINFO, ...): all the time Redis spent executing commands. A command
  name that a shipped script also calls (GET, SET, HSET, ...) is counted as a script's:
  its few direct uses (the backlog check's GETs of the flushed counters, the flusher's
  HSET of its figures, the trim's SET) are left out of `all`; the per-command table shows
  them.
- `inside_scripts`: the commands the scripts ran; `scripts` less this is the time of the
  Lua code itself (the prelude, argument handling, cjson).
- `cpu`: the main thread's CPU time (INFO cpu): all of Redis's work, reading requests and
  writing replies and the AOF too, which commandstats leaves out.

commandstats times each command by the clock, not by CPU: when more processes want to run
than there are cores (the bench's load, the server, its flusher and Redis on two cores),
a command's time includes any moment the kernel gave Redis's CPU to another process. So
for a Redis on this machine the figures also hold `cpu_wait`: how long per deduction the
main thread was ready to run but waiting for a CPU (/proc/<pid>/schedstat). A large one
means the commandstats figures are inflated by the machine, not by the scripts.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis

from creditmeter.constants import (
    BENCH_GRANT,
    BENCH_REDIS_CALIBRATION_CALLS,
    BENCH_REDIS_KEYSPACE,
    BENCH_REFERENCE_KEY_PREFIX,
    BENCH_REFERENCE_PIPELINE,
    BENCH_REFERENCE_STREAM_MAXLEN,
)

#: The commands that run a script.
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})
#: The bench's own measuring, left out of every figure.
MEASURING_COMMANDS = frozenset({"config|resetstat", "info"})
#: Command names in `redis.call('NAME', ...)` / `redis.pcall(...)` of a Lua source.
_CALLED = re.compile(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]")

#: Command name -> (calls, usec), as INFO commandstats has them.
CommandStats = dict[str, tuple[int, int]]


@cache
def reference_source() -> str:
    """The text of bench/reference.lua."""
    return (resources.files("creditmeter.bench") / "reference.lua").read_text(encoding="utf-8")


@cache
def script_called_commands() -> frozenset[str]:
    """Every command a shipped script or the reference script runs (lower case, as
    commandstats names them)."""
    folder = resources.files("creditmeter.storage") / "lua"
    sources = [f.read_text(encoding="utf-8") for f in folder.iterdir() if f.name.endswith(".lua")]
    sources.append(reference_source())
    return frozenset(name.lower() for text in sources for name in _CALLED.findall(text))


def command_stats(client: redis.Redis) -> CommandStats:
    """INFO commandstats as {command: (calls, usec)} (subcommands as `xinfo|stream`)."""
    info: dict[str, Any] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in info.items()
        if name.startswith("cmdstat_")
    }


def main_thread_cpu_s(client: redis.Redis) -> float:
    """CPU seconds Redis's main thread has used (user + system), since it started."""
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])


def redis_pid(client: redis.Redis, url: str) -> int | None:
    """The pid of the Redis at `url` when it runs on this machine (its schedstat is
    readable), else None."""
    host = urlparse(url).hostname
    if urlparse(url).scheme != "unix" and host not in ("127.0.0.1", "localhost", "::1"):
        return None
    pid = int(client.info("server")["process_id"])
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm.startswith("redis-server") else None


def sched_wait_s(pid: int) -> float | None:
    """Seconds the process's main thread has waited on a run queue (ready, no CPU)."""
    try:
        _run_ns, wait_ns, _slices = Path(f"/proc/{pid}/schedstat").read_text().split()
    except (OSError, ValueError):
        return None
    return int(wait_ns) / 1e9


def time_per_deduction(
    commands: Mapping[str, tuple[int, int]],
    cpu_s: float,
    deductions: int,
    cpu_wait_s: float | None = None,
) -> dict[str, Any]:
    """Redis's time per deduction, by the definitions of the module docstring, and each
    command's share."""
    if deductions <= 0:
        return {"status": "no deductions"}
    inside = script_called_commands()
    measured = {n: cu for n, cu in commands.items() if n not in MEASURING_COMMANDS}
    scripts = sum(u for n, (_c, u) in measured.items() if n in SCRIPT_COMMANDS)
    nested = sum(u for n, (_c, u) in measured.items() if n in inside)
    direct = sum(
        u for n, (_c, u) in measured.items() if n not in SCRIPT_COMMANDS and n not in inside
    )
    by_command = {
        name: {
            "calls": calls,
            "usec": usec,
            "calls_per_deduction": calls / deductions,
            "us_per_deduction": usec / deductions,
            "us_per_call": usec / calls if calls else 0.0,
            "runs": (
                "script" if name in SCRIPT_COMMANDS
                else "inside scripts" if name in inside else "direct"
            ),
        }
        for name, (calls, usec) in sorted(measured.items(), key=lambda kv: -kv[1][1])
    }  # fmt: skip
    return {
        "status": "ok",
        "deductions": deductions,
        "scripts_usec": scripts,
        "all_usec": scripts + direct,
        "scripts_us_per_deduction": scripts / deductions,
        "all_us_per_deduction": (scripts + direct) / deductions,
        "inside_scripts_us_per_deduction": nested / deductions,
        "script_code_us_per_deduction": max(0, scripts - nested) / deductions,
        "direct_us_per_deduction": direct / deductions,
        "cpu_us_per_deduction": cpu_s * 1e6 / deductions,
        "cpu_wait_us_per_deduction": None if cpu_wait_s is None else cpu_wait_s * 1e6 / deductions,
        "commands": by_command,
    }


class RedisMeter:
    """One scenario's Redis figures: `start` resets the statistics, `finish` reads them."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.pid = redis_pid(self.client, url)
        self._cpu_s = 0.0
        self._wait_s: float | None = None

    def _waited(self) -> float | None:
        return None if self.pid is None else sched_wait_s(self.pid)

    def start(self) -> None:
        self.client.config_resetstat()
        self._cpu_s = main_thread_cpu_s(self.client)
        self._wait_s = self._waited()

    def finish(self, deductions: int) -> dict[str, Any]:
        commands = command_stats(self.client)
        cpu_s = main_thread_cpu_s(self.client) - self._cpu_s
        waited, before = self._waited(), self._wait_s
        wait_s = None if waited is None or before is None else waited - before
        return time_per_deduction(commands, cpu_s, deductions, wait_s)

    def close(self) -> None:
        self.client.close()


# --- redis-benchmark -----------------------------------------------------------------
def redis_args(url: str) -> list[str]:
    """redis-benchmark's arguments to reach the Redis at `url`."""
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        args = ["-s", parsed.path]
    elif parsed.scheme == "redis":
        args = ["-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 6379)]
        db = parsed.path.strip("/")
        if db and db != "0":
            args += ["--dbnum", db]
    else:
        raise ValueError(f"redis-benchmark cannot reach {parsed.scheme}:// URLs")
    if parsed.password:
        args += ["-a", parsed.password]
    return args


def redis_benchmark(
    base: list[str], command: list[str], calls: int, pipeline: int
) -> dict[str, float]:
    """One redis-benchmark run of `command`: its calls/s and latency percentiles."""
    out = subprocess.run(
        [*base, "-n", str(calls), "-P", str(pipeline), "-r", str(BENCH_REDIS_KEYSPACE),
         "--csv", *command],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no figures: {out.stderr.strip()}")
    row = rows[-1]
    return {
        "rps": float(row["rps"]),
        "p50_ms": float(row["p50_latency_ms"]),
        "p99_ms": float(row["p99_latency_ms"]),
    }


def timed_script(
    client: redis.Redis, base: list[str], command: list[str], pipeline: int, duration_s: float
) -> dict[str, Any]:
    """redis-benchmark running a script call (EVALSHA or FCALL, `command`) for about
    `duration_s` (sized by a calibration run), with the script's usec_per_call from INFO
    commandstats over that run alone."""
    calibration = redis_benchmark(base, command, BENCH_REDIS_CALIBRATION_CALLS, pipeline)
    calls = max(BENCH_REDIS_CALIBRATION_CALLS, int(calibration["rps"] * duration_s))
    client.config_resetstat()
    figures = redis_benchmark(base, command, calls, pipeline)
    script_calls, usec = command_stats(client).get(command[0].lower(), (0, 0))
    return {
        "pipeline": pipeline,
        "calls": calls,
        **figures,
        # Every such call Redis ran meanwhile: redis-benchmark's, unless the server ran a
        # script of its own (an expiry sweep) at the same time.
        "script_calls": script_calls,
        "usec_per_call": usec / script_calls if script_calls else 0.0,
    }


def benchmark_binary() -> str | None:
    return shutil.which("redis-benchmark")


@dataclass(frozen=True)
class ReferenceKeys:
    """The reference script's two keys, in one slot of their own (no creditmeter key)."""

    balance: str = f"{BENCH_REFERENCE_KEY_PREFIX}:balance"
    outbox: str = f"{BENCH_REFERENCE_KEY_PREFIX}:outbox"


def reference_run(url: str, clients: int, duration_s: float) -> dict[str, Any]:
    """The reference script (bench/reference.lua) under redis-benchmark in the Redis at
    `url`, and its usec_per_call; its keys are deleted afterwards."""
    binary = benchmark_binary()
    if binary is None:
        return {"status": "skipped", "reason": "redis-benchmark not installed (redis-tools)"}
    keys = ReferenceKeys()
    client = redis.Redis.from_url(url)
    try:
        client.hset(keys.balance, "b", BENCH_GRANT)
        sha = client.script_load(reference_source())
        command = ["EVALSHA", sha, "2", keys.balance, keys.outbox, "1",
                   str(BENCH_REFERENCE_STREAM_MAXLEN)]  # fmt: skip
        base = [binary, *redis_args(url), "-c", str(clients)]
        figures = timed_script(client, base, command, BENCH_REFERENCE_PIPELINE, duration_s)
        left = int(client.hget(keys.balance, "b") or 0)
    finally:
        client.delete(keys.balance, keys.outbox)
        client.close()
    return {
        "status": "ok",
        "clients": clients,
        **figures,
        # Credits taken over the calibration and the measured run: every call charged.
        "charged": BENCH_GRANT - left,
    }
