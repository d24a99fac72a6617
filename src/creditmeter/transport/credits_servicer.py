"""The credits.v1.Credits servicer: translates protobuf to domain calls and back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.constants import MAX_FILTER_KINDS, METER_WINDOW
from creditmeter.domain.alerts import BalanceAlerts
from creditmeter.domain.backpressure import LedgerStatus
from creditmeter.domain.history import History
from creditmeter.domain.metering import ConsumeResult, Metering
from creditmeter.domain.model import Period, TxnQuery
from creditmeter.domain.purchases import Purchases
from creditmeter.domain.recharge import Recharges
from creditmeter.domain.sessions import Sessions
from creditmeter.domain.validation import Violations
from creditmeter.errors import CreditError, InvalidRequest
from creditmeter.transport import convert
from creditmeter.transport.interceptors import Undecodable, principal

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
#: A Meter item read: its request id and the future of its charge, or undecodable bytes.
_MeterEntry: TypeAlias = tuple[str, asyncio.Future[ConsumeResult]] | Undecodable


_PERIODS = {
    pb.USAGE_PERIOD_UNSPECIFIED: Period.DAY,
    pb.USAGE_PERIOD_DAY: Period.DAY,
    pb.USAGE_PERIOD_MONTH: Period.MONTH,
}


class CreditsServicer(pb_grpc.CreditsServicer):
    def __init__(
        self,
        metering: Metering,
        history: History,
        purchases: Purchases,
        ledger_status: Callable[[], Awaitable[LedgerStatus]],
        sessions: Sessions,
        alerts: BalanceAlerts,
        recharges: Recharges,
    ) -> None:
        self.metering = metering
        self.recharges = recharges
        self.sessions = sessions
        self.alerts = alerts
        self.history = history
        self.purchases = purchases
        self.ledger_status = ledger_status

    async def Grant(self, request: pb.GrantRequest, context: Context) -> pb.GrantResponse:
        expiry = request.WhichOneof("expiry")
        v = Violations()
        result = await self.metering.grant(
            principal().tenant,
            request.account_id,
            request.amount,
            request_id=request.request_id,
            expires_at_ms=(
                convert.timestamp_ms(request.expires_at, "expires_at", v)
                if expiry == "expires_at"
                else None
            ),
            valid_for_ms=(
                convert.duration_ms(request.valid_for, "valid_for", v)
                if expiry == "valid_for"
                else None
            ),
            priority=request.priority if request.HasField("priority") else None,
            source=convert.lot_source(request.source, v),
            reference=request.reference,
            violations=v,
        )
        return pb.GrantResponse(lot=convert.lot_pb(result.lot), balance=result.balance)

    async def Consume(self, request: pb.ConsumeRequest, context: Context) -> pb.ConsumeResponse:
        quantity, amount = convert.how_much(request)
        result = await self.metering.consume(
            principal().tenant, request.account_id, request.feature,
            request_id=request.request_id, quantity=quantity, amount=amount,
        )  # fmt: skip
        return convert.consume_response_pb(result)

    async def ConsumeBatch(
        self, request: pb.ConsumeBatchRequest, context: Context
    ) -> pb.ConsumeBatchResponse:
        items = request.items
        outcomes = await self.metering.consume_many(
            principal().tenant, [convert.consume_item(item) for item in items]
        )
        return pb.ConsumeBatchResponse(
            results=[
                convert.consume_result_pb(item.request_id, outcome)
                for item, outcome in zip(items, outcomes, strict=True)
            ]
        )

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        quantity, amount = convert.how_much(request)
        result = await self.metering.check(
            principal().tenant, request.account_id, request.feature, quantity=quantity,
            amount=amount,
        )  # fmt: skip
        return convert.check_response_pb(result)

    async def CheckBatch(
        self, request: pb.CheckBatchRequest, context: Context
    ) -> pb.CheckBatchResponse:
        outcomes = await self.metering.check_many(
            principal().tenant, [convert.check_item(item) for item in request.items]
        )
        return pb.CheckBatchResponse(results=[convert.check_result_pb(o) for o in outcomes])

    @staticmethod
    async def _meter_result(entry: _MeterEntry) -> pb.ConsumeResult:
        """One Meter item's result: its charge's outcome, or the error of an item whose
        bytes were not a valid message (its result has no request id: none could be read).
        """
        if isinstance(entry, Undecodable):
            return convert.consume_result_pb("", entry.error)
        request_id, charge = entry
        try:
            outcome: ConsumeResult | CreditError = await charge
        except CreditError as error:
            outcome = error
        return convert.consume_result_pb(request_id, outcome)

    async def Meter(
        self, request_iterator: AsyncIterator[pb.MeterRequest | Undecodable], context: Context
    ) -> AsyncIterator[pb.MeterResponse]:
        """Read, charge, write: each request read is queued on the stream's charges
        (domain MeterStream: what has arrived meanwhile goes as one batch per round trip,
        one in flight at a time), and the answers are written in order; an item that
        fails (or a batch refused as a whole) is a failed result and the stream goes on.

        A request holds a slot of the window from before it is read until its response
        has been written; writing awaits HTTP/2 flow control, so a client that stops
        reading holds every slot and the reader stops reading (and the client's writes
        then block in turn). Memory per stream is bounded by the window.
        """
        window = asyncio.Semaphore(METER_WINDOW)
        charges = self.metering.meter_stream(principal().tenant)
        queued: asyncio.Queue[_MeterEntry | None] = asyncio.Queue()

        async def read() -> None:
            requests = aiter(request_iterator)
            try:
                while True:
                    await window.acquire()  # before reading: the window bounds the reader
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        return
                    if isinstance(request, Undecodable):
                        queued.put_nowait(request)
                    else:
                        item = convert.consume_item(request.consume)
                        queued.put_nowait((item.request_id, charges.enqueue(item)))
            finally:
                queued.put_nowait(None)

        def cancel(entry: _MeterEntry | None) -> None:
            if entry is not None and not isinstance(entry, Undecodable):
                entry[1].cancel()

        reader = asyncio.create_task(read(), name="meter-reader")
        pending: _MeterEntry | None = None
        try:
            while (pending := await queued.get()) is not None:
                yield pb.MeterResponse(result=await self._meter_result(pending))
                window.release()
            await reader  # raise the reader's error, if it failed
        finally:
            reader.cancel()
            cancel(pending)
            while not queued.empty():
                cancel(queued.get_nowait())

    # --- call sessions ---------------------------------------------------------------
    async def StartSession(
        self, request: pb.StartSessionRequest, context: Context
    ) -> pb.StartSessionResponse:
        v = Violations()
        step = await self.sessions.start(
            principal().tenant,
            request.account_id,
            request.feature,
            request.session_id,
            requested_s=(
                request.requested_seconds if request.HasField("requested_seconds") else None
            ),
            policy=convert.timeout_policy(request.timeout_policy, v),
            violations=v,
        )
        s = step.session
        return pb.StartSessionResponse(
            session=convert.session_pb(s),
            granted_seconds=s.granted_seconds,
            valid_until=convert.timestamp(s.valid_until_ms),
            final_unit=s.final_unit,
            balance=step.balance,
        )

    async def UpdateSession(
        self, request: pb.UpdateSessionRequest, context: Context
    ) -> pb.UpdateSessionResponse:
        step = await self.sessions.update(
            principal().tenant,
            request.account_id,
            request.session_id,
            request.sequence,
            request.used_seconds,
            requested_s=(
                request.requested_seconds if request.HasField("requested_seconds") else None
            ),
        )
        s = step.session
        return pb.UpdateSessionResponse(
            session=convert.session_pb(s),
            charged_amount=step.charged,
            granted_seconds=s.granted_seconds,
            valid_until=convert.timestamp(s.valid_until_ms),
            final_unit=s.final_unit,
            balance=step.balance,
        )

    async def EndSession(
        self, request: pb.EndSessionRequest, context: Context
    ) -> pb.EndSessionResponse:
        step = await self.sessions.end(
            principal().tenant,
            request.account_id,
            request.session_id,
            request.sequence,
            request.used_seconds,
        )
        return pb.EndSessionResponse(
            session=convert.session_pb(step.session),
            charged_amount=step.charged,
            released_amount=step.released,
            balance=step.balance,
        )

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        view = await self.sessions.get(principal().tenant, request.account_id, request.session_id)
        return pb.GetSessionResponse(session=convert.session_pb(view))

    async def GetBalance(
        self, request: pb.GetBalanceRequest, context: Context
    ) -> pb.GetBalanceResponse:
        view = await self.metering.get_balance(principal().tenant, request.account_id)
        return pb.GetBalanceResponse(
            balance=view.balance,
            lots=[convert.lot_pb(lot) for lot in view.lots],
            unlimited=view.unlimited,
            reserved=view.reserved,
            debt=view.debt,
            overdraft_limit=view.overdraft_limit,
        )

    async def SetBalance(
        self, request: pb.SetBalanceRequest, context: Context
    ) -> pb.SetBalanceResponse:
        result = await self.metering.set_balance(
            principal().tenant,
            request.account_id,
            request.amount,
            reset=request.reset,
            request_id=request.request_id,
            reference=request.reference,
        )
        response = pb.SetBalanceResponse(balance=result.balance, removed=result.removed)
        if result.lot is not None:
            response.lot.CopyFrom(convert.lot_pb(result.lot))
        return response

    async def GetUsage(self, request: pb.GetUsageRequest, context: Context) -> pb.GetUsageResponse:
        view = await self.metering.get_usage(principal().tenant, request.account_id)
        return pb.GetUsageResponse(
            total=view.total,
            used=view.used,
            remaining=view.remaining,
            expired=view.expired,
            removed=view.removed,
            refunded=view.refunded,
            unlimited=view.unlimited,
            features=[
                pb.FeatureUsage(feature=f.feature, credits=f.credits, units=f.units)
                for f in view.features
            ],
            limits=[convert.limit_status_pb(s) for s in view.limits],
            debt=view.debt,
            overdraft_limit=view.overdraft_limit,
        )

    async def SetRate(self, request: pb.SetRateRequest, context: Context) -> pb.SetRateResponse:
        if not request.HasField("rate"):
            raise InvalidRequest([("rate", "required")])
        rate = request.rate
        v = Violations()
        increment = None
        if rate.HasField("billing_increment"):
            ms = convert.duration_ms(rate.billing_increment, "rate.billing_increment", v)
            if ms is not None and ms % 1000:
                v.add("rate.billing_increment", "must be whole seconds")
            elif ms is not None:
                increment = ms // 1000
        stored = await self.metering.set_rate(
            principal().tenant,
            rate.feature,
            rate.credits_per_unit,
            request_id=request.request_id,
            unit=convert.rate_unit(rate.unit, v),
            billing_increment_s=increment,
            violations=v,
        )
        return pb.SetRateResponse(rate=convert.rate_pb(stored))

    async def ListRates(
        self, request: pb.ListRatesRequest, context: Context
    ) -> pb.ListRatesResponse:
        rates = self.metering.list_rates(principal().tenant)
        return pb.ListRatesResponse(rates=[convert.rate_pb(r) for r in rates])

    async def SetAccountOptions(
        self, request: pb.SetAccountOptionsRequest, context: Context
    ) -> pb.SetAccountOptionsResponse:
        options = await self.metering.set_account_options(
            principal().tenant,
            request.account_id,
            request_id=request.request_id,
            unlimited=request.unlimited if request.HasField("unlimited") else None,
            time_zone=request.time_zone if request.HasField("time_zone") else None,
            ignore_usage_limits=(
                request.ignore_usage_limits if request.HasField("ignore_usage_limits") else None
            ),
            overdraft_limit=(
                request.overdraft_limit if request.HasField("overdraft_limit") else None
            ),
        )
        return pb.SetAccountOptionsResponse(
            options=pb.AccountOptions(
                unlimited=options.unlimited,
                time_zone=options.time_zone,
                ignore_usage_limits=options.ignore_usage_limits,
                overdraft_limit=options.overdraft_limit,
            )
        )

    async def SetUsageLimit(
        self, request: pb.SetUsageLimitRequest, context: Context
    ) -> pb.SetUsageLimitResponse:
        v = Violations()
        limit = request.limit
        period = convert.limit_period(limit.period, v)
        unit = convert.limit_unit(limit.unit, v)
        stored = await self.metering.set_usage_limit(
            principal().tenant,
            request.account_id,
            limit.feature,
            period,
            None if request.remove else limit.limit,
            unit,
            request_id=request.request_id,
            violations=v,
        )
        response = pb.SetUsageLimitResponse()
        if stored is not None:
            response.limit.CopyFrom(convert.usage_limit_pb(stored))
        return response

    async def ListUsageLimits(
        self, request: pb.ListUsageLimitsRequest, context: Context
    ) -> pb.ListUsageLimitsResponse:
        statuses = await self.metering.usage_limits(principal().tenant, request.account_id)
        return pb.ListUsageLimitsResponse(limits=[convert.limit_status_pb(s) for s in statuses])

    async def SetRechargePolicy(
        self, request: pb.SetRechargePolicyRequest, context: Context
    ) -> pb.SetRechargePolicyResponse:
        applying = await self.recharges.set_policy(
            principal().tenant,
            request.account_id,
            threshold=request.policy.threshold,
            pack_id=request.policy.pack_id,
            remove=request.remove,
            disable=request.disable,
            request_id=request.request_id,
        )
        response = pb.SetRechargePolicyResponse()
        convert.recharge_applying_pb(applying, response)
        return response

    async def GetRechargePolicy(
        self, request: pb.GetRechargePolicyRequest, context: Context
    ) -> pb.GetRechargePolicyResponse:
        applying = await self.recharges.get_policy(principal().tenant, request.account_id)
        response = pb.GetRechargePolicyResponse()
        convert.recharge_applying_pb(applying, response)
        return response

    async def ListTransactions(
        self, request: pb.ListTransactionsRequest, context: Context
    ) -> pb.ListTransactionsResponse:
        f = request.filter
        v = Violations()
        kinds: list[str] = []
        if v.count("filter.kinds", len(f.kinds), MAX_FILTER_KINDS, "kinds"):
            for i, k in enumerate(f.kinds):
                kind = convert.transaction_kind(k, f"filter.kinds[{i}]", v)
                if kind is not None:
                    kinds.append(kind)
        query = TxnQuery(
            kinds=tuple(kinds),
            features=tuple(f.features),
            start_ms=(
                convert.timestamp_ms(f.start_time, "filter.start_time", v)
                if f.HasField("start_time")
                else None
            ),
            end_ms=(
                convert.timestamp_ms(f.end_time, "filter.end_time", v)
                if f.HasField("end_time")
                else None
            ),
        )
        page = await self.history.list_transactions(
            principal().tenant, request.account_id, query, request.page_size, request.page_token,
            violations=v,
        )  # fmt: skip
        return pb.ListTransactionsResponse(
            transactions=[convert.transaction_pb(t) for t in page.transactions],
            next_page_token=page.next_page_token,
        )

    async def GetUsageReport(
        self, request: pb.GetUsageReportRequest, context: Context
    ) -> pb.GetUsageReportResponse:
        v = Violations()
        period = _PERIODS.get(request.group_by)
        if period is None:
            v.add("group_by", f"unknown value {request.group_by}")
        rows = await self.history.usage_report(
            principal().tenant,
            request.account_id or None,
            convert.timestamp_ms(request.start_time, "start_time", v)
            if request.HasField("start_time")
            else None,
            convert.timestamp_ms(request.end_time, "end_time", v)
            if request.HasField("end_time")
            else None,
            period or Period.DAY,
            request.feature or None,
            violations=v,
        )
        return pb.GetUsageReportResponse(
            rows=[
                pb.UsageReportRow(
                    period=r.period, feature=r.feature, credits=r.credits, units=r.units
                )
                for r in rows
            ]
        )

    async def GetLedgerStatus(
        self, request: pb.GetLedgerStatusRequest, context: Context
    ) -> pb.GetLedgerStatusResponse:
        status = await self.ledger_status()
        response = pb.GetLedgerStatusResponse(
            backlog=status.backlog,
            backlog_cap=status.backlog_cap,
            events_flushed=status.events_flushed,
            accepting_changes=status.accepting_changes,
            ledger_state=(
                pb.LEDGER_STATE_REACHABLE
                if status.ledger_reachable
                else pb.LEDGER_STATE_UNREACHABLE
            ),
        )
        response.flush_lag.FromMilliseconds(status.flush_lag_ms)
        if status.unreachable_since_ms is not None:
            response.unreachable_since.FromMilliseconds(status.unreachable_since_ms)
        return response

    async def VoidGrant(
        self, request: pb.VoidGrantRequest, context: Context
    ) -> pb.VoidGrantResponse:
        r = await self.purchases.void_grant(
            principal().tenant, request.account_id, request.lot_id, request.reason,
            request.request_id,
        )  # fmt: skip
        return pb.VoidGrantResponse(voided=r.voided, spent=r.spent, balance=r.balance)

    async def WatchBalance(
        self, request: pb.WatchBalanceRequest, context: Context
    ) -> AsyncIterator[pb.WatchBalanceResponse]:
        async with self.alerts.watch(
            principal().tenant, request.account_id, list(request.thresholds), request.resume_token
        ) as alerts:
            # The headers tell the client the watch is in place: every later change is seen.
            await context.send_initial_metadata(())
            async for alert in alerts:
                yield convert.alert_pb(alert)
