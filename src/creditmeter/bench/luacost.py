"""Instructions Redis executes per script call, counted by callgrind: a deterministic
figure beside the reference script, where time per call moves 30 % between runs on a
shared machine (`creditmeter bench --scenario lua-cost`; needs valgrind).

A private redis-server runs under `valgrind --tool=callgrind --instr-atstart=no`;
instrumentation is switched on around N pipelined calls of each script only, so
start-up, loading and warm-up are not counted. Everything Redis does for a call is in
the figure: reading the command, running the script and its commands, replying.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from creditmeter.constants import (
    BENCH_LUA_COST_ACCOUNTS,
    BENCH_LUA_COST_BATCH,
    BENCH_LUA_COST_CALLS,
)
from creditmeter.storage import scripts
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.limits import NO_LIMITS
from creditmeter.storage.redis_store import lot_meta

#: The reference: a minimal check-and-decrement and one XADD (what any atomic metering in
#: Redis has to do at least).
REFERENCE = (
    "local b = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0') "
    "if b < tonumber(ARGV[8]) then return 0 end "
    "redis.call('HINCRBY', KEYS[1], 'balance', -tonumber(ARGV[8])) "
    "redis.call('XADD', KEYS[3], 'MAXLEN', '~', 1000, '*', 'a', ARGV[8]) return 1"
)
_LOT = "lot_00000000000000000000000000"
_BURN_KEY = f"0050|9999999999999|1|0000000000001|{_LOT}"


@dataclass(frozen=True)
class LuaCost:
    """Instructions per call of each script, and the ratio of each to the reference."""

    per_call: dict[str, float]

    @property
    def ratios(self) -> dict[str, float]:
        ref = self.per_call["reference"]
        return {name: n / ref for name, n in self.per_call.items() if name != "reference"}


def available() -> bool:
    return all(shutil.which(b) for b in ("valgrind", "callgrind_control", "redis-server"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: A library of one function that does nothing: what FCALL itself costs.
_EMPTY_LIBRARY = (
    "#!lua name=cm_bench_empty\n"
    "redis.register_function('cm_bench_empty', function(keys, args) return 1 end)"
)


@dataclass(frozen=True)
class _Variant:
    #: EVALSHA of this script, or (None) FCALL of `function` once `library` is loaded.
    script: str | None
    with_request_id: bool
    library: str = ""
    function: str = ""
    #: Charges per call of the consume_batch function (0: one charge per call).
    batch: int = 0
    #: The accounts' credit line (_lib.lua): "" none, "line" an overdraft limit (charges
    #: still within the lots), "debt" no lots and a limit (every charge becomes debt).
    credit_line: str = ""


def _variants() -> dict[str, _Variant]:
    library = scripts.library()
    consume = scripts.function_name("consume")
    return {
        "reference": _Variant(REFERENCE, False),
        "empty script": _Variant("return 1", False),
        "empty function": _Variant(None, False, _EMPTY_LIBRARY, "cm_bench_empty"),
        "consume, no request id": _Variant(None, False, library, consume),
        "consume, request id": _Variant(None, True, library, consume),
        f"consume in batches of {BENCH_LUA_COST_BATCH}, request id, per charge": _Variant(
            None, True, library, scripts.function_name(scripts.CONSUME_BATCH),
            BENCH_LUA_COST_BATCH,
        ),
        "consume, request id, credit line": _Variant(
            None, True, library, consume, credit_line="line"
        ),
        "consume, request id, into debt": _Variant(
            None, True, library, consume, credit_line="debt"
        ),
    }


def _seed(client: redis.Redis, accounts: list[AccountKeys], credit_line: str = "") -> None:
    """One-lot accounts in the current layout (credit for every call); with a credit line
    (see _Variant), an overdraft limit as well, and for "debt" no lot at all."""
    meta = lot_meta(10**12, "manual", "", 1)
    for keys in accounts:
        fields: dict[Any, Any] = {"seq": 1}
        if credit_line != "debt":
            fields.update({"balance": 10**12, "granted": 10**12, f"m:{_LOT}": meta,
                           f"q:{_BURN_KEY}": 10**12})  # fmt: skip
        if credit_line:
            fields["od"] = 10**12
        client.hset(keys.account_key, mapping=fields)


def _count(variant: _Variant, calls: int, workdir: Path) -> float:
    out = workdir / "callgrind.out"
    port = _free_port()
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--instr-atstart=no",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        accounts = [AccountKeys("bench", f"a{i}") for i in range(BENCH_LUA_COST_ACCOUNTS)]
        _seed(client, accounts, variant.credit_line)
        if variant.script is not None:
            sha = client.script_load(variant.script)
        else:
            client.function_load(variant.library)
        now = str(int(time.time() * 1000))

        def run(n: int, tag: str) -> None:
            pipe = client.pipeline(transaction=False)
            if variant.batch:
                for start in range(0, n, variant.batch):
                    batch_keys: list[str] = []
                    argv: list[str] = []
                    for i in range(start, min(n, start + variant.batch)):
                        acct = accounts[i % len(accounts)]
                        rid = f"{tag}{i}"
                        names = acct.script_keys(rid)
                        batch_keys.extend(names[:2])
                        argv.extend((now, "f" * 32, "60", f"txn_{tag}{i}", acct.tenant,
                                     acct.account, rid, "1", "text", "1",
                                     *NO_LIMITS.argv()))  # fmt: skip
                    # All accounts in one bucket's keys: the bench Redis is no cluster.
                    head = accounts[0].script_keys("")[2:]
                    pipe.fcall(
                        variant.function, len(batch_keys) + 2, *head, *batch_keys, *argv
                    )
                pipe.execute()
                return
            for i in range(n):
                keys = accounts[i % len(accounts)]
                rid = f"{tag}{i}" if variant.with_request_id else ""
                names = keys.script_keys(rid)
                args = (now, "f" * 32 if rid else "", "60", f"txn_{tag}{i}", keys.tenant,
                        keys.account, rid, "1", "text", "1", *NO_LIMITS.argv())  # fmt: skip
                if variant.script is not None:
                    pipe.evalsha(sha, len(names), *names, *args)
                else:
                    pipe.fcall(variant.function, len(names), *names, *args)
            pipe.execute()

        run(min(calls, 200), "w")  # warm: the script compiled, the accounts' pages touched
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        run(calls, "m")
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    finally:
        client.close()
        proc.terminate()
        proc.wait(120)
    total = 0
    for path in workdir.glob("callgrind.out*"):
        for line in path.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total / calls


def measure(calls: int = BENCH_LUA_COST_CALLS) -> LuaCost:
    """Instructions per call of each script (a private redis-server per script)."""
    per_call = {}
    for name, variant in _variants().items():
        with tempfile.TemporaryDirectory(prefix="cm-lua-cost-") as tmp:
            per_call[name] = _count(variant, calls, Path(tmp))
    return LuaCost(per_call)
