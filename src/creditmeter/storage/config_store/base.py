"""The configuration store's interface and its rows (packs and webhook endpoints are the
domain's entities, creditmeter.domain.model).

A backend stores tenants, API keys (digests of their secrets), rate cards, packs, and the
records of config-change requests (idempotency: one change per request id, the same reply
to every retry). Configuration is not hot state: it survives the loss of Redis.

The methods are blocking: the server calls them through `asyncio.to_thread`, the CLI
directly. Every change bumps a version number in its own transaction, which running
servers poll (`domain/configuration.py`) to pick up new keys and prices within a second.

Every backend runs the same test suite (tests/test_config_store.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

# The entities are the domain's (creditmeter.domain.model); the backends still import
# these names from here.
from creditmeter.domain.model import PackRow as PackRow
from creditmeter.domain.model import WebhookRow as WebhookRow


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant: str
    role: str
    secret_hash: str
    label: str
    created_ms: int
    revoked_ms: int | None


@dataclass(frozen=True)
class RateRow:
    tenant: str
    feature: str
    credits_per_unit: int
    unit: str
    increment_s: int
    updated_ms: int


@dataclass(frozen=True)
class LimitRow:
    """A tenant's usage limit on a feature for a period (creditmeter.domain.limits):
    period day, week or month; unit units or credits."""

    tenant: str
    feature: str
    period: str
    max_usage: int
    unit: str
    updated_ms: int


@dataclass(frozen=True)
class RechargeRow:
    """A tenant's default recharge policy (creditmeter.domain.recharge): below `threshold`
    spendable credits an account is due a recharge of pack `pack_id` ('' = none)."""

    tenant: str
    threshold: int
    pack_id: str
    updated_ms: int


@dataclass(frozen=True)
class ConfigSnapshot:
    """What a running server holds of the configuration: the keys, rates, usage limits
    and default recharge policies of one version, read in one transaction."""

    version: int
    api_keys: list[KeyRow]
    rates: list[RateRow]
    limits: list[LimitRow] = field(default_factory=list)
    recharges: list[RechargeRow] = field(default_factory=list)


@dataclass(frozen=True)
class ConfigDump:
    """Every row of a store, as tuples in its tables' column order (tenants: tenant,
    created_ms; requests: tenant, request_id, fingerprint, response, created_ms): what
    moves when a deployment's configuration moves from SQLite to PostgreSQL."""

    tenants: list[tuple[str, int]]
    api_keys: list[KeyRow]
    rates: list[RateRow]
    packs: list[PackRow]
    requests: list[tuple[str, str, str, str, int]]
    limits: list[LimitRow] = field(default_factory=list)
    recharges: list[RechargeRow] = field(default_factory=list)
    webhooks: list[WebhookRow] = field(default_factory=list)

    def is_empty(self) -> bool:
        """No configuration at all (request records alone do not count)."""
        return not (
            self.tenants or self.api_keys or self.rates or self.packs or self.limits
            or self.recharges or self.webhooks
        )  # fmt: skip

    def counts(self) -> str:
        return (
            f"{len(self.tenants)} tenants, {len(self.api_keys)} API keys, {len(self.rates)}"
            f" rates,{f' {len(self.limits)} usage limits,' if self.limits else ''}"
            f"{f' {len(self.recharges)} recharge policies,' if self.recharges else ''}"
            f"{f' {len(self.webhooks)} webhook endpoints,' if self.webhooks else ''}"
            f" {len(self.packs)} packs, {len(self.requests)} request records"
        )


class ConfigStore(ABC):
    """The configuration of every tenant. Safe to use from several threads and processes
    (and, for PostgreSQL, machines) at once."""

    @dataclass(frozen=True)
    class Request:
        """Who asks for a change: its idempotency key and the digest of its parameters."""

        tenant: str
        request_id: str
        fingerprint: str
        now_ms: int
        ttl_ms: int

    @abstractmethod
    def version(self) -> int:
        """The configuration's version: it changes with every change."""

    @abstractmethod
    def snapshot(self) -> ConfigSnapshot:
        """The version, keys and rates, read together."""

    def last_known(self) -> ConfigSnapshot | None:
        """The configuration this data directory last saw, for a server that starts while
        the store does not answer; None where the store is always at hand (SQLite)."""
        return None

    # --- keys ----------------------------------------------------------------------
    @abstractmethod
    def add_key(self, row: KeyRow) -> None:
        """Store a new key (and its tenant, if new)."""

    @abstractmethod
    def revoke_key(self, key_id: str, now_ms: int) -> bool:
        """Revoke a key; False if no live key has that id."""

    @abstractmethod
    def api_keys(self, tenant: str | None = None) -> list[KeyRow]:
        """Every key (of one tenant), by creation time then id."""

    # --- rates ---------------------------------------------------------------------
    @abstractmethod
    def rates(self) -> list[RateRow]:
        """Every tenant's rates, by tenant then feature."""

    @abstractmethod
    def set_rate(self, row: RateRow, req: Request) -> tuple[str, bool]:
        """Store a rate once per request id, atomically with the record of the request.

        Returns the response (the rate's update time) and whether the call was a replay
        (then nothing changed and the first call's response is returned). Raises
        Rejected(IDEMPOTENCY_KEY_REUSED) when the id was used with other parameters.
        Request records older than the request's TTL are pruned."""

    # --- usage limits --------------------------------------------------------------
    @abstractmethod
    def usage_limits(self) -> list[LimitRow]:
        """Every tenant's usage limits, by tenant, feature, period."""

    @abstractmethod
    def set_usage_limit(
        self, tenant: str, feature: str, period: str, row: LimitRow | None, req: Request
    ) -> tuple[str, bool]:
        """Store the tenant's limit on (feature, period), or with `row` None remove it,
        once per request id, idempotent as `set_rate`. The response is the limit's update
        time ('' for a removal)."""

    # --- recharge policies -----------------------------------------------------------
    @abstractmethod
    def set_recharge_policy(
        self, tenant: str, row: RechargeRow | None, req: Request
    ) -> tuple[str, bool]:
        """Store the tenant's default recharge policy, or with `row` None remove it, once
        per request id, idempotent as `set_rate`. The response is its update time ('' for
        a removal)."""

    # --- packs ---------------------------------------------------------------------
    @abstractmethod
    def put_pack(
        self, pack_id: str, req: Request, build: Callable[[PackRow | None], PackRow]
    ) -> tuple[PackRow, bool]:
        """Write the pack `build` makes of the stored one (None for a new pack id), inside
        one write transaction, so concurrent changes of one pack never lose each other.
        Returns the pack as stored by the first call with this request id, and whether
        this call was a replay (idempotent as `set_rate`). Whatever `build` raises aborts
        the change. `build` must not call the store."""

    @abstractmethod
    def pack(self, tenant: str, pack_id: str) -> PackRow | None:
        """One pack, archived or not."""

    @abstractmethod
    def packs(
        self, tenant: str, include_inactive: bool, limit: int, after: tuple[int, str] | None
    ) -> list[PackRow]:
        """Packs by creation (create_ms, pack_id), strictly after `after` if given."""

    # --- webhook endpoints ---------------------------------------------------------
    @abstractmethod
    def put_webhook_endpoint(
        self, endpoint_id: str, req: Request, build: Callable[[WebhookRow | None], WebhookRow]
    ) -> tuple[WebhookRow, bool]:
        """Write the endpoint `build` makes of the stored one (None for a new id), in one
        write transaction, idempotent as `put_pack`; returns it as the first call stored
        it, and whether this call was a replay."""

    @abstractmethod
    def delete_webhook_endpoint(self, endpoint_id: str, req: Request) -> tuple[bool, bool]:
        """Remove the tenant's endpoint once per request id: (whether there was one, as
        the first call found it; whether this call was a replay)."""

    @abstractmethod
    def webhook_endpoints(self, tenant: str | None = None) -> list[WebhookRow]:
        """Every endpoint (of one tenant), by creation time then id."""

    @abstractmethod
    def set_webhook_health(
        self, tenant: str, endpoint_id: str, failing_since_ms: int | None, disable_reason: str
    ) -> None:
        """Record since when deliveries to an endpoint fail (None: it answers again); a
        non-empty `disable_reason` also disables it. Not a request: the delivery worker's
        own bookkeeping."""

    # --- lifetime ------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 (a backend with nothing to release keeps it)
        """Release connections and threads; the store is not used afterwards."""

    def __enter__(self) -> ConfigStore:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


#: The request of a config change (`ConfigStore.Request`), by its own name.
Request = ConfigStore.Request
