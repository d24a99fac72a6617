"""Metrics and logs of a served workload: the /metrics endpoint scraped over HTTP and parsed
as Prometheus does, and the JSON log lines a real call leaves (with no API key in them)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from creditmeter import errors
from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.domain.clock import ManualClock
from creditmeter.transport import logs
from creditmeter.transport.cli import build_parser
from creditmeter.transport.interceptors import Gatekeeper
from creditmeter.transport.server import App, Settings
from tests.conftest import Tenant, rid
from tests.helpers import fails

METRICS = pytest.mark.settings(metrics_listen="127.0.0.1:0")
DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
METRIC = re.compile(r"\bcreditmeter_[a-z_]+")
CONSUME = ("credits.v1.Credits", "Consume")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_sync(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(app: App) -> Samples:
    assert app.metrics_port, "the metrics endpoint is not on"
    return await asyncio.to_thread(scrape_sync, app.metrics_port)


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when the series does not exist yet (a counter never touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpcs(samples: Samples, method: tuple[str, str], code: str) -> float:
    service, name = method
    return value(samples, "creditmeter_rpcs_total", service=service, method=name, code=code)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def new_feature(t: Tenant, credits_per_unit: int) -> str:
    """A feature only this test uses, so its series start at zero."""
    feature = f"m{uuid.uuid4().hex[:12]}"
    await t.admin.SetRate(
        pb.SetRateRequest(
            rate=pb.Rate(feature=feature, credits_per_unit=credits_per_unit), request_id=rid()
        )
    )
    return feature


@METRICS
async def test_workload_counts_rpcs_consumption_and_refusals(app: App, tenant: Tenant) -> None:
    # The server loaded the scripts' library at start: no charge below takes a second
    # round trip to load it.
    before = await scrape(app)
    feature = await new_feature(tenant, 3)
    await tenant.admin.Grant(pb.GrantRequest(account_id="alice", amount=20, request_id=rid()))

    first = pb.ConsumeRequest(account_id="alice", feature=feature, quantity=2, request_id=rid())
    assert (await tenant.meter.Consume(first)).amount == 6
    replay = await tenant.meter.Consume(first)  # same request id: answered, not charged again
    assert replay.balance == 14
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="alice", feature=feature, quantity=1, request_id=rid())
    )
    text = await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="alice", feature="text", quantity=5, request_id=rid())
    )
    assert text.balance == 6
    refused = await fails(
        tenant.meter.Consume(
            pb.ConsumeRequest(account_id="alice", feature=feature, quantity=3, request_id=rid())
        )
    )
    assert refused.reason == "INSUFFICIENT_CREDITS"
    denied = await fails(
        tenant.read.Consume(pb.ConsumeRequest(account_id="alice", feature="text", request_id=rid()))
    )
    assert denied.code == grpc.StatusCode.PERMISSION_DENIED
    unknown = await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id="nobody")))
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    stranger = await fails(
        tenant.stub.GetBalance(
            pb.GetBalanceRequest(account_id="alice"),
            metadata=(("authorization", "Bearer cm_000000000000_guess"),),
        )
    )
    assert stranger.code == grpc.StatusCode.UNAUTHENTICATED

    after = await scrape(app)
    # Consumption by feature: this test's own feature from zero, `text` as a difference.
    assert value(after, "creditmeter_credits_consumed_total", feature=feature) == 9
    assert value(after, "creditmeter_units_consumed_total", feature=feature) == 3
    assert value(after, "creditmeter_insufficient_credits_total", feature=feature) == 1
    # Prometheus values are doubles: once another test in this process has charged close to
    # 2^53 credits of `text`, a difference is exact only to the spacing of doubles there.
    text_total = value(after, "creditmeter_credits_consumed_total", feature="text")
    resolution = 2 * math.ulp(text_total)
    text_credits = delta(before, after, "creditmeter_credits_consumed_total", feature="text")
    assert abs(text_credits - 5) <= resolution, (text_credits, resolution)
    units_total = value(after, "creditmeter_units_consumed_total", feature="text")
    text_units = delta(before, after, "creditmeter_units_consumed_total", feature="text")
    assert abs(text_units - 5) <= 2 * math.ulp(units_total), (text_units, units_total)
    assert delta(before, after, "creditmeter_insufficient_credits_total", feature="text") == 0

    # RPCs by method and status code.
    assert rpcs(after, CONSUME, "OK") - rpcs(before, CONSUME, "OK") == 4
    assert (
        rpcs(after, CONSUME, "FAILED_PRECONDITION") - rpcs(before, CONSUME, "FAILED_PRECONDITION")
        == 1
    )
    assert (
        rpcs(after, CONSUME, "PERMISSION_DENIED") - rpcs(before, CONSUME, "PERMISSION_DENIED") == 1
    )
    balance = ("credits.v1.Credits", "GetBalance")
    assert rpcs(after, balance, "NOT_FOUND") - rpcs(before, balance, "NOT_FOUND") == 1
    assert rpcs(after, balance, "UNAUTHENTICATED") - rpcs(before, balance, "UNAUTHENTICATED") == 1
    grant = ("credits.v1.Credits", "Grant")
    assert rpcs(after, grant, "OK") - rpcs(before, grant, "OK") == 1
    set_rate = ("credits.v1.Credits", "SetRate")
    assert rpcs(after, set_rate, "OK") - rpcs(before, set_rate, "OK") == 1

    # Every Consume timed (also the refused ones), and only credits.v1 calls are counted.
    consume_labels = {"service": CONSUME[0], "method": CONSUME[1]}
    assert delta(before, after, "creditmeter_rpc_duration_seconds_count", **consume_labels) == 6
    assert delta(before, after, "creditmeter_rpc_duration_seconds_sum", **consume_labels) > 0
    assert not any(
        name == "creditmeter_rpcs_total" and ("service", "grpc.health.v1.Health") in labels
        for name, labels in after
    )

    # Redis round trips by script: five Consumes reached Redis (not the denied one).
    redis_count = "creditmeter_redis_duration_seconds_count"
    assert delta(before, after, redis_count, operation="consume") == 5
    assert delta(before, after, redis_count, operation="snapshot") == 1  # the NOT_FOUND read
    assert delta(before, after, redis_count, operation="grant") == 1

    # No label carries a tenant, an account or a key.
    label_values = {v for _name, labels in after for _k, v in labels}
    assert tenant.name not in label_values and "alice" not in label_values


@METRICS
async def test_backlog_gauges_follow_the_monitor(app: App, tenant: Tenant) -> None:
    # No flusher runs here: what this test writes stays in the outboxes, and the backlog
    # monitor's gauge reports it.
    await tenant.admin.Grant(pb.GrantRequest(account_id="bob", amount=5, request_id=rid()))
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="bob", feature="text", request_id=rid())
    )
    await app._check_backlog()
    samples = await scrape(app)
    assert value(samples, "creditmeter_outbox_backlog") == app.gate.backlog
    assert app.gate.backlog >= 4  # grant + request, consume + request entries at least
    assert value(samples, "creditmeter_outbox_backlog_cap") == app.settings.backlog_cap
    assert value(samples, "creditmeter_accepting_changes") == 1


@pytest.mark.flusher
@METRICS
async def test_flusher_reports_events_flushed_and_lag(app: App, tenant: Tenant) -> None:
    before = await scrape(app)
    await tenant.admin.Grant(pb.GrantRequest(account_id="carol", amount=9, request_id=rid()))
    await tenant.meter.Consume(
        pb.ConsumeRequest(account_id="carol", feature="text", quantity=2, request_id=rid())
    )
    assert app.flusher is not None
    for _ in range(500):
        if await app.flusher.backlog() == 0 and app.flusher.stats.events >= 2:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the flusher did not catch up")
    await app._check_backlog()
    after = await scrape(app)
    # Redis was flushed for this test: the grant and the consume are all it flushed.
    assert delta(before, after, "creditmeter_events_flushed_total") == app.flusher.stats.events
    assert app.flusher.stats.events == 2
    assert value(after, "creditmeter_flush_lag_seconds") == app.flusher.stats.last_lag_ms / 1000
    assert value(after, "creditmeter_outbox_backlog") == 0


# --- streaming RPCs ---------------------------------------------------------------------
@pytest.fixture
async def stream_server(app: App) -> AsyncIterator[grpc.aio.Channel]:
    """A server with only the Gatekeeper and a WatchBalance stub that streams raw bytes,
    so stream accounting is tested whatever the real WatchBalance does."""

    async def watch(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        count = int(request.decode())
        for i in range(abs(count)):
            yield str(i).encode()
        if count < 0:
            raise errors.AccountNotFound("gone", {"account_id": "x"})
        if count == 0:
            yield b"ready"
            await asyncio.sleep(60)  # held open until the client cancels

    handler = grpc.method_handlers_generic_handler(
        "credits.v1.Credits", {"WatchBalance": grpc.unary_stream_rpc_method_handler(watch)}
    )
    assert app.live is not None
    live = app.live
    server = grpc.aio.server(interceptors=[Gatekeeper(lambda: live.keys)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    await channel.close()
    await server.stop(None)


@METRICS
async def test_streams_count_once_at_their_end(
    app: App, tenant: Tenant, stream_server: grpc.aio.Channel
) -> None:
    watch = stream_server.unary_stream("/credits.v1.Credits/WatchBalance")
    method = ("credits.v1.Credits", "WatchBalance")
    auth = tenant.read.metadata
    before = await scrape(app)

    received = [m async for m in watch(b"3", metadata=auth)]
    assert received == [b"0", b"1", b"2"]
    call = watch(b"-2", metadata=auth)
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in call:
            pass
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    held = watch(b"0", metadata=auth)
    assert await held.read() == b"ready"
    held.cancel()
    for _ in range(500):  # the server learns of the cancellation asynchronously
        after = await scrape(app)
        if rpcs(after, method, "CANCELLED") > rpcs(before, method, "CANCELLED"):
            break
        await asyncio.sleep(0.01)

    assert rpcs(after, method, "OK") - rpcs(before, method, "OK") == 1  # once, not per message
    assert rpcs(after, method, "NOT_FOUND") - rpcs(before, method, "NOT_FOUND") == 1
    assert rpcs(after, method, "CANCELLED") - rpcs(before, method, "CANCELLED") == 1
    labels = {"service": method[0], "method": method[1]}
    assert delta(before, after, "creditmeter_rpc_duration_seconds_count", **labels) == 3


# --- the endpoint and the flags -----------------------------------------------------------
async def test_endpoint_is_off_by_default_and_closes_on_stop(
    redis_url: str, tmp_path: Path, clock: ManualClock
) -> None:
    off = App(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "a", redis_url=redis_url,
                       clock=clock, flusher=False))  # fmt: skip
    await off.start()
    try:
        assert off.metrics is None and off.metrics_port == 0
    finally:
        await off.stop()

    on = App(Settings(listen="127.0.0.1:0", data_dir=tmp_path / "b", redis_url=redis_url,
                      clock=clock, flusher=False, metrics_listen="127.0.0.1:0"))  # fmt: skip
    await on.start()
    port = on.metrics_port
    try:
        assert port > 0
        samples = await scrape(on)
        assert value(samples, "creditmeter_accepting_changes") == 1
        assert ("creditmeter_sessions_open", frozenset()) in samples
    finally:
        await on.stop()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape_sync, port)


def test_serve_flags_and_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.metrics_listen, args.log_format) == (None, "text")
    args = build_parser().parse_args(
        ["serve", "--metrics-listen", "0.0.0.0:9464", "--log-format", "json"]
    )
    assert (args.metrics_listen, args.log_format) == ("0.0.0.0:9464", "json")
    monkeypatch.setenv("CREDITMETER_METRICS_LISTEN", "127.0.0.1:9100")
    monkeypatch.setenv("CREDITMETER_LOG_FORMAT", "json")
    args = build_parser().parse_args(["serve"])
    assert (args.metrics_listen, args.log_format) == ("127.0.0.1:9100", "json")


def test_dashboard_uses_only_metrics_the_server_has() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {re.sub(r"_(total|bucket|count|sum)$", "", m) for e in exprs for m in METRIC.findall(e)}
    defined = {
        metric.name for metric in REGISTRY.collect() if metric.name.startswith("creditmeter_")
    }
    assert used == defined  # every metric on the dashboard exists, and every one is shown


# --- logs ---------------------------------------------------------------------------------
@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged (DEBUG and up) while the test runs, as `--log-format json` writes it."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def secret_of(key: str) -> str:
    return key.split("_", 2)[2]


async def test_json_logs_of_served_calls_hold_no_key_or_payload(
    app: App, tenant: Tenant, other_tenant: Tenant, json_log: io.StringIO
) -> None:
    account = f"acct-{uuid.uuid4().hex[:10]}"
    await other_tenant.admin.Grant(pb.GrantRequest(account_id=account, amount=3, request_id=rid()))
    await other_tenant.meter.Consume(
        pb.ConsumeRequest(account_id=account, feature="text", request_id=rid())
    )
    await fails(other_tenant.read.Consume(pb.ConsumeRequest(account_id=account, feature="text",
                                                            request_id=rid())))  # fmt: skip
    await fails(tenant.read.GetBalance(pb.GetBalanceRequest(account_id=account)))
    revoked_looking = f"{other_tenant.admin.key[:-4]}zzzz"  # right id, wrong secret
    await fails(
        other_tenant.stub.GetBalance(
            pb.GetBalanceRequest(account_id=account),
            metadata=(("authorization", f"Bearer {revoked_looking}"),),
        )
    )
    # A careless log line with a key in it is masked by the handler's filter.
    logging.getLogger("creditmeter.test").info(
        "authorization %s", f"Bearer {other_tenant.meter.key}", extra={"key": tenant.admin.key}
    )

    output = json_log.getvalue()
    keys = [t.key for t in (tenant.admin, tenant.meter, tenant.read)] + [
        t.key for t in (other_tenant.admin, other_tenant.meter, other_tenant.read)
    ]
    for key in [*keys, revoked_looking]:
        assert secret_of(key) not in output
    assert account not in output  # no request payload of any tenant

    lines = [json.loads(line) for line in output.splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line.get("rpc_method")]
    outcomes = {(line["tenant"], line["rpc_method"], line["code"]) for line in access}
    assert (other_tenant.name, "Grant", "OK") in outcomes
    assert (other_tenant.name, "Consume", "OK") in outcomes
    assert (other_tenant.name, "Consume", "PERMISSION_DENIED") in outcomes
    assert (tenant.name, "GetBalance", "NOT_FOUND") in outcomes
    assert (None, "GetBalance", "UNAUTHENTICATED") in outcomes
    careless = next(line for line in lines if line["logger"] == "creditmeter.test")
    assert careless["message"] == f"authorization Bearer {logs.REDACTED}"
    assert careless["key"] == f"cm_{tenant.admin.key.split('_')[1]}_{logs.REDACTED}"


def test_text_format_is_the_readable_default() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("creditmeter.test.text")
    handler = logs.make_handler("text", stream)
    logger.addHandler(handler)
    try:
        logger.warning("outbox backlog %d", 7)
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith("WARNING creditmeter.test.text: outbox backlog 7")
    with pytest.raises(ValueError):
        logs.formatter("xml")
