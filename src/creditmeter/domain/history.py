"""Reading the ledger: transaction history with AIP-158 paging, and usage reports.

An account that has no state anywhere is NOT_FOUND here too, as GetBalance says. The
ledger trails Redis by the flush, and Redis may have lost what the ledger holds (before a
rebuild), so an account is known if either has it; the check runs only when the ledger
has nothing to show, so a page with rows costs no more than the query.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from creditmeter.constants import MAX_FILTER_FEATURES, MAX_FILTER_KINDS
from creditmeter.domain import pages
from creditmeter.domain.model import Period, Transaction, TxnQuery, UsageRow
from creditmeter.domain.validation import Violations
from creditmeter.errors import AccountNotFound
from creditmeter.storage.layout import AccountKeys
from creditmeter.storage.ledger.base import EVENT_KINDS, EventLog
from creditmeter.storage.redis_store import RedisStore

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_REPORT_SPAN_MS = 5 * 366 * 86_400_000
#: Kinds a filter may name.
FILTER_KINDS = EVENT_KINDS


@dataclass(frozen=True)
class Page:
    transactions: list[Transaction]
    next_page_token: str


def _query_digest(tenant: str, account_id: str, query: TxnQuery) -> str:
    raw = json.dumps([tenant, account_id, query.kinds, query.features, query.start_ms,
                      query.end_ms])  # fmt: skip
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _encode_token(before_seq: int, digest: str) -> str:
    return pages.encode({"s": before_seq, "q": digest})


def _seq(data: dict[str, Any]) -> int:
    if not isinstance(data["s"], int):
        raise TypeError("s")
    return data["s"]


def _decode_token(token: str, digest: str, v: Violations) -> int | None:
    return pages.decode(token, {"q": digest}, _seq, v, "belongs to another account or filter")


class History:
    def __init__(self, ledger: EventLog, store: RedisStore) -> None:
        self.ledger = ledger
        #: Where an account with nothing flushed yet already exists.
        self.store = store

    async def _check_known(self, tenant: str, account_id: str, *, ask_ledger: bool) -> None:
        """Raise AccountNotFound unless Redis or the ledger has the account; `ask_ledger`
        False when an unfiltered query of the ledger just found nothing of it."""
        if await self.store.account_exists(AccountKeys(tenant, account_id)):
            return
        if ask_ledger and await self.ledger.transactions(tenant, account_id, TxnQuery(), 1, None):
            return
        raise AccountNotFound.of(account_id)

    async def list_transactions(
        self,
        tenant: str,
        account_id: str,
        query: TxnQuery,
        page_size: int,
        page_token: str,
        violations: Violations | None = None,
    ) -> Page:
        """One page of an account's transactions, newest first."""
        v = Violations(violations)
        v.account_id(account_id)
        if page_size < 0:
            v.add("page_size", "must not be negative")
        if v.count("filter.kinds", len(query.kinds), MAX_FILTER_KINDS, "kinds"):
            for i, kind in enumerate(query.kinds):
                if kind not in FILTER_KINDS:
                    v.add(f"filter.kinds[{i}]", f"unknown kind {kind!r}")
        if v.count("filter.features", len(query.features), MAX_FILTER_FEATURES, "features"):
            for i, feature in enumerate(query.features):
                v.feature(feature, f"filter.features[{i}]")
        if (
            query.start_ms is not None
            and query.end_ms is not None
            and query.end_ms <= query.start_ms
        ):
            v.add("filter.end_time", "must be after start_time")
        digest = _query_digest(tenant, account_id, query)
        before = _decode_token(page_token, digest, v) if page_token else None
        v.raise_if_any()
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # One extra row tells whether another page exists.
        rows = await self.ledger.transactions(tenant, account_id, query, size + 1, before)
        if not rows and before is None:  # a page token follows a page that had rows
            await self._check_known(tenant, account_id, ask_ledger=query != TxnQuery())
        page = rows[:size]
        token = _encode_token(page[-1].seq, digest) if len(rows) > size else ""
        return Page(page, token)

    async def usage_report(
        self,
        tenant: str,
        account_id: str | None,
        start_ms: int | None,
        end_ms: int | None,
        period: Period,
        feature: str | None,
        violations: Violations | None = None,
    ) -> list[UsageRow]:
        """Credits and units consumed per period and feature, for one account (None: the
        whole tenant). An account that has no state anywhere is NOT_FOUND."""
        v = Violations(violations)
        if account_id is not None:
            v.account_id(account_id)
        if feature is not None:
            v.feature(feature)
        if start_ms is None:
            v.add("start_time", "required")
        if end_ms is None:
            v.add("end_time", "required")
        if start_ms is not None and end_ms is not None:
            if end_ms <= start_ms:
                v.add("end_time", "must be after start_time")
            elif end_ms - start_ms > MAX_REPORT_SPAN_MS:
                v.add("end_time", "a report spans at most 5 years")
        v.raise_if_any()
        assert start_ms is not None and end_ms is not None
        rows = await self.ledger.usage(tenant, account_id, start_ms, end_ms, period, feature)
        if not rows and account_id is not None:
            # Usage rows are charges in the span only: any event at all makes it known.
            await self._check_known(tenant, account_id, ask_ledger=True)
        return rows
