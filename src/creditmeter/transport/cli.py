"""The `creditmeter` command: the server, key administration, and client commands for a
person at a terminal."""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvloop
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.table import Table

from creditmeter import client as sdk
from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import packs_pb2, webhooks_pb2
from creditmeter.constants import (
    BENCH_ACCOUNTS,
    BENCH_BATCH_SIZE,
    BENCH_CHANNELS_PER_PROCESS,
    BENCH_CLUSTER_ACCOUNTS,
    BENCH_CLUSTER_REPLICA_ACKS,
    BENCH_CLUSTER_SCENARIOS,
    BENCH_CONCURRENCY,
    BENCH_DRAIN_BACKLOG,
    BENCH_DRAIN_TIMEOUT_S,
    BENCH_DURATION_S,
    BENCH_MEMORY_ACCOUNTS,
    BENCH_OUT_DIR,
    BENCH_PEER_CLIENTS,
    BENCH_REDIS_CLIENTS,
    BENCH_SCENARIOS,
    DEFAULT_BACKLOG_CAP,
    DEFAULT_DATA_DIR,
    DEFAULT_LISTEN,
    ENV_PREFIX,
    LOG_FORMATS,
    WEBHOOK_RETRY_BASE_S,
    WEBHOOK_TIMEOUT_S,
)
from creditmeter.domain import keys as api_keys
from creditmeter.domain.clock import SystemClock
from creditmeter.domain.validation import valid_tenant_id
from creditmeter.domain.webhooks import EventType
from creditmeter.errors import BackendUnavailable
from creditmeter.storage.config_store import ConfigStore, KeyRow, open_config_store
from creditmeter.storage.embedded_redis import RedisNotInstalled, RedisStartFailed
from creditmeter.storage.ledger.connection import failure_text
from creditmeter.transport import logs
from creditmeter.transport.enums import enum_pb, enum_text

# Piped output gets wide lines rather than ids folded at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

_DURATION = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _duration_s(text: str) -> int:
    """`90s`, `15m`, `12h`, `30d` -> seconds."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration like 30d, 12h, 15m, 90s: {text!r}")
    return int(match[1]) * _UNIT_S[match[2]]


def _time(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return "never"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _source(value: pb.LotSource.ValueType) -> str:
    return enum_text(pb.LotSource, value)


# --- server and key administration ---------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """One server process (`--workers 1`, or a worker of a supervisor), or the supervisor
    of `--workers N` (transport/workers.py)."""
    from creditmeter.storage.deployment import BucketsMismatch
    from creditmeter.storage.embedded_redis import die_with_parent
    from creditmeter.transport import workers
    from creditmeter.transport.server import Settings, serve
    from creditmeter.transport.webhook_worker import WebhookTimings

    if args.workers < 1:
        err_console.print("creditmeter: --workers must be at least 1")
        return 2
    if args.replica_acks < 0:
        err_console.print("creditmeter: --replica-acks must be 0 or more")
        return 2
    os.environ[f"{ENV_PREFIX}LOG_FORMAT"] = args.log_format  # for the flusher child
    worker = args.worker_index is not None
    if worker:
        die_with_parent()
        if os.getppid() != args.parent_pid:  # the supervisor died before we asked
            return 1
        logs.tag_worker(args.worker_index)
    settings = Settings(
        listen=args.listen,
        data_dir=Path(args.data_dir),
        redis_url=args.redis_url or None,
        buckets=args.buckets,
        replica_acks=args.replica_acks,
        appendfsync=args.appendfsync,
        ledger_url=args.ledger_url or None,
        flusher=args.flusher != "none",
        flusher_process=args.flusher == "process",
        backlog_cap=args.backlog_cap,
        pending_purchase_ttl_ms=args.pending_purchase_ttl * 1000,
        session_grace_s=float(args.session_grace),
        # A worker's metrics are served by its supervisor (multiprocess mode).
        metrics_listen=None if worker else args.metrics_listen or None,
        http_listen=args.http_listen or None,
        # The sweeper, closer, renewals, reconciler and webhooks: in worker 0 only.
        background_jobs=args.worker_index in (None, 0),
        webhook=WebhookTimings(
            timeout_s=args.webhook_timeout, retry_base_s=args.webhook_retry_base
        ),
    )
    if settings.http_listen is not None and args.workers == 1:
        # App imports it only for --http-listen: now, so that it is frozen below too.
        from creditmeter.transport import connect_gateway  # noqa: F401
    # What is imported by now (grpc, protobuf, redis, the server's modules) lives as long
    # as the process: frozen, the collector's full passes no longer walk it (a py-spy
    # profile under Consume load had about a tenth of the loop's time in gc).
    gc.freeze()
    try:
        if args.workers > 1:
            uvloop.run(workers.supervise(settings, args.workers))
        elif worker:
            ready = functools.partial(workers.tell_ready, args.ready_fd)
            uvloop.run(serve(settings, on_ready=ready))
        else:
            uvloop.run(serve(settings))
    except workers.WorkerFailed as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 1
    except workers.ListenFailed as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 2
    except (RedisNotInstalled, BucketsMismatch) as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 2
    except RedisStartFailed as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 2
    return 0


def _config(args: argparse.Namespace) -> ConfigStore:
    """The config store `serve` with the same --data-dir and --ledger-url uses."""
    return open_config_store(args.ledger_url or None, Path(args.data_dir))


def cmd_keys_create(args: argparse.Namespace) -> int:
    if not valid_tenant_id(args.tenant):
        err_console.print("creditmeter: --tenant must be 1-63 of a-z 0-9 _ - (starting a-z0-9)")
        return 2
    plaintext, record = api_keys.generate(
        args.tenant, api_keys.Role(args.role), args.label, SystemClock().now_ms()
    )
    with _config(args) as store:
        store.add_key(
            KeyRow(
                record.key_id,
                record.tenant,
                str(record.role),
                record.secret_hash,
                record.label,
                record.created_ms,
                None,
            )
        )
    err_console.print(
        f"created {record.role} key {record.key_id} for tenant {record.tenant}; "
        "it is shown only once:",
        highlight=False,
    )
    print(plaintext)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    table = Table("key id", "tenant", "role", "label", "created", "revoked")
    with _config(args) as store:
        rows = store.api_keys(args.tenant)
    for row in rows:
        created = datetime.fromtimestamp(row.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        revoked = (
            datetime.fromtimestamp(row.revoked_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
            if row.revoked_ms
            else ""
        )
        table.add_row(row.key_id, row.tenant, row.role, row.label, created, revoked)
    console.print(table)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _config(args) as store:
        revoked = store.revoke_key(args.key_id, SystemClock().now_ms())
    if not revoked:
        err_console.print(f"creditmeter: no live key {args.key_id}")
        return 1
    err_console.print(f"revoked {args.key_id}")
    return 0


#: serve --flusher: a child process, the server's loop, or none (run `creditmeter flush`).
FLUSHER_MODES = ("process", "inline", "none")


# --- client commands -------------------------------------------------------------------
def _client(args: argparse.Namespace) -> sdk.Client:
    """The SDK client of the command's --server, --api-key and --timeout (the deadline of
    each attempt). Mutating commands without --request-id get a new UUID from the SDK,
    kept over its retries."""
    if not args.api_key:
        raise SystemExit("creditmeter: an API key is needed: --api-key or CREDITMETER_API_KEY")
    return sdk.Client(args.server, args.api_key, timeout=args.timeout)


def _lots_table(lots: Sequence[Any]) -> Table:
    table = Table("lot", "remaining", "amount", "priority", "expires", "source", "reference")
    for lot in lots:
        table.add_row(
            lot.lot_id,
            str(lot.remaining),
            str(lot.amount),
            str(lot.priority),
            _time(lot.expires_at),
            _source(lot.source),
            lot.reference,
        )
    return table


def cmd_grant(args: argparse.Namespace) -> int:
    resp = _client(args).grant(
        args.account, args.amount, valid_for=args.expires_in, priority=args.priority,
        source=args.source, reference=args.reference, request_id=args.request_id,
    )  # fmt: skip
    console.print(f"granted {resp.lot.amount} credits to {args.account}: balance {resp.balance}")
    console.print(_lots_table([resp.lot]))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    resp = _client(args).consume(
        args.account, args.feature, quantity=args.quantity, amount=args.amount,
        request_id=args.request_id,
    )  # fmt: skip
    console.print(
        f"charged {resp.amount} credits ({resp.units} {resp.feature} units) to {args.account}: "
        f"balance {resp.balance}  [dim]{resp.transaction_id}[/dim]"
    )
    table = Table("lot", "charged")
    for charge in resp.charges:
        table.add_row(charge.lot_id, str(charge.amount))
    if resp.charges:
        console.print(table)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    resp = _client(args).check(args.account, args.feature, quantity=args.quantity,
                               amount=args.amount)  # fmt: skip
    verdict = "allowed" if resp.allowed else f"not allowed: {resp.denial.reason}"
    console.print(
        f"{args.account}: {verdict}; would cost {resp.amount} credits ({resp.units} "
        f"{resp.feature} units), balance {resp.balance}"
    )
    if not resp.allowed and resp.denial.metadata:
        console.print("  " + "  ".join(f"{k}={v}" for k, v in sorted(resp.denial.metadata.items())))
    # Exit status 0 when Consume would charge it, 1 when it would refuse (as `consume` fails).
    return 0 if resp.allowed else 1


def cmd_balance(args: argparse.Namespace) -> int:
    resp = _client(args).get_balance(args.account)
    label = "unlimited" if resp.unlimited else str(resp.balance)
    held = f" ({resp.reserved} reserved by call sessions)" if resp.reserved else ""
    line = ""
    if resp.overdraft_limit or resp.debt:
        line = f", debt {resp.debt} of an overdraft limit of {resp.overdraft_limit}"
    console.print(f"{args.account}: balance {label}{held}{line}")
    if resp.lots:
        console.print(_lots_table(resp.lots))
    return 0


def cmd_set_balance(args: argparse.Namespace) -> int:
    resp = _client(args).set_balance(
        args.account, args.amount, reset=args.reset, request_id=args.request_id
    )
    console.print(f"{args.account}: balance {resp.balance} (removed {resp.removed})")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    resp = _client(args).get_usage(args.account)
    table = Table("total", "used", "remaining", "expired", "removed", "refunded")
    table.add_row(
        *(str(v) for v in (resp.total, resp.used, resp.remaining, resp.expired, resp.removed,
                           resp.refunded))
    )  # fmt: skip
    console.print(table)
    per_feature = Table("feature", "credits", "units")
    for f in resp.features:
        per_feature.add_row(f.feature, str(f.credits), str(f.units))
    if resp.features:
        console.print(per_feature)
    if resp.limits:
        console.print(_limits_table(resp.limits, account=True))
    return 0


def cmd_rates_list(args: argparse.Namespace) -> int:
    resp = _client(args).list_rates()
    table = Table("feature", "credits/unit", "unit", "increment", "built-in")
    for r in resp.rates:
        unit = enum_text(pb.RateUnit, r.unit)
        inc = f"{r.billing_increment.seconds}s" if r.HasField("billing_increment") else ""
        table.add_row(r.feature, str(r.credits_per_unit), unit, inc, "yes" if r.builtin else "")
    console.print(table)
    return 0


def cmd_rates_set(args: argparse.Namespace) -> int:
    resp = _client(args).set_rate(
        args.feature, args.credits, unit=args.unit or None, billing_increment=args.increment,
        request_id=args.request_id,
    )  # fmt: skip
    console.print(f"{resp.rate.feature}: {resp.rate.credits_per_unit} credits per unit")
    return 0


def cmd_account_options(args: argparse.Namespace) -> int:
    resp = _client(args).set_account_options(
        args.account, unlimited=args.unlimited, time_zone=args.time_zone,
        ignore_usage_limits=args.ignore_usage_limits, request_id=args.request_id,
        overdraft_limit=args.overdraft_limit,
    )  # fmt: skip
    o = resp.options
    console.print(
        f"{args.account}: unlimited={o.unlimited} time_zone={o.time_zone or 'UTC'} "
        f"ignore_usage_limits={o.ignore_usage_limits} overdraft_limit={o.overdraft_limit}"
    )
    return 0


def _limits_table(limits: Sequence[Any], *, account: bool) -> Table:
    """Usage limits as ListUsageLimits and GetUsage answer them; for an account, with its
    usage in the current period and when that period ends."""
    columns = ["feature", "period", "limit", "unit"]
    if account:
        columns += ["used", "reserved", "remaining", "resets", "own"]
    table = Table(*columns)
    for status in limits:
        limit = status.limit
        row = [
            limit.feature,
            enum_text(pb.UsageLimitPeriod, limit.period),
            str(limit.limit),
            enum_text(pb.UsageLimitUnit, limit.unit),
        ]
        if account:
            row += [str(status.used), str(status.reserved), str(status.remaining),
                    _time(status.period_end), "yes" if status.account_override else ""]  # fmt: skip
        table.add_row(*row)
    return table


def cmd_limits_list(args: argparse.Namespace) -> int:
    resp = _client(args).list_usage_limits(args.account or "")
    if not resp.limits:
        console.print("no usage limits apply" if args.account else "no usage limits")
        return 0
    console.print(_limits_table(resp.limits, account=bool(args.account)))
    return 0


def cmd_limits_set(args: argparse.Namespace) -> int:
    resp = _client(args).set_usage_limit(
        args.feature, args.period, args.limit, unit=args.unit, account_id=args.account or "",
        request_id=args.request_id,
    )  # fmt: skip
    whose = args.account or "tenant default"
    console.print(f"{whose}: {args.feature} limited to {resp.limit.limit} {args.unit} a "
                  f"{args.period}")  # fmt: skip
    return 0


def cmd_limits_remove(args: argparse.Namespace) -> int:
    _client(args).set_usage_limit(
        args.feature, args.period, None, account_id=args.account or "",
        request_id=args.request_id,
    )  # fmt: skip
    whose = args.account or "tenant default"
    console.print(f"{whose}: no {args.period} limit on {args.feature}")
    return 0


def _recharge_line(who: str, resp: Any) -> str:
    if resp.disabled:
        return f"{who}: recharges off"
    if not resp.HasField("policy"):
        return f"{who}: no recharge policy"
    p = resp.policy
    pack = f", pending purchase of {p.pack_id}" if p.pack_id else ""
    own = " (its own)" if resp.account_override else ""
    return f"{who}: recharge below {p.threshold}{pack}{own}"


def cmd_recharge_show(args: argparse.Namespace) -> int:
    resp = _client(args).get_recharge_policy(args.account or "")
    console.print(_recharge_line(args.account or "tenant default", resp))
    return 0


def cmd_recharge_set(args: argparse.Namespace) -> int:
    resp = _client(args).set_recharge_policy(
        args.threshold, args.pack or "", account_id=args.account or "",
        request_id=args.request_id,
    )  # fmt: skip
    console.print(_recharge_line(args.account or "tenant default", resp))
    return 0


def cmd_recharge_off(args: argparse.Namespace) -> int:
    resp = _client(args).set_recharge_policy(
        None, account_id=args.account, disable=True, request_id=args.request_id
    )
    console.print(_recharge_line(args.account, resp))
    return 0


def cmd_recharge_remove(args: argparse.Namespace) -> int:
    resp = _client(args).set_recharge_policy(
        None, account_id=args.account or "", request_id=args.request_id
    )
    console.print(_recharge_line(args.account or "tenant default", resp))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    resp = _client(args).list_transactions(
        args.account, page_size=args.limit, page_token=args.page_token, kinds=args.kind,
        features=args.feature,
    )  # fmt: skip
    table = Table(
        "time", "kind", "amount", "balance", "debt", "feature", "units", "lots", "transaction"
    )
    for t in resp.transactions:
        kind = enum_text(pb.TransactionKind, t.kind)
        sign = "+" if t.kind == pb.TRANSACTION_KIND_GRANT else "-"
        lots = ", ".join(f"{c.lot_id}:{c.amount}" for c in t.lots)
        # The credit line: debt the transaction added (+) or a grant repaid (-).
        debt = " ".join(
            [f"+{t.debt_incurred}"] * bool(t.debt_incurred)
            + [f"-{t.debt_repaid}"] * bool(t.debt_repaid)
        )
        table.add_row(
            _time(t.create_time),
            kind,
            f"{sign}{t.amount}",
            str(t.balance),
            debt,
            t.feature,
            str(t.units) if t.units else "",
            lots,
            t.transaction_id,
        )
    console.print(table)
    if resp.next_page_token:
        console.print(f"more: --page-token {resp.next_page_token}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    end = datetime.now(UTC)
    start = end - timedelta(days=args.days)
    resp = _client(args).get_usage_report(
        start, end, account_id=args.account, group_by=args.by, feature=args.feature
    )
    table = Table("period", "feature", "credits", "units")
    for row in resp.rows:
        table.add_row(row.period, row.feature, str(row.credits), str(row.units))
    console.print(table)
    return 0


def cmd_ledger_status(args: argparse.Namespace) -> int:
    resp = _client(args).get_ledger_status()
    ledger = {
        pb.LEDGER_STATE_REACHABLE: "ledger reachable",
        pb.LEDGER_STATE_UNREACHABLE: f"ledger UNREACHABLE since {_time(resp.unreachable_since)}",
    }.get(resp.ledger_state, "ledger state not reported")
    console.print(
        f"{ledger}, backlog {resp.backlog} (cap {resp.backlog_cap}), flush lag "
        f"{resp.flush_lag.ToMilliseconds()} ms, {resp.events_flushed} events flushed, "
        f"{'accepting' if resp.accepting_changes else 'REFUSING'} changes"
    )
    return 0


def cmd_bench_ledger(args: argparse.Namespace) -> int:
    from creditmeter.bench.ledger import run

    return run(
        args.seconds, args.processes, args.concurrency, args.ledger_url, args.json, args.backlog
    )


def cmd_bench(args: argparse.Namespace) -> int:
    from creditmeter.bench.runner import SCENARIOS, Options, run

    default_scenarios = BENCH_CLUSTER_SCENARIOS if args.cluster else SCENARIOS
    default_accounts = BENCH_CLUSTER_ACCOUNTS if args.cluster else BENCH_ACCOUNTS
    options = Options(
        server=args.server,
        api_key=args.api_key,
        redis_url=args.redis_url,
        tenant=args.tenant,
        scenarios=tuple(args.scenario or default_scenarios),
        processes=args.processes,
        concurrency=args.concurrency,
        channels=args.channels,
        duration_s=args.duration,
        batch_size=args.batch_size,
        accounts=default_accounts if args.accounts is None else args.accounts,
        redis_clients=args.redis_clients,
        drain_timeout_s=args.drain_timeout,
        out_dir=Path(args.out),
        memory_accounts=args.memory_accounts,
        peer_clients=args.peer_clients,
        drain_backlog=args.drain_backlog,
        cluster=args.cluster,
        http_server=args.http_server,
    )
    return run(options)


def cmd_flush(args: argparse.Namespace) -> int:
    from creditmeter.storage.embedded_redis import die_with_parent
    from creditmeter.transport.admin import run_flusher

    if args.parent_pid is not None:
        die_with_parent()
        if os.getppid() != args.parent_pid:  # it died before we asked
            return 1
    return uvloop.run(
        run_flusher(args.data_dir, args.redis_url, args.ledger_url, args.replica_acks)
    )


def cmd_routes(args: argparse.Namespace) -> int:
    from creditmeter.transport.connect_gateway import routes_table

    sys.stdout.write(routes_table())  # plain Markdown: not through rich
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from creditmeter.transport.admin import audit

    return uvloop.run(
        audit(args.data_dir, args.redis_url, args.ledger_url, args.tenant, args.wait, console)
    )


def cmd_rebuild(args: argparse.Namespace) -> int:
    from creditmeter.transport.admin import rebuild

    return uvloop.run(
        rebuild(args.data_dir, args.redis_url, args.ledger_url, args.replace, console)
    )


def _pack_table(packs: Sequence[Any]) -> Table:
    table = Table("pack", "name", "credits", "bonus", "price", "valid", "recurrence", "state")
    for p in packs:
        recurrence = enum_text(packs_pb2.Recurrence, p.recurrence)
        state = "archived" if p.archived else ("active" if p.active else "paused")
        state += ", trial" if p.trial else ""
        table.add_row(
            p.pack_id, p.name, str(p.credits), str(p.bonus_credits),
            f"{p.price.amount_minor / 100:.2f} {p.price.currency}",
            f"{p.validity_days}d" if p.validity_days else "forever", recurrence, state,
        )  # fmt: skip
    return table


def _purchase_table(purchases: Sequence[Any]) -> Table:
    table = Table("purchase", "account", "pack", "status", "credits", "payment", "created", "lots")
    for p in purchases:
        status = enum_text(packs_pb2.PurchaseStatus, p.status)
        table.add_row(
            p.purchase_id, p.account_id, p.pack_name, status,
            f"{p.credits}+{p.bonus_credits}", p.payment_reference, _time(p.create_time),
            ", ".join(p.lot_ids),
        )  # fmt: skip
    return table


def cmd_packs_create(args: argparse.Namespace) -> int:
    pack = packs_pb2.Pack(
        name=args.name, description=args.description, credits=args.credits,
        bonus_credits=args.bonus, validity_days=args.valid_days, trial=args.trial,
        price=packs_pb2.Price(amount_minor=args.price, currency=args.currency),
        recurrence=enum_pb(packs_pb2.Recurrence, args.recurrence),
        rollover_cap=args.rollover_cap,
    )  # fmt: skip
    resp = _client(args).create_pack(pack, request_id=args.request_id)
    console.print(_pack_table([resp.pack]))
    return 0


def cmd_packs_list(args: argparse.Namespace) -> int:
    resp = _client(args).list_packs(show_archived=args.all)
    console.print(_pack_table(resp.packs))
    return 0


def cmd_packs_delete(args: argparse.Namespace) -> int:
    resp = _client(args).delete_pack(args.pack_id, request_id=args.request_id)
    console.print(_pack_table([resp.pack]))
    return 0


def cmd_buy(args: argparse.Namespace) -> int:
    resp = _client(args).purchase_pack(
        args.account, args.pack_id, payment_reference=args.payment_reference,
        request_id=args.request_id,
    )  # fmt: skip
    console.print(f"{args.account}: balance {resp.balance}")
    console.print(_purchase_table([resp.purchase]))
    return 0


def cmd_purchases(args: argparse.Namespace) -> int:
    resp = _client(args).list_purchases(args.account, page_size=50)
    console.print(_purchase_table(resp.purchases))
    return 0


def cmd_refund(args: argparse.Namespace) -> int:
    resp = _client(args).refund_purchase(
        args.purchase_id, reason=args.reason, request_id=args.request_id
    )
    console.print(
        f"refunded {resp.refunded_credits} unspent credits; {resp.spent_credits} were already"
        f" spent; balance {resp.balance}"
    )
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    resp = _client(args).subscribe(args.account, args.pack_id, request_id=args.request_id)
    sub = resp.subscription
    console.print(
        f"subscription {sub.subscription_id}: {sub.credits} credits per period, period ends"
        f" {_time(sub.current_period_end)}"
    )
    return 0


# --- webhooks ---------------------------------------------------------------------------
def _endpoint_table(endpoints: Sequence[Any]) -> Table:
    table = Table("endpoint", "url", "events", "thresholds", "state", "description")
    for e in endpoints:
        events = ", ".join(
            enum_text(webhooks_pb2.WebhookEventType, t)
            for t in e.event_types
        )
        state = f"disabled: {e.disabled_reason}" if e.disabled_reason else (
            "disabled" if e.disabled else "enabled")  # fmt: skip
        table.add_row(e.endpoint_id, e.url, events, ", ".join(map(str, e.thresholds)), state,
                      e.description)  # fmt: skip
    return table


def _event_type_values(names: Sequence[str]) -> list[webhooks_pb2.WebhookEventType.ValueType]:
    from creditmeter.transport.webhooks import event_type_pb

    return [event_type_pb(EventType(name)) for name in names]


def _print_secret(secret: str) -> None:
    err_console.print("the signing secret (shown once; keep it):")
    print(secret)  # stdout alone, for scripts


def cmd_webhooks_create(args: argparse.Namespace) -> int:
    endpoint = webhooks_pb2.WebhookEndpoint(
        url=args.url, event_types=_event_type_values(args.event), thresholds=args.threshold,
        description=args.description,
    )  # fmt: skip
    resp = _client(args).call(
        "CreateWebhookEndpoint",
        webhooks_pb2.CreateWebhookEndpointRequest(endpoint=endpoint, request_id=args.request_id),
        webhooks_pb2.CreateWebhookEndpointResponse,
    )
    err_console.print(_endpoint_table([resp.endpoint]))
    _print_secret(resp.secret)
    return 0


def cmd_webhooks_list(args: argparse.Namespace) -> int:
    resp = _client(args).call(
        "ListWebhookEndpoints",
        webhooks_pb2.ListWebhookEndpointsRequest(),
        webhooks_pb2.ListWebhookEndpointsResponse,
    )
    console.print(_endpoint_table(resp.endpoints))
    return 0


def cmd_webhooks_update(args: argparse.Namespace) -> int:
    endpoint = webhooks_pb2.WebhookEndpoint(endpoint_id=args.endpoint_id)
    paths = []
    if args.url is not None:
        endpoint.url = args.url
        paths.append("url")
    if args.event:
        endpoint.event_types.extend(_event_type_values(args.event))
        paths.append("event_types")
    if args.threshold is not None:
        endpoint.thresholds.extend(args.threshold)
        paths.append("thresholds")
    if args.description is not None:
        endpoint.description = args.description
        paths.append("description")
    if args.disabled is not None:
        endpoint.disabled = args.disabled
        paths.append("disabled")
    req = webhooks_pb2.UpdateWebhookEndpointRequest(
        endpoint=endpoint, update_mask=field_mask_pb2.FieldMask(paths=paths),
        request_id=args.request_id,
    )  # fmt: skip
    resp = _client(args).call(
        "UpdateWebhookEndpoint", req, webhooks_pb2.UpdateWebhookEndpointResponse
    )
    console.print(_endpoint_table([resp.endpoint]))
    return 0


def cmd_webhooks_delete(args: argparse.Namespace) -> int:
    req = webhooks_pb2.DeleteWebhookEndpointRequest(
        endpoint_id=args.endpoint_id, request_id=args.request_id
    )
    _client(args).call("DeleteWebhookEndpoint", req, webhooks_pb2.DeleteWebhookEndpointResponse)
    err_console.print(f"deleted {args.endpoint_id}")
    return 0


def cmd_webhooks_rotate(args: argparse.Namespace) -> int:
    req = webhooks_pb2.RotateWebhookSecretRequest(
        endpoint_id=args.endpoint_id, request_id=args.request_id
    )
    resp = _client(args).call("RotateWebhookSecret", req, webhooks_pb2.RotateWebhookSecretResponse)
    _print_secret(resp.secret)
    return 0


def _delivery_table(deliveries: Sequence[Any]) -> Table:
    table = Table("delivery", "endpoint", "event", "type", "status", "attempts", "last", "created")
    for d in deliveries:
        status = enum_text(webhooks_pb2.WebhookDeliveryStatus, d.status)
        last = d.last_error or (str(d.last_status_code) if d.last_status_code else "")
        table.add_row(
            d.delivery_id, d.endpoint_id, d.event_id, d.event_type,
            status, str(d.attempts), last,
            _time(d.create_time),
        )  # fmt: skip
    return table


def cmd_webhooks_deliveries(args: argparse.Namespace) -> int:
    status = webhooks_pb2.WebhookDeliveryStatus.Value(
        f"WEBHOOK_DELIVERY_STATUS_{(args.status or 'unspecified').upper()}"
    )
    req = webhooks_pb2.ListWebhookDeliveriesRequest(
        endpoint_id=args.endpoint, status=status, page_size=args.limit, page_token=args.page_token
    )
    resp = _client(args).call(
        "ListWebhookDeliveries", req, webhooks_pb2.ListWebhookDeliveriesResponse
    )
    console.print(_delivery_table(resp.deliveries))
    if resp.next_page_token:
        err_console.print(f"more: --page-token {resp.next_page_token}")
    return 0


def cmd_webhooks_resend(args: argparse.Namespace) -> int:
    req = webhooks_pb2.ResendWebhookDeliveryRequest(
        delivery_id=args.delivery_id, request_id=args.request_id
    )
    resp = _client(args).call(
        "ResendWebhookDelivery", req, webhooks_pb2.ResendWebhookDeliveryResponse
    )
    console.print(_delivery_table([resp.delivery]))
    return 0


def _report_error(error: sdk.CreditmeterError) -> int:
    err_console.print(f"creditmeter: {error.code.name}: {error.message}", highlight=False)
    if error.reason:
        meta = ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items()))
        err_console.print(f"  reason {error.reason} {meta}", highlight=False)
    for field, why in error.field_violations.items():
        err_console.print(f"  {field}: {why}", highlight=False)
    return 1


# --- argument parsing -----------------------------------------------------------------
def _data_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=_env("DATA_DIR", DEFAULT_DATA_DIR),
        help="server data directory (env CREDITMETER_DATA_DIR; default ./data)",
    )


def _ledger_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ledger-url",
        default=_env("LEDGER_URL"),
        help="postgresql://... (env CREDITMETER_LEDGER_URL; default SQLite in the data directory)",
    )


def _config_flags(p: argparse.ArgumentParser) -> None:
    """Flags of commands that open the config store: with a PostgreSQL ledger it is in the
    ledger's database, otherwise in the data directory."""
    _data_dir_flag(p)
    _ledger_flag(p)


def _store_flags(p: argparse.ArgumentParser) -> None:
    """Flags of commands that open the server's Redis and ledger directly."""
    _data_dir_flag(p)
    _ledger_flag(p)
    p.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="the server's Redis, redis://... or redis+cluster://SEEDS "
        "(default: the embedded one of --data-dir)",
    )


def _client_flags(p: argparse.ArgumentParser, mutating: bool = False) -> None:
    p.add_argument(
        "--server",
        default=_env("SERVER", DEFAULT_LISTEN),
        help="server address (env CREDITMETER_SERVER)",
    )
    p.add_argument("--api-key", default=_env("API_KEY"), help="API key (env CREDITMETER_API_KEY)")
    p.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds")
    if mutating:
        p.add_argument("--request-id", help="idempotency key (default: a new UUID)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditmeter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC server")
    p.add_argument(
        "--listen",
        default=_env("LISTEN", DEFAULT_LISTEN),
        help="HOST:PORT to listen on (env CREDITMETER_LISTEN)",
    )
    _data_dir_flag(p)
    p.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="use this Redis instead of the embedded one: redis://HOST:PORT, or "
        "redis+cluster://HOST:PORT[,HOST:PORT...] for a Redis Cluster (env CREDITMETER_REDIS_URL)",
    )
    p.add_argument(
        "--buckets",
        type=int,
        default=int(_env("BUCKETS") or 0) or None,
        help="buckets a NEW deployment spreads accounts over (default 64 on one Redis, 1024 on "
        "a cluster); an initialised deployment keeps its own (env CREDITMETER_BUCKETS)",
    )
    p.add_argument(
        "--replica-acks",
        type=int,
        default=int(_env("REPLICA_ACKS") or 0),
        help="answer a change only once this many Redis replicas have it (WAIT); "
        "0: as soon as the primary has it (env CREDITMETER_REPLICA_ACKS)",
    )
    p.add_argument(
        "--appendfsync",
        default=_env("APPENDFSYNC", "always"),
        choices=["always", "everysec", "no"],
        help="embedded Redis fsync policy (env CREDITMETER_APPENDFSYNC)",
    )
    _ledger_flag(p)
    p.add_argument(
        "--pending-purchase-ttl",
        type=_duration_s,
        default=_duration_s(_env("PENDING_PURCHASE_TTL") or "30m"),
        help="how long a two-step purchase waits for CompletePurchase (e.g. 30m, 2h)",
    )
    p.add_argument(
        "--session-grace",
        type=_duration_s,
        default=_duration_s(_env("SESSION_GRACE") or "30s"),
        help="how long past its validity a silent call session is closed by the server",
    )
    p.add_argument(
        "--webhook-timeout",
        type=float,
        default=float(_env("WEBHOOK_TIMEOUT") or WEBHOOK_TIMEOUT_S),
        metavar="SECONDS",
        help="how long a webhook endpoint has to answer one delivery attempt"
        f" (env CREDITMETER_WEBHOOK_TIMEOUT; default {WEBHOOK_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--webhook-retry-base",
        type=float,
        default=float(_env("WEBHOOK_RETRY_BASE") or WEBHOOK_RETRY_BASE_S),
        metavar="SECONDS",
        help="delay after a failed webhook attempt, doubling with each attempt (jittered,"
        f" capped at an hour) for up to 3 days (env CREDITMETER_WEBHOOK_RETRY_BASE;"
        f" default {WEBHOOK_RETRY_BASE_S:g})",
    )
    p.add_argument(
        "--flusher",
        choices=FLUSHER_MODES,
        default="process",
        help="where the outbox is flushed into the ledger: a child process (default), the"
        " server's own event loop (inline), or not here (none: run `creditmeter flush`"
        " apart)",
    )
    # The two flags of 0.2, kept for scripts that pass them.
    p.add_argument("--no-flusher", dest="flusher", action="store_const", const="none",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--inline-flusher", dest="flusher", action="store_const", const="inline",
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument(
        "--backlog-cap",
        type=int,
        default=int(_env("BACKLOG_CAP") or DEFAULT_BACKLOG_CAP),
        help="outbox entries not yet in the ledger beyond which changes are refused"
        " (env CREDITMETER_BACKLOG_CAP)",
    )
    p.add_argument(
        "--metrics-listen",
        default=_env("METRICS_LISTEN"),
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics"
        " (env CREDITMETER_METRICS_LISTEN; default off)",
    )
    p.add_argument(
        "--http-listen",
        default=_env("HTTP_LISTEN"),
        metavar="HOST:PORT",
        help="also serve the Credits and Packs services as HTTP/JSON (the Connect protocol)"
        " on HOST:PORT (env CREDITMETER_HTTP_LISTEN; default off)",
    )
    p.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text (readable) or json (one object per line) (env CREDITMETER_LOG_FORMAT)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=int(_env("WORKERS") or os.cpu_count() or 1),
        metavar="N",
        help="server processes sharing the port, the Redis and the flusher"
        " (env CREDITMETER_WORKERS; default one per core; 1: a single process)",
    )
    # Set by the supervisor of --workers N for each of its workers.
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys", required=True)
    p = keys.add_parser("create", help="create a key (printed once)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", required=True, choices=[r.value for r in api_keys.Role])
    p.add_argument("--label", default="")
    _config_flags(p)
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--tenant")
    _config_flags(p)
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    _config_flags(p)
    p.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("grant", help="add a lot of credits")
    p.add_argument("account")
    p.add_argument("amount", type=int)
    p.add_argument("--expires-in", type=_duration_s, help="e.g. 30d, 12h")
    p.add_argument("--priority", type=int)
    p.add_argument(
        "--source",
        default="manual",
        choices=["purchase", "bonus", "promotion", "trial", "manual", "refund"],
    )
    p.add_argument("--reference", default="")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_grant)

    p = sub.add_parser("consume", help="charge for usage of a feature")
    p.add_argument("account")
    p.add_argument("feature")
    p.add_argument("--quantity", type=int, help="messages, or seconds for voice/video")
    p.add_argument("--amount", type=int, help="charge exactly this many credits")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser("check", help="what consume would decide and cost, changing nothing")
    p.add_argument("account")
    p.add_argument("feature")
    p.add_argument("--quantity", type=int, help="messages, or seconds for voice/video")
    p.add_argument("--amount", type=int, help="check exactly this many credits")
    _client_flags(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("balance", help="show the balance and live lots")
    p.add_argument("account")
    _client_flags(p)
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser("set-balance", help="add credits, or --reset and set the balance")
    p.add_argument("account")
    p.add_argument("amount", type=int)
    p.add_argument("--reset", action="store_true")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_set_balance)

    p = sub.add_parser("usage", help="show totals granted, used and remaining")
    p.add_argument("account")
    _client_flags(p)
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("flush", help="drain the outboxes into the ledger (a flusher process)")
    _store_flags(p)
    p.add_argument(
        "--replica-acks",
        type=int,
        default=int(_env("REPLICA_ACKS") or 0),
        help="flush an entry only once this many Redis replicas have it (WAIT), as serve's "
        "--replica-acks answers a change (env CREDITMETER_REPLICA_ACKS)",
    )
    # Set by `serve` for its flusher child: exit with that process.
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_flush)

    p = sub.add_parser(
        "routes", help="the HTTP/JSON routes of serve --http-listen, as a Markdown table"
    )
    p.set_defaults(func=cmd_routes)

    p = sub.add_parser("audit", help="check every balance in Redis against the ledger")
    _store_flags(p)
    p.add_argument("--tenant")
    p.add_argument(
        "--wait",
        type=float,
        default=10.0,
        help="seconds to wait for the flusher to catch up per account",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("rebuild", help="restore Redis hot state from the ledger")
    _store_flags(p)
    p.add_argument(
        "--replace", action="store_true", help="also overwrite accounts that have state in Redis"
    )
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("history", help="an account's transactions, newest first")
    p.add_argument("account")
    p.add_argument(
        "--kind",
        action="append",
        default=[],
        choices=["grant", "consume", "expire", "reset", "refund", "session", "options"],
    )
    p.add_argument("--feature", action="append", default=[])
    p.add_argument("--limit", type=int, default=20, help="page size")
    p.add_argument("--page-token", default="")
    _client_flags(p)
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("report", help="usage per period and feature")
    p.add_argument("account", nargs="?", default="", help="omit for the whole tenant")
    p.add_argument("--days", type=int, default=30, help="the last N days (UTC)")
    p.add_argument("--by", choices=["day", "month"], default="day")
    p.add_argument("--feature", default="")
    _client_flags(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench-ledger", help="measure flush rate and lag under full load")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per process")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--backlog", type=int, default=None, metavar="N",
                   help="drain figure: a backlog of N outbox entries written by the consume "
                   "script directly (default: what Consume calls make in seconds/2)")  # fmt: skip
    _ledger_flag(p)
    p.set_defaults(func=cmd_bench_ledger)

    p = sub.add_parser(
        "bench",
        help="measure throughput and latency against the ceilings (needs the bench extra)",
        description="Without --server: starts its own server on the embedded default in a "
        "temporary data directory. With --server: drives it (--api-key must be an admin key).",
    )
    p.add_argument("--server", default=None, help="drive this server (default: start one)")
    p.add_argument("--api-key", default=None, help="an admin key of --server")
    p.add_argument(
        "--scenario",
        action="append",
        choices=BENCH_SCENARIOS,
        help="repeatable; default all. empty and redis are the ceilings, latency is Consume "
        "open-loop at half the measured maximum, reference the minimal Lua deduction (run "
        "with any scenario that has Redis figures), memory Redis bytes per one-lot account, "
        "peer the PostgreSQL deduction (pgbench), drain the flusher's drain of a backlog",
    )
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="load processes")
    p.add_argument(
        "--concurrency", type=int, default=BENCH_CONCURRENCY, help="calls in flight per process"
    )
    p.add_argument("--channels", type=int, default=BENCH_CHANNELS_PER_PROCESS,
                   help="gRPC channels per process")  # fmt: skip
    p.add_argument("--duration", type=float, default=BENCH_DURATION_S, help="seconds per scenario")
    p.add_argument("--batch-size", type=int, default=BENCH_BATCH_SIZE,
                   help="items per ConsumeBatch, requests in flight per Meter stream")  # fmt: skip
    p.add_argument("--accounts", type=int, default=None,
                   help=f"accounts the load spreads over (default {BENCH_ACCOUNTS:,}; "
                   f"{BENCH_CLUSTER_ACCOUNTS:,} with --cluster)")  # fmt: skip
    p.add_argument("--redis-url", default=None,
                   help="with --server: its Redis, for its time per deduction (INFO "
                   "commandstats), the reference script and the redis-benchmark "
                   "ceiling")  # fmt: skip
    p.add_argument("--tenant", default=None, help="with --server: the tenant of --api-key")
    p.add_argument("--http-server", default=None, metavar="URL",
                   help="with --server: its --http-listen as http://HOST:PORT (the http "
                   "scenario; without --server the bench's own server has one)")
    p.add_argument("--redis-clients", type=int, default=BENCH_REDIS_CLIENTS,
                   help="redis-benchmark connections")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=BENCH_DRAIN_TIMEOUT_S,
                   help="seconds the ledger backlog may take to reach 0 after load")  # fmt: skip
    p.add_argument("--out", default=BENCH_OUT_DIR, help="where the JSON and the plot go")
    p.add_argument("--memory-accounts", type=int, default=BENCH_MEMORY_ACCOUNTS,
                   help="memory: one-lot accounts granted")  # fmt: skip
    p.add_argument("--peer-clients", type=int, default=BENCH_PEER_CLIENTS,
                   help="peer: pgbench connections")  # fmt: skip
    p.add_argument("--drain-backlog", type=int, default=BENCH_DRAIN_BACKLOG,
                   help="drain: outbox entries written, then drained into SQLite")  # fmt: skip
    p.add_argument("--cluster", action="store_true",
                   help="start a Redis Cluster (3 primaries + 3 replicas) and run the "
                   f"scenarios ({', '.join(BENCH_CLUSTER_SCENARIOS)} unless --scenario) on a "
                   "server on it, without and with --replica-acks "
                   f"{BENCH_CLUSTER_REPLICA_ACKS}, beside the standalone server: ratios, "
                   "each primary's share of the deductions, deductions/s per primary")  # fmt: skip
    p.set_defaults(func=cmd_bench)

    packs = sub.add_parser("packs", help="the packs for sale").add_subparsers(
        dest="packs", required=True
    )
    p = packs.add_parser("create", help="define a pack")
    p.add_argument("name")
    p.add_argument("credits", type=int)
    p.add_argument("--price", type=int, default=0, help="in minor units (cents)")
    p.add_argument("--currency", default="EUR")
    p.add_argument("--bonus", type=int, default=0, help="bonus credits")
    p.add_argument("--valid-days", type=int, default=0, help="0: never expires")
    p.add_argument("--description", default="")
    p.add_argument("--recurrence", default="one_time",
                   choices=["one_time", "weekly", "monthly", "yearly"])  # fmt: skip
    p.add_argument("--rollover-cap", type=int, default=0)
    p.add_argument("--trial", action="store_true")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_packs_create)
    p = packs.add_parser("list", help="packs for sale (--all: with archived)")
    p.add_argument("--all", action="store_true")
    _client_flags(p)
    p.set_defaults(func=cmd_packs_list)
    p = packs.add_parser("delete", help="archive a pack")
    p.add_argument("pack_id")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_packs_delete)

    p = sub.add_parser("buy", help="record a payment and grant a pack")
    p.add_argument("account")
    p.add_argument("pack_id")
    p.add_argument("--payment-reference", default="", help="required except for trials")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_buy)

    p = sub.add_parser("purchases", help="purchases of an account (or the tenant)")
    p.add_argument("account", nargs="?", default="")
    _client_flags(p)
    p.set_defaults(func=cmd_purchases)

    p = sub.add_parser("refund", help="refund a purchase's unspent credits")
    p.add_argument("purchase_id")
    p.add_argument("--reason", default="")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_refund)

    p = sub.add_parser("subscribe", help="subscribe an account to a recurring pack")
    p.add_argument("account")
    p.add_argument("pack_id")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_subscribe)

    hooks = sub.add_parser("webhooks", help="webhook endpoints and deliveries").add_subparsers(
        dest="webhooks", required=True
    )
    event_names = [t.value for t in EventType]
    p = hooks.add_parser("create", help="register an endpoint (prints its signing secret once)")
    p.add_argument("url")
    p.add_argument("--event", action="append", required=True, choices=event_names,
                   help="repeatable: an event type to send")  # fmt: skip
    p.add_argument("--threshold", action="append", type=int, default=[],
                   help="repeatable: a balance threshold for balance.low/topped_up")  # fmt: skip
    p.add_argument("--description", default="")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_webhooks_create)
    p = hooks.add_parser("list", help="the tenant's endpoints")
    _client_flags(p)
    p.set_defaults(func=cmd_webhooks_list)
    p = hooks.add_parser("update", help="change an endpoint (only the options given)")
    p.add_argument("endpoint_id")
    p.add_argument("--url")
    p.add_argument("--event", action="append", choices=event_names, help="replaces the types")
    p.add_argument("--threshold", action="append", type=int, help="replaces the thresholds")
    p.add_argument("--description")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--disable", dest="disabled", action="store_true", default=None)
    group.add_argument("--enable", dest="disabled", action="store_false")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_webhooks_update)
    p = hooks.add_parser("delete", help="remove an endpoint")
    p.add_argument("endpoint_id")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_webhooks_delete)
    p = hooks.add_parser("rotate", help="a new signing secret for an endpoint (printed once)")
    p.add_argument("endpoint_id")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_webhooks_rotate)
    p = hooks.add_parser("deliveries", help="deliveries, newest first, with their attempts")
    p.add_argument("--endpoint", default="", help="only this endpoint's")
    p.add_argument("--status", choices=["pending", "delivered", "failed"])
    p.add_argument("--limit", type=int, default=50, help="page size")
    p.add_argument("--page-token", default="")
    _client_flags(p)
    p.set_defaults(func=cmd_webhooks_deliveries)
    p = hooks.add_parser("resend", help="deliver a delivery's event again")
    p.add_argument("delivery_id")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_webhooks_resend)

    p = sub.add_parser("ledger-status", help="outbox backlog and flush lag")
    _client_flags(p)
    p.set_defaults(func=cmd_ledger_status)

    rates = sub.add_parser("rates", help="the rate card").add_subparsers(
        dest="rates", required=True
    )
    p = rates.add_parser("list")
    _client_flags(p)
    p.set_defaults(func=cmd_rates_list)
    p = rates.add_parser("set")
    p.add_argument("feature")
    p.add_argument("credits", type=int, help="credits per unit")
    p.add_argument("--unit", choices=["count", "time"])
    p.add_argument("--increment", type=int, help="billing increment in seconds (time features)")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_rates_set)

    p = sub.add_parser("account-options", help="set per-account options")
    p.add_argument("account")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--unlimited", dest="unlimited", action="store_true", default=None)
    group.add_argument("--limited", dest="unlimited", action="store_false")
    p.add_argument(
        "--overdraft-limit", type=int, default=None, metavar="CREDITS",
        help="credit line: how far past its lots the account may be charged (0 removes it)",
    )  # fmt: skip
    p.add_argument("--time-zone", help="IANA zone of its usage limits' periods ('' for UTC)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--ignore-usage-limits", dest="ignore_usage_limits",
                       action="store_true", default=None)  # fmt: skip
    group.add_argument("--respect-usage-limits", dest="ignore_usage_limits",
                       action="store_false")  # fmt: skip
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_account_options)

    limits = sub.add_parser("limits", help="usage limits per feature and period").add_subparsers(
        dest="limits", required=True
    )
    p = limits.add_parser("list", help="the tenant's limits, or those of --account with usage")
    p.add_argument("--account", help="an account: the limits that apply to it now")
    _client_flags(p)
    p.set_defaults(func=cmd_limits_list)
    for name, func in (("set", cmd_limits_set), ("remove", cmd_limits_remove)):
        p = limits.add_parser(
            name, help=f"{name} a limit: the tenant's default, or --account's own"
        )
        p.add_argument("feature")
        p.add_argument("period", choices=["day", "week", "month"])
        if name == "set":
            p.add_argument("limit", type=int, help="the most a period may use (0 blocks)")
            p.add_argument("--unit", choices=["units", "credits"], default="units")
        p.add_argument("--account", help="the account whose own limit it is")
        _client_flags(p, mutating=True)
        p.set_defaults(func=func)

    recharge = sub.add_parser(
        "recharge", help="automatic recharge below a balance threshold"
    ).add_subparsers(dest="recharge", required=True)
    p = recharge.add_parser("show", help="the tenant's default, or what applies to --account")
    p.add_argument("--account")
    _client_flags(p)
    p.set_defaults(func=cmd_recharge_show)
    p = recharge.add_parser("set", help="recharge below THRESHOLD (the tenant's, or --account's)")
    p.add_argument("threshold", type=int)
    p.add_argument("--pack", help="a one-time pack: each crossing creates a pending purchase")
    p.add_argument("--account")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_recharge_set)
    p = recharge.add_parser("off", help="no recharges for an account, even the tenant's")
    p.add_argument("account")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_recharge_off)
    p = recharge.add_parser("remove", help="remove the tenant's default, or --account's own")
    p.add_argument("--account")
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_recharge_remove)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `serve` has --log-format and hands it to its flusher child through the environment;
    # the other commands log (rarely) as the environment says, text by default.
    log_format = getattr(args, "log_format", None) or _env("LOG_FORMAT", "text") or "text"
    logs.configure(log_format, _env("LOG_LEVEL", "INFO") or "INFO")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except sdk.CreditmeterError as error:
        return _report_error(error)
    except BackendUnavailable as error:  # the config store (PostgreSQL) did not answer
        err_console.print(f"creditmeter: {error.message} ({failure_text(error)})", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
