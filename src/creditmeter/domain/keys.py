"""API keys and roles.

A key reads `cm_<key id>_<secret>`. Only a SHA-256 digest of the secret is stored; the
key id finds the record and the digests are compared in constant time, so neither a
lookup nor a comparison leaks how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from creditmeter.constants import MAX_VERIFIED_KEYS
from creditmeter.errors import ApiKeyInvalid, RoleNotAllowed

_KEY_PREFIX = "cm"


class Role(StrEnum):
    ADMIN = "admin"  # everything of its tenant
    METER = "meter"  # reads and metering
    READ = "read"  # reads only


_READS = frozenset(
    {
        "GetBalance",
        "GetUsage",
        "ListRates",
        "ListTransactions",
        "GetUsageReport",
        "GetPack",
        "ListPacks",
        "GetPurchase",
        "ListPurchases",
        "GetSubscription",
        "GetSession",
        "WatchBalance",
        "Check",  # changes nothing: a price enquiry and balance check
        "CheckBatch",
        "ListUsageLimits",
        "GetRechargePolicy",
    }
)
_METERING = frozenset(
    {"Consume", "ConsumeBatch", "Meter", "StartSession", "UpdateSession", "EndSession"}
)


def role_allows(role: Role, operation: str) -> bool:
    """Whether a role may call an RPC (by method name). Anything not listed is admin-only."""
    if role is Role.ADMIN:
        return True
    if role is Role.METER:
        return operation in _READS or operation in _METERING
    return operation in _READS


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    role: Role
    secret_hash: str
    label: str
    created_ms: int
    revoked_ms: int | None = None


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant and role of a verified key."""

    tenant: str
    role: Role
    key_id: str

    def require(self, operation: str) -> None:
        if not role_allows(self.role, operation):
            raise RoleNotAllowed(
                f"a {self.role} key may not call {operation}",
                {"role": str(self.role), "method": operation},
            )


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate(tenant: str, role: Role, label: str, now_ms: int) -> tuple[str, ApiKey]:
    """A new key: the plaintext (shown once) and the record to store."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(key_id, tenant, role, hash_secret(secret), label, now_ms)
    return f"{_KEY_PREFIX}_{key_id}_{secret}", record


def _parse(plaintext: str) -> tuple[str, str] | None:
    prefix, _, rest = plaintext.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != _KEY_PREFIX or not key_id or not secret:
        return None
    return key_id, secret


class KeyRing:
    """The live (unrevoked) keys, held in memory and replaced whole on reload."""

    def __init__(self, keys: list[ApiKey] | None = None) -> None:
        self._by_id = {k.key_id: k for k in keys or [] if k.revoked_ms is None}
        #: Headers already verified, so a caller's key is hashed once, not on every call.
        #: The ring is replaced whole when keys change, and this with it: a revoked key
        #: is refused as soon as the new ring is in place.
        self._verified: dict[str, Principal] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an `authorization: Bearer <key>` header value."""
        known = self._verified.get(authorization) if authorization else None
        if known is not None:
            return known
        principal = self._verify(authorization)
        if len(self._verified) >= MAX_VERIFIED_KEYS:
            self._verified.clear()  # bounded: many keys in turn only cost their hashing
        self._verified[str(authorization)] = principal
        return principal

    def _verify(self, authorization: str | None) -> Principal:
        if not authorization:
            raise ApiKeyInvalid("missing authorization: Bearer <api key> metadata")
        scheme, _, token = authorization.partition(" ")
        parsed = _parse(token.strip()) if scheme.lower() == "bearer" else None
        record = self._by_id.get(parsed[0]) if parsed else None
        # Compare even when the id is unknown, so timing does not tell ids apart.
        expected = record.secret_hash if record else hash_secret("")
        given = hash_secret(parsed[1]) if parsed else ""
        if not hmac.compare_digest(expected, given) or record is None:
            raise ApiKeyInvalid("unknown or revoked API key")
        return Principal(record.tenant, record.role, record.key_id)
