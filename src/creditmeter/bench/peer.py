"""The `peer` scenario: the deduction a team would hand-roll in PostgreSQL instead of
running creditmeter, measured with pgbench on the same machine in the same run.

A private cluster (initdb in a temporary directory, a free loopback port, fsync on,
synchronous commit) holds `accounts(id, balance)` and `ledger(request_id, ...)`, seeded
with as many accounts as the Redis scenarios spread over. pgbench runs two scripts for the
scenario's duration, each with `--peer-clients` connections and prepared statements:

- `update+insert`, the peer of issue 10: one transaction of a conditional UPDATE of the
  balance and an INSERT of a ledger row with a unique request id;
- `update`: the conditional UPDATE alone.

As root, the cluster runs as the `postgres` user (PostgreSQL refuses root), as the tests'
PostgreSQL fixture does.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from creditmeter.bench.load import latency_figures, new_histogram
from creditmeter.bench.postgres import INITIAL_DATABASE, PostgresCluster, find_bindir

SCHEMA = """
CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE ledger (
    request_id text PRIMARY KEY,
    account text NOT NULL,
    amount bigint NOT NULL,
    ts timestamptz NOT NULL DEFAULT now()
);
INSERT INTO accounts SELECT i::text, {grant} FROM generate_series(0, {accounts} - 1) AS i;
VACUUM ANALYZE;
"""

#: pgbench scripts; `:accounts` comes from -D. The request id is a fresh UUID per
#: transaction, as a client's would be (a duplicate would abort the pgbench client).
SCRIPTS = {
    "update+insert": """\\set n random(0, :accounts - 1)
BEGIN;
UPDATE accounts SET balance = balance - 1 WHERE id = :n AND balance >= 1;
INSERT INTO ledger (request_id, account, amount) VALUES (gen_random_uuid()::text, :n, 1);
END;
""",
    "update": """\\set n random(0, :accounts - 1)
UPDATE accounts SET balance = balance - 1 WHERE id = :n AND balance >= 1;
""",
}
#: The variant the issue's peer ratio is judged on.
PEER_VARIANT = "update+insert"


def _pgbench(
    cluster: PostgresCluster, name: str, accounts: int, clients: int, duration_s: float
) -> dict[str, Any]:
    script = cluster.root / f"{name.replace('+', '_')}.sql"
    script.write_text(SCRIPTS[name])
    logs = cluster.root / f"log-{name.replace('+', '_')}"
    logs.mkdir()
    cluster.psql("CHECKPOINT;")  # a run starts without the last one's dirty pages
    threads = max(1, min(clients, os.cpu_count() or 1))
    done = subprocess.run(
        [str(cluster.bindir / "pgbench"), *cluster.connection, "-n", "-M", "prepared",
         "-c", str(clients), "-j", str(threads), "-T", str(max(1, round(duration_s))),
         "-D", f"accounts={accounts}", "-f", str(script), "--log",
         f"--log-prefix={logs / 'tx'}", INITIAL_DATABASE],
        capture_output=True, text=True, timeout=duration_s + 120,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"pgbench {name} failed: {done.stderr.strip()[-500:]}")
    tps = re.search(r"^tps = ([0-9.]+)", done.stdout, re.M)
    processed = re.search(r"actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    if tps is None or processed is None:
        raise RuntimeError(f"pgbench {name} printed no figures: {done.stdout[-500:]}")
    histogram = new_histogram()
    for path in logs.iterdir():
        # Per transaction: client_id transaction_no time(us) script_no epoch epoch_us.
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                histogram.record_value(max(1, int(fields[2])))
    return {
        "variant": name,
        "status": "ok",
        "clients": clients,
        "threads": threads,
        "transactions": int(processed[1]),
        "failed": int(failed[1]) if failed else 0,
        "calls_per_s": float(tps[1]),
        "deductions_per_s": float(tps[1]),
        "latency_ms": latency_figures(histogram),
    }


def run(accounts: int, clients: int, duration_s: float, grant: int) -> dict[str, Any]:
    """Both pgbench variants on a private cluster, torn down afterwards."""
    bindir = find_bindir("pgbench")
    if bindir is None:
        return {"status": "skipped", "reason": "no PostgreSQL (apt-get install postgresql)"}
    # Under /tmp: the postgres user must be able to reach it.
    root = Path(tempfile.mkdtemp(prefix="cm-bench-pg-", dir="/tmp"))
    root.chmod(0o755)
    cluster: PostgresCluster | None = None
    try:
        cluster = PostgresCluster(bindir, root)
        cluster.start()
        cluster.psql(SCHEMA.format(accounts=int(accounts), grant=int(grant)))
        variants = [_pgbench(cluster, name, accounts, clients, duration_s) for name in SCRIPTS]
        rows = int(cluster.psql("SELECT count(*) FROM ledger;").strip())
        version = cluster.psql("SHOW server_version;").strip()
    finally:
        try:
            if cluster is not None:
                cluster.destroy()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "status": "ok",
        "postgres": version,
        "accounts": accounts,
        "clients": clients,
        "duration_s": duration_s,
        # Every committed transaction of the update+insert run left one ledger row.
        "ledger_rows": rows,
        "variants": variants,
    }
