# Generated from client/aio.py by scripts/gen-sync-client (unasync); do not edit.
# Change aio.py and run scripts/gen-sync-client (scripts/gen-proto runs it too).
# UP028: `for x in page: yield x` is what an async generator must write.
# ruff: noqa: UP028
"""The blocking client: `AsyncClient`'s methods without await, over a blocking gRPC channel
(thread-safe, as the channel is). Every method sends the API key and a deadline, fills in a
request id for mutating calls when none is given (the same id on every retry), retries as
`creditmeter.client.retry` describes, and raises `creditmeter.client.errors` exceptions."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc
from google.protobuf.message import Message

from creditmeter.api.credits.v1 import credits_pb2 as pb
from creditmeter.api.credits.v1 import credits_pb2_grpc as pb_grpc
from creditmeter.api.credits.v1 import packs_pb2, packs_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from creditmeter.client import requests as rq
from creditmeter.client.channels import (
    PACKS_METHODS,
    WEBHOOKS_METHODS,
    auth_metadata,
    open_channel,
)
from creditmeter.client.errors import from_rpc_error
from creditmeter.client.retry import RetryPolicy
from creditmeter.client.sessions import CallSession, FinalUnitCallback
from creditmeter.constants import CLIENT_DEFAULT_TIMEOUT_S

R = TypeVar("R", bound=Message)
log = logging.getLogger("creditmeter.client")


class Client:
    """A creditmeter client over one gRPC channel (AsyncClient: a `grpc.aio` channel; Client:
    a blocking one, thread-safe as the channel is).

    `timeout` is the deadline of each attempt in seconds; `retry` bounds the attempts."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        timeout: float = CLIENT_DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = auth_metadata(api_key)
        self._channel = open_channel(target, credentials, options)
        self._credits = pb_grpc.CreditsStub(self._channel)
        self._packs = packs_pb2_grpc.PacksStub(self._channel)
        self._webhooks = webhooks_pb2_grpc.WebhooksStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(
        self, method: str, request: Message, response_type: type[R], timeout: float | None = None
    ) -> R:
        """Call any unary RPC by name (Credits, Packs, Webhooks) with auth, deadline, retries."""
        idempotent = rq.with_request_id(request)
        stub = (
            self._packs
            if method in PACKS_METHODS
            else self._webhooks
            if method in WEBHOOKS_METHODS
            else self._credits
        )
        rpc = getattr(stub, method)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = rpc(
                    request, metadata=self._metadata, timeout=timeout or self.timeout
                )
                assert isinstance(response, response_type)
                return response
            except grpc.RpcError as error:  # grpc.aio.AioRpcError is one
                code = error.code()
                if not self.retry.should_retry(code, attempt, idempotent):
                    raise from_rpc_error(error, attempt) from error
            delay = self.retry.backoff_s(attempt)
            log.info(
                "%s attempt %d failed with %s; retrying in %.3f s",
                method, attempt, code.name, delay,
            )  # fmt: skip
            time.sleep(delay)

    # --- Credits ----------------------------------------------------------------------
    def grant(
        self,
        account_id: str,
        amount: int,
        *,
        expires_at: datetime | None = None,
        valid_for: timedelta | float | None = None,
        priority: int | None = None,
        source: rq.LotSourceName = "manual",
        reference: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.GrantResponse:
        """Add a lot of credits to an account."""
        req = rq.grant(
            account_id, amount, expires_at=expires_at, valid_for=valid_for, priority=priority,
            source=source, reference=reference, request_id=request_id,
        )  # fmt: skip
        return self.call("Grant", req, pb.GrantResponse, timeout)

    def consume(
        self,
        account_id: str,
        feature: str,
        *,
        quantity: int | None = None,
        amount: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.ConsumeResponse:
        """Charge an account for `quantity` units of `feature` (or exactly `amount`)."""
        req = rq.consume(
            account_id, feature, quantity=quantity, amount=amount, request_id=request_id
        )
        return self.call("Consume", req, pb.ConsumeResponse, timeout)

    def check(
        self,
        account_id: str,
        feature: str,
        *,
        quantity: int | None = None,
        amount: int | None = None,
        timeout: float | None = None,
    ) -> pb.CheckResponse:
        """What `consume` of the same item would decide now, changing nothing: `allowed`,
        the `amount` it would cost, the spendable `balance`, and when not allowed the
        error Consume would give (`denial`: its reason and metadata)."""
        req = rq.check(account_id, feature, quantity=quantity, amount=amount)
        return self.call("Check", req, pb.CheckResponse, timeout)

    def check_batch(
        self, items: Iterable[pb.CheckRequest], *, timeout: float | None = None
    ) -> pb.CheckBatchResponse:
        """Check 1 to 1,000 items (build each with `creditmeter.client.check_request`) in
        one call; one result per item, in order: its CheckResponse, or its error when the
        item is invalid."""
        req = pb.CheckBatchRequest(items=list(items))
        return self.call("CheckBatch", req, pb.CheckBatchResponse, timeout)

    def get_balance(
        self, account_id: str, *, timeout: float | None = None
    ) -> pb.GetBalanceResponse:
        """The spendable balance and live lots."""
        req = pb.GetBalanceRequest(account_id=account_id)
        return self.call("GetBalance", req, pb.GetBalanceResponse, timeout)

    def set_balance(
        self,
        account_id: str,
        amount: int,
        *,
        reset: bool = False,
        reference: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SetBalanceResponse:
        """Add credits, or with `reset` remove all credit and set the balance."""
        req = rq.set_balance(
            account_id, amount, reset=reset, reference=reference, request_id=request_id
        )
        return self.call("SetBalance", req, pb.SetBalanceResponse, timeout)

    def get_usage(
        self, account_id: str, *, timeout: float | None = None
    ) -> pb.GetUsageResponse:
        """Totals granted, used and remaining, overall and per feature."""
        req = pb.GetUsageRequest(account_id=account_id)
        return self.call("GetUsage", req, pb.GetUsageResponse, timeout)

    def set_rate(
        self,
        feature: str,
        credits_per_unit: int,
        *,
        unit: rq.RateUnitName | None = None,
        billing_increment: timedelta | float | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SetRateResponse:
        """Set the price of one feature."""
        req = rq.set_rate(
            feature, credits_per_unit, unit=unit, billing_increment=billing_increment,
            request_id=request_id,
        )  # fmt: skip
        return self.call("SetRate", req, pb.SetRateResponse, timeout)

    def list_rates(self, *, timeout: float | None = None) -> pb.ListRatesResponse:
        """The whole rate card."""
        return self.call("ListRates", pb.ListRatesRequest(), pb.ListRatesResponse, timeout)

    def set_account_options(
        self,
        account_id: str,
        *,
        unlimited: bool | None = None,
        time_zone: str | None = None,
        ignore_usage_limits: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        overdraft_limit: int | None = None,
    ) -> pb.SetAccountOptionsResponse:
        """Change per-account options; None leaves one as it is: the unlimited flag, the
        IANA time zone its usage limits' periods count in ('' for UTC), whether usage
        limits apply to it at all, and the overdraft limit of its credit line (credits; 0
        removes it)."""
        req = rq.set_account_options(
            account_id, unlimited=unlimited, time_zone=time_zone,
            ignore_usage_limits=ignore_usage_limits, request_id=request_id,
            overdraft_limit=overdraft_limit,
        )  # fmt: skip
        return self.call("SetAccountOptions", req, pb.SetAccountOptionsResponse, timeout)

    def set_usage_limit(
        self,
        feature: str,
        period: rq.LimitPeriodName,
        limit: int | None,
        *,
        unit: rq.LimitUnitName = "units",
        account_id: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SetUsageLimitResponse:
        """Limit `feature` to `limit` units (or credits) per calendar `period`; None removes
        the limit. The tenant's default, or with `account_id` that account's own."""
        req = rq.set_usage_limit(
            feature, period, limit, unit=unit, account_id=account_id, request_id=request_id
        )
        return self.call("SetUsageLimit", req, pb.SetUsageLimitResponse, timeout)

    def list_usage_limits(
        self, account_id: str = "", *, timeout: float | None = None
    ) -> pb.ListUsageLimitsResponse:
        """The tenant's default usage limits, or with `account_id` the limits that apply to
        that account now with its usage in the current period of each."""
        req = pb.ListUsageLimitsRequest(account_id=account_id)
        return self.call("ListUsageLimits", req, pb.ListUsageLimitsResponse, timeout)

    def set_recharge_policy(
        self,
        threshold: int | None,
        pack_id: str = "",
        *,
        account_id: str = "",
        disable: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.SetRechargePolicyResponse:
        """Recharge when the spendable balance falls below `threshold`, with a pending
        purchase of `pack_id` ('' = only the recharge_due event): the tenant's default,
        or with `account_id` that account's own. None removes the policy; `disable`
        turns recharges off for the account."""
        req = rq.set_recharge_policy(
            threshold, pack_id, account_id=account_id, disable=disable, request_id=request_id
        )
        return self.call("SetRechargePolicy", req, pb.SetRechargePolicyResponse, timeout)

    def get_recharge_policy(
        self, account_id: str = "", *, timeout: float | None = None
    ) -> pb.GetRechargePolicyResponse:
        """The tenant's default recharge policy, or the one that applies to `account_id`."""
        req = pb.GetRechargePolicyRequest(account_id=account_id)
        return self.call("GetRechargePolicy", req, pb.GetRechargePolicyResponse, timeout)

    def list_transactions(
        self,
        account_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        kinds: Iterable[rq.TransactionKindName] = (),
        features: Iterable[str] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> pb.ListTransactionsResponse:
        """One page of an account's history, newest first."""
        req = rq.list_transactions(
            account_id, page_size=page_size, page_token=page_token, kinds=kinds,
            features=features, start_time=start_time, end_time=end_time,
        )  # fmt: skip
        return self.call("ListTransactions", req, pb.ListTransactionsResponse, timeout)

    def iter_transactions(
        self,
        account_id: str,
        *,
        page_size: int = 0,
        kinds: Iterable[rq.TransactionKindName] = (),
        features: Iterable[str] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        timeout: float | None = None,
    ) -> Iterator[pb.Transaction]:
        """Every transaction of an account, newest first, fetching page after page."""
        kinds, features = list(kinds), list(features)
        token = ""
        while True:
            page = self.list_transactions(
                account_id, page_size=page_size, page_token=token, kinds=kinds,
                features=features, start_time=start_time, end_time=end_time, timeout=timeout,
            )  # fmt: skip
            for transaction in page.transactions:
                yield transaction
            token = page.next_page_token
            if not token:
                return

    def get_usage_report(
        self,
        start_time: datetime,
        end_time: datetime,
        *,
        account_id: str = "",
        group_by: Literal["day", "month"] = "day",
        feature: str = "",
        timeout: float | None = None,
    ) -> pb.GetUsageReportResponse:
        """Credits and units per period and feature, for an account or the whole tenant."""
        req = rq.usage_report(
            start_time, end_time, account_id=account_id, group_by=group_by, feature=feature
        )
        return self.call("GetUsageReport", req, pb.GetUsageReportResponse, timeout)

    def void_grant(
        self,
        account_id: str,
        lot_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> pb.VoidGrantResponse:
        """Remove what is left of a lot granted by mistake."""
        req = pb.VoidGrantRequest(
            account_id=account_id, lot_id=lot_id, reason=reason, request_id=request_id or ""
        )
        return self.call("VoidGrant", req, pb.VoidGrantResponse, timeout)

    def get_ledger_status(
        self, *, timeout: float | None = None
    ) -> pb.GetLedgerStatusResponse:
        """The outbox backlog and flush lag."""
        req = pb.GetLedgerStatusRequest()
        return self.call("GetLedgerStatus", req, pb.GetLedgerStatusResponse, timeout)

    # --- call sessions ----------------------------------------------------------------
    def session(
        self,
        account_id: str,
        feature: str,
        *,
        session_id: str | None = None,
        requested_seconds: int | None = None,
        timeout_policy: rq.TimeoutPolicyName | None = None,
        on_final_unit: FinalUnitCallback | None = None,
    ) -> CallSession:
        """A call session to run with `async with` (AsyncClient) or `with` (Client): started
        on entry, kept supplied with quota, ended with the seconds used on exit (see
        `AsyncCallSession` and `CallSession`)."""
        return CallSession(
            self, account_id, feature, session_id=session_id,
            requested_seconds=requested_seconds, timeout_policy=timeout_policy,
            on_final_unit=on_final_unit,
        )  # fmt: skip

    def start_session(
        self,
        account_id: str,
        feature: str,
        session_id: str,
        *,
        requested_seconds: int | None = None,
        timeout_policy: rq.TimeoutPolicyName | None = None,
        timeout: float | None = None,
    ) -> pb.StartSessionResponse:
        """Open a call session and reserve its first quota."""
        req = rq.start_session(
            account_id, feature, session_id, requested_seconds=requested_seconds,
            timeout_policy=timeout_policy,
        )  # fmt: skip
        return self.call("StartSession", req, pb.StartSessionResponse, timeout)

    def update_session(
        self,
        account_id: str,
        session_id: str,
        sequence: int,
        used_seconds: int,
        *,
        requested_seconds: int | None = None,
        timeout: float | None = None,
    ) -> pb.UpdateSessionResponse:
        """Report seconds used since the previous report and reserve the next quota."""
        req = rq.update_session(
            account_id, session_id, sequence, used_seconds, requested_seconds=requested_seconds
        )
        return self.update_session_request(req, timeout=timeout)

    def update_session_request(
        self, request: pb.UpdateSessionRequest, *, timeout: float | None = None
    ) -> pb.UpdateSessionResponse:
        return self.call("UpdateSession", request, pb.UpdateSessionResponse, timeout)

    def end_session(
        self,
        account_id: str,
        session_id: str,
        sequence: int,
        used_seconds: int,
        *,
        timeout: float | None = None,
    ) -> pb.EndSessionResponse:
        """Report the last seconds used and release the rest of the reservation."""
        req = pb.EndSessionRequest(
            account_id=account_id, session_id=session_id, sequence=sequence,
            used_seconds=used_seconds,
        )  # fmt: skip
        return self.end_session_request(req, timeout=timeout)

    def end_session_request(
        self, request: pb.EndSessionRequest, *, timeout: float | None = None
    ) -> pb.EndSessionResponse:
        return self.call("EndSession", request, pb.EndSessionResponse, timeout)

    def get_session(
        self, account_id: str, session_id: str, *, timeout: float | None = None
    ) -> pb.GetSessionResponse:
        """A session's state."""
        req = pb.GetSessionRequest(account_id=account_id, session_id=session_id)
        return self.call("GetSession", req, pb.GetSessionResponse, timeout)

    # --- Webhooks ---------------------------------------------------------------------
    def create_webhook_endpoint(
        self,
        url: str,
        event_types: Iterable[rq.WebhookEventName],
        *,
        thresholds: Iterable[int] = (),
        description: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> webhooks_pb2.CreateWebhookEndpointResponse:
        """Register an endpoint for the event types (as named in the body, "balance.low");
        the response's `secret` is shown this once."""
        req = rq.create_webhook_endpoint(
            url, event_types, thresholds=thresholds, description=description,
            request_id=request_id,
        )  # fmt: skip
        return self.call(
            "CreateWebhookEndpoint", req, webhooks_pb2.CreateWebhookEndpointResponse, timeout
        )

    def list_webhook_endpoints(
        self, *, timeout: float | None = None
    ) -> webhooks_pb2.ListWebhookEndpointsResponse:
        req = webhooks_pb2.ListWebhookEndpointsRequest()
        return self.call(
            "ListWebhookEndpoints", req, webhooks_pb2.ListWebhookEndpointsResponse, timeout
        )

    def update_webhook_endpoint(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        event_types: Iterable[rq.WebhookEventName] | None = None,
        thresholds: Iterable[int] | None = None,
        description: str | None = None,
        disabled: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> webhooks_pb2.UpdateWebhookEndpointResponse:
        """Change the fields given (not None), and only those."""
        req = rq.update_webhook_endpoint(
            endpoint_id, url=url, event_types=event_types, thresholds=thresholds,
            description=description, disabled=disabled, request_id=request_id,
        )  # fmt: skip
        return self.call(
            "UpdateWebhookEndpoint", req, webhooks_pb2.UpdateWebhookEndpointResponse, timeout
        )

    def delete_webhook_endpoint(
        self, endpoint_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> webhooks_pb2.DeleteWebhookEndpointResponse:
        req = webhooks_pb2.DeleteWebhookEndpointRequest(
            endpoint_id=endpoint_id, request_id=request_id or ""
        )
        return self.call(
            "DeleteWebhookEndpoint", req, webhooks_pb2.DeleteWebhookEndpointResponse, timeout
        )

    def rotate_webhook_secret(
        self, endpoint_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> webhooks_pb2.RotateWebhookSecretResponse:
        """A new signing secret (the response's `secret`, shown this once)."""
        req = webhooks_pb2.RotateWebhookSecretRequest(
            endpoint_id=endpoint_id, request_id=request_id or ""
        )
        return self.call(
            "RotateWebhookSecret", req, webhooks_pb2.RotateWebhookSecretResponse, timeout
        )

    def list_webhook_deliveries(
        self,
        *,
        endpoint_id: str = "",
        status: rq.WebhookDeliveryStatusName | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> webhooks_pb2.ListWebhookDeliveriesResponse:
        """One page of deliveries, newest first."""
        req = rq.list_webhook_deliveries(
            endpoint_id=endpoint_id, status=status, page_size=page_size, page_token=page_token
        )
        return self.call(
            "ListWebhookDeliveries", req, webhooks_pb2.ListWebhookDeliveriesResponse, timeout
        )

    def resend_webhook_delivery(
        self, delivery_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> webhooks_pb2.ResendWebhookDeliveryResponse:
        """Deliver a delivery's event again, as a new delivery."""
        req = webhooks_pb2.ResendWebhookDeliveryRequest(
            delivery_id=delivery_id, request_id=request_id or ""
        )
        return self.call(
            "ResendWebhookDelivery", req, webhooks_pb2.ResendWebhookDeliveryResponse, timeout
        )

    # --- Packs ------------------------------------------------------------------------
    def create_pack(
        self,
        pack: packs_pb2.Pack,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.CreatePackResponse:
        """Define a pack for sale."""
        req = packs_pb2.CreatePackRequest(pack=pack, request_id=request_id or "")
        return self.call("CreatePack", req, packs_pb2.CreatePackResponse, timeout)

    def get_pack(
        self, pack_id: str, *, timeout: float | None = None
    ) -> packs_pb2.GetPackResponse:
        req = packs_pb2.GetPackRequest(pack_id=pack_id)
        return self.call("GetPack", req, packs_pb2.GetPackResponse, timeout)

    def list_packs(
        self,
        *,
        show_archived: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> packs_pb2.ListPacksResponse:
        """One page of the packs for sale."""
        req = packs_pb2.ListPacksRequest(
            show_archived=show_archived, page_size=page_size, page_token=page_token
        )
        return self.call("ListPacks", req, packs_pb2.ListPacksResponse, timeout)

    def delete_pack(
        self, pack_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> packs_pb2.DeletePackResponse:
        """Archive a pack."""
        req = packs_pb2.DeletePackRequest(pack_id=pack_id, request_id=request_id or "")
        return self.call("DeletePack", req, packs_pb2.DeletePackResponse, timeout)

    def purchase_pack(
        self,
        account_id: str,
        pack_id: str,
        *,
        payment_reference: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.PurchasePackResponse:
        """Record a payment and grant a pack in one step."""
        req = packs_pb2.PurchasePackRequest(
            account_id=account_id, pack_id=pack_id, payment_reference=payment_reference,
            request_id=request_id or "",
        )  # fmt: skip
        return self.call("PurchasePack", req, packs_pb2.PurchasePackResponse, timeout)

    def create_purchase(
        self,
        account_id: str,
        pack_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.CreatePurchaseResponse:
        """Start a two-step purchase (granted by complete_purchase)."""
        req = packs_pb2.CreatePurchaseRequest(
            account_id=account_id, pack_id=pack_id, request_id=request_id or ""
        )
        return self.call("CreatePurchase", req, packs_pb2.CreatePurchaseResponse, timeout)

    def complete_purchase(
        self,
        purchase_id: str,
        payment_reference: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.CompletePurchaseResponse:
        """Record the payment of a pending purchase and grant its credits."""
        req = packs_pb2.CompletePurchaseRequest(
            purchase_id=purchase_id, payment_reference=payment_reference,
            request_id=request_id or "",
        )  # fmt: skip
        return self.call("CompletePurchase", req, packs_pb2.CompletePurchaseResponse, timeout)

    def cancel_purchase(
        self, purchase_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> packs_pb2.CancelPurchaseResponse:
        req = packs_pb2.CancelPurchaseRequest(purchase_id=purchase_id, request_id=request_id or "")
        return self.call("CancelPurchase", req, packs_pb2.CancelPurchaseResponse, timeout)

    def get_purchase(
        self, purchase_id: str, *, timeout: float | None = None
    ) -> packs_pb2.GetPurchaseResponse:
        req = packs_pb2.GetPurchaseRequest(purchase_id=purchase_id)
        return self.call("GetPurchase", req, packs_pb2.GetPurchaseResponse, timeout)

    def list_purchases(
        self,
        account_id: str = "",
        *,
        status: Literal["pending", "completed", "cancelled", "expired", "refunded"] | None = None,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> packs_pb2.ListPurchasesResponse:
        """One page of purchases of an account (or of the tenant), newest first."""
        req = rq.list_purchases(
            account_id, status=status, page_size=page_size, page_token=page_token
        )
        return self.call("ListPurchases", req, packs_pb2.ListPurchasesResponse, timeout)

    def refund_purchase(
        self,
        purchase_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.RefundPurchaseResponse:
        """Remove the unspent credits of a completed purchase."""
        req = packs_pb2.RefundPurchaseRequest(
            purchase_id=purchase_id, reason=reason, request_id=request_id or ""
        )
        return self.call("RefundPurchase", req, packs_pb2.RefundPurchaseResponse, timeout)

    def subscribe(
        self,
        account_id: str,
        pack_id: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> packs_pb2.SubscribeResponse:
        """Subscribe an account to a recurring pack."""
        req = packs_pb2.SubscribeRequest(
            account_id=account_id, pack_id=pack_id, request_id=request_id or ""
        )
        return self.call("Subscribe", req, packs_pb2.SubscribeResponse, timeout)

    def get_subscription(
        self, subscription_id: str, *, timeout: float | None = None
    ) -> packs_pb2.GetSubscriptionResponse:
        req = packs_pb2.GetSubscriptionRequest(subscription_id=subscription_id)
        return self.call("GetSubscription", req, packs_pb2.GetSubscriptionResponse, timeout)

    def cancel_subscription(
        self, subscription_id: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> packs_pb2.CancelSubscriptionResponse:
        req = packs_pb2.CancelSubscriptionRequest(
            subscription_id=subscription_id, request_id=request_id or ""
        )
        return self.call(
            "CancelSubscription", req, packs_pb2.CancelSubscriptionResponse, timeout
        )
