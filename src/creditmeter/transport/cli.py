"""The `creditmeter` command: the server, key administration, and client commands for a
person at a terminal."""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import uvloop
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.api.credits.v1 import packs_pb2, packs_pb2_grpc
from creditmeter.constants import (
    CONFIG_DB_NAME,
    DEFAULT_BACKLOG_CAP,
    DEFAULT_DATA_DIR,
    DEFAULT_LISTEN,
    ENV_PREFIX,
    LOG_FORMATS,
)
from creditmeter.domain import keys as api_keys
from creditmeter.domain.clock import SystemClock
from creditmeter.domain.validation import valid_tenant_id
from creditmeter.storage.config_store import ConfigStore, KeyRow
from creditmeter.storage.embedded_redis import RedisNotInstalled, RedisStartFailed
from creditmeter.transport import logs

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
    return pb.LotSource.Name(value).removeprefix("LOT_SOURCE_").lower()


# --- server and key administration ---------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    from creditmeter.transport.server import Settings, serve

    settings = Settings(
        listen=args.listen,
        data_dir=Path(args.data_dir),
        redis_url=args.redis_url or None,
        appendfsync=args.appendfsync,
        ledger_url=args.ledger_url or None,
        flusher=not args.no_flusher,
        backlog_cap=args.backlog_cap,
        pending_purchase_ttl_ms=args.pending_purchase_ttl * 1000,
        metrics_listen=args.metrics_listen or None,
    )
    try:
        uvloop.run(serve(settings))
    except RedisNotInstalled as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 2
    except RedisStartFailed as exc:
        err_console.print(f"creditmeter: {exc}", highlight=False)
        return 2
    return 0


def _config(args: argparse.Namespace) -> ConfigStore:
    return ConfigStore(Path(args.data_dir) / CONFIG_DB_NAME)


def cmd_keys_create(args: argparse.Namespace) -> int:
    if not valid_tenant_id(args.tenant):
        err_console.print("creditmeter: --tenant must be 1-63 of a-z 0-9 _ - (starting a-z0-9)")
        return 2
    plaintext, record = api_keys.generate(
        args.tenant, api_keys.Role(args.role), args.label, SystemClock().now_ms()
    )
    _config(args).add_key(
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
    for row in _config(args).api_keys(args.tenant):
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
    if not _config(args).revoke_key(args.key_id, SystemClock().now_ms()):
        err_console.print(f"creditmeter: no live key {args.key_id}")
        return 1
    err_console.print(f"revoked {args.key_id}")
    return 0


# --- client commands -------------------------------------------------------------------
class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        if not args.api_key:
            raise SystemExit("creditmeter: an API key is needed: --api-key or CREDITMETER_API_KEY")
        self.channel = grpc.insecure_channel(args.server)
        self.stub = pb_grpc.CreditsStub(self.channel)
        self.packs = packs_pb2_grpc.PacksStub(self.channel)
        self.metadata = (("authorization", f"Bearer {args.api_key}"),)
        self.timeout = args.timeout

    def __call__(self, method: str, request: Any) -> Any:
        stub = self.packs if hasattr(self.packs, method) else self.stub
        return getattr(stub, method)(request, metadata=self.metadata, timeout=self.timeout)


def _request_id(args: argparse.Namespace) -> str:
    return str(args.request_id or uuid.uuid4())


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
    req = pb.GrantRequest(
        account_id=args.account,
        amount=args.amount,
        reference=args.reference,
        request_id=_request_id(args),
        source=pb.LotSource.Value(f"LOT_SOURCE_{args.source.upper()}"),
    )
    if args.priority is not None:
        req.priority = args.priority
    if args.expires_in is not None:
        req.valid_for.FromSeconds(args.expires_in)
    resp = Client(args)("Grant", req)
    console.print(f"granted {resp.lot.amount} credits to {args.account}: balance {resp.balance}")
    console.print(_lots_table([resp.lot]))
    return 0


def cmd_consume(args: argparse.Namespace) -> int:
    req = pb.ConsumeRequest(
        account_id=args.account, feature=args.feature, request_id=_request_id(args)
    )
    if args.quantity is not None:
        req.quantity = args.quantity
    if args.amount is not None:
        req.amount = args.amount
    resp = Client(args)("Consume", req)
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


def cmd_balance(args: argparse.Namespace) -> int:
    resp = Client(args)("GetBalance", pb.GetBalanceRequest(account_id=args.account))
    label = "unlimited" if resp.unlimited else str(resp.balance)
    console.print(f"{args.account}: balance {label}")
    if resp.lots:
        console.print(_lots_table(resp.lots))
    return 0


def cmd_set_balance(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "SetBalance",
        pb.SetBalanceRequest(
            account_id=args.account,
            amount=args.amount,
            reset=args.reset,
            request_id=_request_id(args),
        ),
    )
    console.print(f"{args.account}: balance {resp.balance} (removed {resp.removed})")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    resp = Client(args)("GetUsage", pb.GetUsageRequest(account_id=args.account))
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
    return 0


def cmd_rates_list(args: argparse.Namespace) -> int:
    resp = Client(args)("ListRates", pb.ListRatesRequest())
    table = Table("feature", "credits/unit", "unit", "increment", "built-in")
    for r in resp.rates:
        unit = pb.RateUnit.Name(r.unit).removeprefix("RATE_UNIT_").lower()
        inc = f"{r.billing_increment.seconds}s" if r.HasField("billing_increment") else ""
        table.add_row(r.feature, str(r.credits_per_unit), unit, inc, "yes" if r.builtin else "")
    console.print(table)
    return 0


def cmd_rates_set(args: argparse.Namespace) -> int:
    rate = pb.Rate(feature=args.feature, credits_per_unit=args.credits)
    if args.unit:
        rate.unit = pb.RateUnit.Value(f"RATE_UNIT_{args.unit.upper()}")
    if args.increment is not None:
        rate.billing_increment.FromSeconds(args.increment)
    resp = Client(args)("SetRate", pb.SetRateRequest(rate=rate, request_id=_request_id(args)))
    console.print(f"{resp.rate.feature}: {resp.rate.credits_per_unit} credits per unit")
    return 0


def cmd_account_options(args: argparse.Namespace) -> int:
    req = pb.SetAccountOptionsRequest(account_id=args.account, request_id=_request_id(args))
    if args.unlimited is not None:
        req.unlimited = args.unlimited
    resp = Client(args)("SetAccountOptions", req)
    console.print(f"{args.account}: unlimited={resp.options.unlimited}")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    req = pb.ListTransactionsRequest(
        account_id=args.account, page_size=args.limit, page_token=args.page_token
    )
    req.filter.kinds.extend(
        pb.TransactionKind.Value(f"TRANSACTION_KIND_{k.upper()}") for k in args.kind
    )
    req.filter.features.extend(args.feature)
    resp = Client(args)("ListTransactions", req)
    table = Table("time", "kind", "amount", "balance", "feature", "units", "lots", "transaction")
    for t in resp.transactions:
        kind = pb.TransactionKind.Name(t.kind).removeprefix("TRANSACTION_KIND_").lower()
        sign = "+" if t.kind == pb.TRANSACTION_KIND_GRANT else "-"
        lots = ", ".join(f"{c.lot_id}:{c.amount}" for c in t.lots)
        table.add_row(
            _time(t.create_time),
            kind,
            f"{sign}{t.amount}",
            str(t.balance),
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
    req = pb.GetUsageReportRequest(
        account_id=args.account,
        feature=args.feature,
        group_by=pb.USAGE_PERIOD_MONTH if args.by == "month" else pb.USAGE_PERIOD_DAY,
    )
    req.start_time.FromDatetime(start)
    req.end_time.FromDatetime(end)
    resp = Client(args)("GetUsageReport", req)
    table = Table("period", "feature", "credits", "units")
    for row in resp.rows:
        table.add_row(row.period, row.feature, str(row.credits), str(row.units))
    console.print(table)
    return 0


def cmd_ledger_status(args: argparse.Namespace) -> int:
    resp = Client(args)("GetLedgerStatus", pb.GetLedgerStatusRequest())
    console.print(
        f"backlog {resp.backlog} (cap {resp.backlog_cap}), flush lag "
        f"{resp.flush_lag.ToMilliseconds()} ms, {resp.events_flushed} events flushed, "
        f"{'accepting' if resp.accepting_changes else 'REFUSING'} changes"
    )
    return 0


def cmd_bench_ledger(args: argparse.Namespace) -> int:
    from creditmeter.bench.ledger import run

    return run(args.seconds, args.processes, args.concurrency, args.ledger_url, args.json)


def cmd_flush(args: argparse.Namespace) -> int:
    from creditmeter.transport.admin import run_flusher

    return uvloop.run(run_flusher(args.data_dir, args.redis_url, args.ledger_url))


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
        recurrence = packs_pb2.Recurrence.Name(p.recurrence).removeprefix("RECURRENCE_").lower()
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
        status = packs_pb2.PurchaseStatus.Name(p.status).removeprefix("PURCHASE_STATUS_").lower()
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
        recurrence=packs_pb2.Recurrence.Value(f"RECURRENCE_{args.recurrence.upper()}"),
        rollover_cap=args.rollover_cap,
    )  # fmt: skip
    resp = Client(args)(
        "CreatePack", packs_pb2.CreatePackRequest(pack=pack, request_id=_request_id(args))
    )
    console.print(_pack_table([resp.pack]))
    return 0


def cmd_packs_list(args: argparse.Namespace) -> int:
    resp = Client(args)("ListPacks", packs_pb2.ListPacksRequest(show_archived=args.all))
    console.print(_pack_table(resp.packs))
    return 0


def cmd_packs_delete(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "DeletePack",
        packs_pb2.DeletePackRequest(pack_id=args.pack_id, request_id=_request_id(args)),
    )
    console.print(_pack_table([resp.pack]))
    return 0


def cmd_buy(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "PurchasePack",
        packs_pb2.PurchasePackRequest(
            account_id=args.account, pack_id=args.pack_id,
            payment_reference=args.payment_reference, request_id=_request_id(args),
        ),
    )  # fmt: skip
    console.print(f"{args.account}: balance {resp.balance}")
    console.print(_purchase_table([resp.purchase]))
    return 0


def cmd_purchases(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "ListPurchases", packs_pb2.ListPurchasesRequest(account_id=args.account, page_size=50)
    )
    console.print(_purchase_table(resp.purchases))
    return 0


def cmd_refund(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "RefundPurchase",
        packs_pb2.RefundPurchaseRequest(
            purchase_id=args.purchase_id, reason=args.reason, request_id=_request_id(args)
        ),
    )
    console.print(
        f"refunded {resp.refunded_credits} unspent credits; {resp.spent_credits} were already"
        f" spent; balance {resp.balance}"
    )
    return 0


def cmd_subscribe(args: argparse.Namespace) -> int:
    resp = Client(args)(
        "Subscribe",
        packs_pb2.SubscribeRequest(
            account_id=args.account, pack_id=args.pack_id, request_id=_request_id(args)
        ),
    )
    sub = resp.subscription
    console.print(
        f"subscription {sub.subscription_id}: {sub.credits} credits per period, period ends"
        f" {_time(sub.current_period_end)}"
    )
    return 0


def _report_rpc_error(error: grpc.RpcError) -> int:
    status = rpc_status.from_call(error)
    code = error.code().name
    err_console.print(f"creditmeter: {code}: {error.details()}", highlight=False)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            meta = ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items()))
            err_console.print(f"  reason {info.reason} {meta}", highlight=False)
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            for v in bad.field_violations:
                err_console.print(f"  {v.field}: {v.description}", highlight=False)
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


def _store_flags(p: argparse.ArgumentParser) -> None:
    """Flags of commands that open the server's Redis and ledger directly."""
    _data_dir_flag(p)
    _ledger_flag(p)
    p.add_argument(
        "--redis-url",
        default=_env("REDIS_URL"),
        help="the server's Redis (default: the embedded one of --data-dir)",
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
        help="use this Redis instead of the embedded one (env CREDITMETER_REDIS_URL)",
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
        "--no-flusher",
        action="store_true",
        help="do not flush the outbox in this process (run `creditmeter flush` apart)",
    )
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
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text (readable) or json (one object per line) (env CREDITMETER_LOG_FORMAT)",
    )
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys", required=True)
    p = keys.add_parser("create", help="create a key (printed once)")
    p.add_argument("--tenant", required=True)
    p.add_argument("--role", required=True, choices=[r.value for r in api_keys.Role])
    p.add_argument("--label", default="")
    _data_dir_flag(p)
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="list keys (never their secrets)")
    p.add_argument("--tenant")
    _data_dir_flag(p)
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="revoke a key by id")
    p.add_argument("key_id")
    _data_dir_flag(p)
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
    p.set_defaults(func=cmd_flush)

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
    _ledger_flag(p)
    p.set_defaults(func=cmd_bench_ledger)

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
    _client_flags(p, mutating=True)
    p.set_defaults(func=cmd_account_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only `serve` has --log-format; the other commands log (rarely) as text.
    logs.configure(getattr(args, "log_format", "text"), _env("LOG_LEVEL", "INFO") or "INFO")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except grpc.RpcError as error:
        return _report_rpc_error(error)


if __name__ == "__main__":
    sys.exit(main())
