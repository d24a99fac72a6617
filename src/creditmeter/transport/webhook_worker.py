"""The webhook delivery worker: POSTs the JSON bodies of webhook events
(transport/webhooks.py) to the endpoints that want them.

The worker, in every server that runs background jobs, each round:
1. fans out the ledger's webhook notices into deliveries (one per endpoint that wants the
   event; ids fixed by endpoint and event, so two servers fanning one notice out make each
   delivery once) and removes the notices, in one ledger transaction;
2. marks pending purchases past their expiry expired (every WEBHOOK_EXPIRY_SWEEP_S), which
   writes their purchase.expired notices, and removes deliveries done for longer than
   `retention_s` (30 days);
3. claims the deliveries due with a lease (a server that dies mid-attempt leaves the
   delivery to be claimed again once the lease lapses: at least once) and POSTs each, at
   most `concurrency` at a time per endpoint, each attempt given `timeout_s`. A 2xx is
   delivered; anything else is tried again after an exponential, jittered delay, until
   the delivery is `retry_window_s` old. An endpoint whose every attempt has failed for
   `disable_after_s` is disabled, with a WARNING and creditmeter_webhook_endpoints_disabled.

Attempts run on the event loop as async HTTP calls: a slow receiver holds only its own
connections, never a metering call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import httpx

from creditmeter import metrics
from creditmeter.constants import (
    WEBHOOK_BATCH,
    WEBHOOK_DELIVERY_RETENTION_S,
    WEBHOOK_DISABLE_AFTER_S,
    WEBHOOK_ENDPOINT_CONCURRENCY,
    WEBHOOK_EXPIRY_SWEEP_S,
    WEBHOOK_POLL_S,
    WEBHOOK_RETRY_BASE_S,
    WEBHOOK_RETRY_MAX_S,
    WEBHOOK_RETRY_WINDOW_S,
    WEBHOOK_TIMEOUT_S,
)
from creditmeter.domain.clock import Clock
from creditmeter.domain.model import Delivery, WebhookRow
from creditmeter.domain.webhooks import (
    SIGNATURE_HEADER,
    DeliveryStatus,
    WebhookEvent,
    delivery_id_of,
    events_for,
    retry_delay_s,
    signature,
)
from creditmeter.errors import BackendUnavailable
from creditmeter.storage.config_store import ConfigStore
from creditmeter.storage.ledger.base import Ledger
from creditmeter.storage.ledger.connection import failure_text
from creditmeter.transport.webhooks import body_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebhookTimings:
    """The delivery worker's clock: constants.py's, or shorter in tests."""

    poll_s: float = WEBHOOK_POLL_S
    retry_base_s: float = WEBHOOK_RETRY_BASE_S
    retry_max_s: float = WEBHOOK_RETRY_MAX_S
    retry_window_s: float = WEBHOOK_RETRY_WINDOW_S
    timeout_s: float = WEBHOOK_TIMEOUT_S
    concurrency: int = WEBHOOK_ENDPOINT_CONCURRENCY
    disable_after_s: float = WEBHOOK_DISABLE_AFTER_S
    expiry_sweep_s: float = WEBHOOK_EXPIRY_SWEEP_S
    retention_s: float = WEBHOOK_DELIVERY_RETENTION_S

    @property
    def lease_ms(self) -> int:
        """How long a claimed delivery is this worker's: room for its turn at the endpoint
        and its attempt (one that would outlast the lease is left for the next claim). A
        server killed mid-attempt leaves its deliveries to others after this."""
        return int((self.timeout_s * 3 + 5) * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


class WebhookWorker:
    """Fans notices out and delivers them (see the module docstring). Several, in several
    processes, may run at once."""

    def __init__(
        self,
        ledger: Ledger,
        config: ConfigStore,
        clock: Clock,
        timings: WebhookTimings,
        now_ms: Callable[[], int] = wall_ms,
        rng: random.Random | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.clock = clock
        self.timings = timings
        #: Delivery scheduling runs on the wall clock (network time), not the domain clock.
        self.now_ms = now_ms
        self.rng = rng or random.Random()
        self._endpoints: dict[tuple[str, str], WebhookRow] = {}
        self._gates: dict[tuple[str, str], asyncio.Semaphore] = {}
        self._inflight: set[asyncio.Task[None]] = set()
        self._swept_at = -float("inf")
        self._http: httpx.AsyncClient | None = None

    async def run(self, stopping: asyncio.Event, ledger_up: Callable[[], bool]) -> None:
        """Round after round until `stopping`; a failed round is logged and tried again."""
        self._http = httpx.AsyncClient(follow_redirects=False)
        try:
            while not stopping.is_set():
                if ledger_up():
                    try:
                        await self.round()
                    except BackendUnavailable as error:
                        log.warning("webhook round failed: %s", failure_text(error))
                    except Exception:
                        log.warning("webhook round failed", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), self.timings.poll_s)
        finally:
            for task in list(self._inflight):
                task.cancel()
            if self._inflight:
                await asyncio.wait(self._inflight, timeout=1.0)
            await self._http.aclose()

    async def round(self) -> None:
        await self._refresh_endpoints()
        await self.fan_out()
        if time.monotonic() - self._swept_at >= self.timings.expiry_sweep_s:
            self._swept_at = time.monotonic()
            await self.ledger.expire_purchases(self.clock.now_ms(), WEBHOOK_BATCH)
            retained_from = self.now_ms() - int(self.timings.retention_s * 1000)
            await self.ledger.prune_deliveries(retained_from, WEBHOOK_BATCH)
        await self.deliver_due()

    async def _refresh_endpoints(self) -> None:
        rows = await asyncio.to_thread(self.config.webhook_endpoints)
        self._endpoints = {(r.tenant, r.endpoint_id): r for r in rows}

    async def fan_out(self) -> int:
        """Notices into deliveries, a batch at a time; returns the deliveries made."""
        made = 0
        while True:
            notices = await self.ledger.pending_notices(WEBHOOK_BATCH)
            if not notices:
                return made
            by_tenant: dict[str, list[WebhookRow]] = {}
            for endpoint in self._endpoints.values():
                if not endpoint.disabled:
                    by_tenant.setdefault(endpoint.tenant, []).append(endpoint)
            deliveries = [
                self._delivery(endpoint, event)
                for notice in notices
                for endpoint in by_tenant.get(notice.tenant, ())
                for event in events_for(notice, endpoint)
            ]
            await self.ledger.fan_out([n.notice_id for n in notices], deliveries)
            made += len(deliveries)
            if len(notices) < WEBHOOK_BATCH:
                return made

    def _delivery(self, endpoint: WebhookRow, event: WebhookEvent) -> Delivery:
        return Delivery(
            delivery_id=delivery_id_of(endpoint.endpoint_id, event.event_id),
            tenant=event.tenant, endpoint_id=endpoint.endpoint_id, event_id=event.event_id,
            event_type=str(event.type), body=body_of(event), status=DeliveryStatus.PENDING,
            attempts=0, create_ms=self.now_ms(), next_attempt_ms=0,
        )  # fmt: skip

    async def deliver_due(self) -> None:
        """Claim what is due (as many as there is room for) and attempt each in a task."""
        room = WEBHOOK_BATCH - len(self._inflight)
        if room <= 0:
            return
        claimed = await self.ledger.claim_deliveries(self.now_ms(), self.timings.lease_ms, room)
        for delivery in claimed:
            task = asyncio.create_task(self._attempt(delivery), name="webhook-attempt")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the attempts in flight (tests)."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout_s)

    async def _attempt(self, d: Delivery) -> None:
        try:
            await self._attempt_once(d)
        except asyncio.CancelledError:
            raise
        except Exception:  # the lease lapses and another round tries again
            log.warning("webhook delivery %s failed to record", d.delivery_id, exc_info=True)

    async def _attempt_once(self, d: Delivery) -> None:
        key = (d.tenant, d.endpoint_id)
        endpoint = self._endpoints.get(key)
        if endpoint is None or endpoint.disabled:
            why = "endpoint deleted" if endpoint is None else "endpoint disabled"
            metrics.record_webhook_delivery_failed()
            await self.ledger.record_attempt(
                replace(d, status=DeliveryStatus.FAILED, last_error=why)
            )
            return
        gate = self._gates.setdefault(key, asyncio.Semaphore(self.timings.concurrency))
        async with gate:
            if self.now_ms() + self.timings.timeout_s * 1000 > d.lease_until_ms:
                return  # waited its turn too long: the lease may lapse mid-attempt
            outcome, code, error = await self._post(endpoint, d.body)
        now = self.now_ms()
        attempts = d.attempts + 1
        if outcome == "delivered":
            after = replace(
                d, status=DeliveryStatus.DELIVERED, attempts=attempts, last_attempt_ms=now,
                last_status_code=code, last_error="",
            )  # fmt: skip
        else:
            delay_ms = int(
                retry_delay_s(attempts, self.timings.retry_base_s, self.timings.retry_max_s,
                              self.rng) * 1000
            )  # fmt: skip
            given_up = now + delay_ms - d.create_ms > self.timings.retry_window_s * 1000
            if given_up:
                metrics.record_webhook_delivery_failed()
            after = replace(
                d, status=DeliveryStatus.FAILED if given_up else DeliveryStatus.PENDING,
                attempts=attempts, next_attempt_ms=now + delay_ms, last_attempt_ms=now,
                last_status_code=code, last_error=error,
            )  # fmt: skip
        metrics.record_webhook_attempt(outcome)
        await self.ledger.record_attempt(after)
        await self._health(endpoint, outcome == "delivered", now)

    async def _post(self, endpoint: WebhookRow, body: str) -> tuple[str, int, str]:
        """(outcome, HTTP status or 0, error text) of one POST."""
        assert self._http is not None
        raw = body.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "creditmeter-webhooks",
            SIGNATURE_HEADER: signature(endpoint.secret, raw, int(time.time())),
        }
        try:
            reply = await self._http.post(
                endpoint.url, content=raw, headers=headers, timeout=self.timings.timeout_s
            )
        except httpx.TimeoutException:
            return "timeout", 0, "timeout"
        except httpx.HTTPError as error:
            return "network_error", 0, f"{type(error).__name__}: {error}"[:200]
        if 200 <= reply.status_code < 300:
            return "delivered", reply.status_code, ""
        return "http_error", reply.status_code, f"HTTP {reply.status_code}"

    async def _health(self, endpoint: WebhookRow, ok: bool, now: int) -> None:
        """Keep since when the endpoint fails; disable it once that is too long."""
        key = (endpoint.tenant, endpoint.endpoint_id)
        current = self._endpoints.get(key, endpoint)
        since = current.failing_since_ms
        reason = ""
        if ok:
            if since is None:
                return
            failing: int | None = None
        elif since is None:
            failing = now
        elif now - since >= self.timings.disable_after_s * 1000:
            failing = since
            reason = f"every delivery failed for {(now - since) // 1000} s"
            log.warning(
                "webhook endpoint %s of tenant %s disabled: %s", endpoint.endpoint_id,
                endpoint.tenant, reason,
            )  # fmt: skip
            metrics.record_webhook_endpoint_disabled()
        else:
            return
        self._endpoints[key] = replace(
            current, failing_since_ms=failing, disabled=current.disabled or bool(reason),
            disabled_reason=reason or current.disabled_reason,
        )  # fmt: skip
        await asyncio.to_thread(
            self.config.set_webhook_health, endpoint.tenant, endpoint.endpoint_id, failing, reason
        )

