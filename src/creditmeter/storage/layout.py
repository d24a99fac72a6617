"""The Redis key layout: the one place that turns ids into key names and back.

    cm:{bNN}:<tenant>:<account>:a               HASH   the whole account: balance, totals,
                                                       usage, options, lots, next expiry
    cm:{bNN}:<tenant>:<account>:idem:<req id>   STRING idempotency record (TTL)
    cm:{bNN}:<tenant>:<account>:sess:<id>       HASH   a call session (TTL once closed)
    cm:{bNN}:outbox                             STREAM the bucket's event outbox
    cm:{bNN}:due                                ZSET   "<tenant>:<account>" by next lot expiry
    cm:{bNN}:sessions                           ZSET   open sessions by when to close them
    cm:{bNN}:flushed                            STRING outbox entries acknowledged, ever
    cm:{bNN}:trimmed                            STRING the outbox's greatest trimmed entry id
    cm:{bNN}:acks                               STRING written before a WAIT (--replica-acks)
    cm:{bNN}:lease:<role>                       STRING which process works on the bucket
    cm:buckets                                  STRING the deployment's number of buckets

Every id in a key name is one *component*: `%`, `:` and `#` in it are percent-encoded
(`%25`, `%3A`, `%23`; a raw `#` marks a call-session step's record), so a key splits on
`:` into exactly the components it was made of, and two different (tenant, account,
request id, session id) tuples never share a key: the mapping is injective by
construction (`parse` inverts it; tests/test_hardening.py checks the round trip over
adversarial ids). Ids without `%`, `:` or `#` -- nearly all of them -- are written as
they are. Tenants are `[a-z0-9_-]` and never need it.

Upgrading from 0.1.0: its keys joined ids unencoded, and kept an account in five keys.
`legacy` reads such a key name (every split that makes sense and lands in the key's own
bucket); the store renames the few keys whose name changed, then converts each account
into its one hash, once, at start (`RedisStore.upgrade_layout`).

Hash tags: the first `{...}` of a key decides its slot, and every key starts with its bucket's
`cm:{bNN}`, so braces inside later components cannot move a key to another slot.

Bucketing rather than one hash tag per account is what lets a script append to an outbox
atomically with the balance change, and lets a batch of operations on one bucket run as
one script later, while still spreading over a Redis Cluster.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from functools import cached_property

from creditmeter.constants import DEFAULT_BUCKETS, KEY_PREFIX, MAX_BUCKETS

#: The account's one hash (layout 3): every account script takes it first, then the
#: idempotency record, the outbox and the expiry index (see _lib.lua).
ACCOUNT_KIND = "a"
ACCOUNT_KINDS = (ACCOUNT_KIND,)
#: The five keys of an account in layout 2 (release 0.1.0's, with ids encoded): lot
#: metadata, remaining credits, burn order, expiries, and the account's figures. Found at
#: start and converted into the one hash (`RedisStore.upgrade_layout`).
V2_ACCOUNT_KINDS = ("lots", "rem", "order", "exp", "acct")
#: Field prefixes and names of the account hash that are not figures (_lib.lua): a lot's
#: metadata `m:<lot id>`, its remaining credits `q:<burn key>`, and the soonest expiry.
LOT_META = "m:"
LOT_REMAINING = "q:"
NEXT_EXPIRY = "next_expiry"
#: Release 0.1.0 wrote no rolls_over flag (a lot's metadata `o`, a grant event's
#: `rolls_over`): its lots that rolled over (a subscription period's and its rollover's)
#: were those referenced by a bare subscription id. Only for data of 0.1.0 (its lot
#: metadata, its outbox entries; the same rule is ledger migration 5's, and the decoding
#: of 0.1.0's lot metadata in _lib.lua's lot_meta).
V1_ROLLS_OVER = re.compile(r"sub_[0-9A-Za-z]+")
IDEMPOTENCY_KIND = "idem"
SESSION_KIND = "sess"


def component(value: str) -> str:
    """An id as one key component: `%`, `:` and `#` percent-encoded (nothing else
    changes). A raw `#` is left to the records of call-session steps (`session_step_key`)."""
    if "%" not in value and ":" not in value and "#" not in value:
        return value
    return value.replace("%", "%25").replace(":", "%3A").replace("#", "%23")


def uncomponent(value: str) -> str:
    """The id a key component stands for (the inverse of `component`)."""
    if "%" not in value:
        return value
    return value.replace("%3A", ":").replace("%23", "#").replace("%25", "%")


def session_request_id(session_id: str, step: str) -> str:
    """The request id of one step of a call session (`<session id>#<sequence>`, or
    `#timeout` for the server's close), as events and the ledger record it. Session ids
    hold no `#`, so the two parts are always told apart."""
    return f"{session_id}#{step}"


#: The deployment's number of buckets: set once at start from what the deployment stored
#: (`use_buckets`, called by storage/deployment.py), before any key is made.
_buckets = DEFAULT_BUCKETS


def buckets() -> int:
    """How many buckets this deployment's accounts are spread over."""
    return _buckets


def use_buckets(count: int) -> None:
    """Make keys for a deployment of `count` buckets (the number it was initialised with).
    Process-wide: every process of a deployment uses the one stored number."""
    global _buckets
    if not 1 <= count <= MAX_BUCKETS:
        raise ValueError(f"buckets must be from 1 to {MAX_BUCKETS}, not {count}")
    _buckets = count


def bucket_of(tenant: str, account: str) -> int:
    """The bucket an account's keys live in."""
    return zlib.crc32(f"{tenant}\x00{account}".encode()) % _buckets


def bucket_tag(bucket: int) -> str:
    return f"{KEY_PREFIX}:{{b{bucket:02d}}}"


def outbox_key(bucket: int) -> str:
    return f"{bucket_tag(bucket)}:outbox"


def due_key(bucket: int) -> str:
    return f"{bucket_tag(bucket)}:due"


def sessions_key(bucket: int) -> str:
    return f"{bucket_tag(bucket)}:sessions"


def flushed_key(bucket: int) -> str:
    """How many of the outbox's entries have been acknowledged into the ledger, ever."""
    return f"{bucket_tag(bucket)}:flushed"


def trimmed_key(bucket: int) -> str:
    """The greatest entry id trimmed off the bucket's outbox. XINFO STREAM has it as
    max-deleted-entry-id, but Redis 7.0 updates that on XDEL only, not on XTRIM."""
    return f"{bucket_tag(bucket)}:trimmed"


def acks_key(key: str) -> str:
    """The counter `--replica-acks` writes before its WAIT, in the bucket of `key` (any key
    of the layout): a write on the node that holds that bucket."""
    return f"{key[: key.index('}') + 1]}:acks"


#: The layout version, set once the keys of an older layout have been renamed.
LAYOUT_KEY = f"{KEY_PREFIX}:layout"
LAYOUT_VERSION = "3"
#: The version after the renaming of 0.1.0's names, before the one-hash conversion.
RENAMED_VERSION = "2"
#: SCAN pattern of every key of every bucket.
ALL_BUCKETS_PATTERN = f"{KEY_PREFIX}:{{b*}}:*"

#: SCAN pattern of every account's hash (and, rarely, other keys: `parse` tells).
ACCOUNT_SCAN_PATTERN = f"{KEY_PREFIX}:{{b*}}:*:{ACCOUNT_KIND}"
#: SCAN pattern of the layout-2 accounts (their `acct` hash) to convert.
V2_ACCOUNT_SCAN_PATTERN = f"{KEY_PREFIX}:{{b*}}:*:acct"


@dataclass(frozen=True)
class AccountKeys:
    """The Redis keys of one account, in the order every account script takes them."""

    tenant: str
    account: str

    # Computed once per instance (a CRC32 and a few strings): every key below uses them.
    @cached_property
    def bucket(self) -> int:
        return bucket_of(self.tenant, self.account)

    @property
    def account_key(self) -> str:
        """The account's one hash."""
        return f"{self.base}:{ACCOUNT_KIND}"

    def v2_keys(self) -> list[str]:
        """The account's five keys of layout 2 (`V2_ACCOUNT_KINDS` order), to convert."""
        return [f"{self.base}:{kind}" for kind in V2_ACCOUNT_KINDS]

    @cached_property
    def base(self) -> str:
        return f"{bucket_tag(self.bucket)}:{self.tenant}:{component(self.account)}"

    def key(self, kind: str) -> str:
        """One of the account's own keys (`ACCOUNT_KINDS`)."""
        return f"{self.base}:{kind}"

    def idempotency_key(self, request_id: str) -> str:
        return f"{self.base}:{IDEMPOTENCY_KIND}:{component(request_id)}"

    def session_key(self, session_id: str) -> str:
        return f"{self.base}:{SESSION_KIND}:{component(session_id)}"

    def session_step_key(self, session_id: str, step: str) -> str:
        """The idempotency record of a session step: in the `idem` namespace, but with a
        raw `#` that no client request id's component has, so a client's request id
        `call-1#1` never meets the record of session `call-1`'s step 1."""
        return f"{self.base}:{IDEMPOTENCY_KIND}:{component(session_id)}#{step}"

    def script_keys(self, request_id: str = "") -> list[str]:
        return [
            self.account_key,
            self.idempotency_key(request_id),
            outbox_key(self.bucket),
            due_key(self.bucket),
        ]

    def session_keys(self, session_id: str, step: str) -> list[str]:
        """The keys of session.lua: the account's (with the step's idempotency record),
        then the session and the bucket's index."""
        keys = self.script_keys()
        keys[1] = self.session_step_key(session_id, step)
        return [*keys, self.session_key(session_id), sessions_key(self.bucket)]


@dataclass(frozen=True)
class ParsedKey:
    """What an account's key stands for: its owner, its kind, and the request or session
    id of an `idem` or `sess` key (else "")."""

    keys: AccountKeys
    kind: str
    id: str = ""
    #: An `idem` key holding a call-session step's record (id `<session id>#<step>`).
    session_step: bool = False


def parse(key: str) -> ParsedKey | None:
    """The account, kind and id of a per-account key; None for any other key (a bucket's
    own keys, a key of another layout)."""
    parts = key.split(":")
    if len(parts) not in (5, 6) or parts[0] != KEY_PREFIX:
        return None
    _prefix, tag, tenant, account, kind, *rest = parts
    if len(rest) == 0 and kind not in ACCOUNT_KINDS and kind not in V2_ACCOUNT_KINDS:
        return None
    if rest and kind not in (IDEMPOTENCY_KIND, SESSION_KIND):
        return None
    keys = AccountKeys(tenant, uncomponent(account))
    if f"{KEY_PREFIX}:{tag}" != bucket_tag(keys.bucket):
        return None
    if not rest:
        return ParsedKey(keys, kind)
    if kind == IDEMPOTENCY_KIND and "#" in rest[0]:
        session, _, step = rest[0].partition("#")
        return ParsedKey(keys, kind, session_request_id(uncomponent(session), step), True)
    return ParsedKey(keys, kind, uncomponent(rest[0]))


#: The Redis type of each kind of per-account key.
KIND_TYPES = {
    ACCOUNT_KIND: "hash", IDEMPOTENCY_KIND: "string", SESSION_KIND: "hash",
    "lots": "hash", "rem": "hash", "acct": "hash", "order": "zset", "exp": "zset",
}  # fmt: skip


def key_of(parsed: ParsedKey) -> str:
    """The key a parsed key stands for in this layout (`parse` inverted)."""
    if parsed.session_step:
        session, _, step = parsed.id.rpartition("#")
        return parsed.keys.session_step_key(session, step)
    if parsed.kind == IDEMPOTENCY_KIND:
        return parsed.keys.idempotency_key(parsed.id)
    if parsed.kind == SESSION_KIND:
        return parsed.keys.session_key(parsed.id)
    return parsed.keys.key(parsed.kind)


def legacy_key(parsed: ParsedKey) -> str:
    """What release 0.1.0 named the key `parsed` stands for (ids joined unencoded)."""
    keys = parsed.keys
    base = f"{bucket_tag(keys.bucket)}:{keys.tenant}:{keys.account}"
    if parsed.kind in (IDEMPOTENCY_KIND, SESSION_KIND):
        return f"{base}:{parsed.kind}:{parsed.id}"
    return f"{base}:{parsed.kind}"


def legacy(key: str) -> list[ParsedKey]:
    """Every reading of `key` as release 0.1.0 wrote it (ids joined with ':' unencoded)
    that lands in the bucket the key is in. More than one means 0.1.0 itself confused the
    two (the defect this layout fixes) -- or, for a request id with a '#', that it may be a
    client's request or a session step's record (the store asks whether the session is
    there)."""
    parts = key.split(":")
    if len(parts) < 5 or parts[0] != KEY_PREFIX:
        return []
    tag, tenant, rest = parts[1], parts[2], parts[3:]
    readings = []
    for i in range(1, len(rest)):
        keys = AccountKeys(tenant, ":".join(rest[:i]))
        tail = rest[i:]
        if len(tail) == 1 and tail[0] in V2_ACCOUNT_KINDS:
            reading = ParsedKey(keys, tail[0])
        elif len(tail) >= 2 and tail[0] in (IDEMPOTENCY_KIND, SESSION_KIND):
            reading = ParsedKey(keys, tail[0], ":".join(tail[1:]))
        else:
            continue
        if f"{KEY_PREFIX}:{tag}" != bucket_tag(keys.bucket):
            continue
        readings.append(reading)
        session, hashed, _ = reading.id.rpartition("#")
        if reading.kind == IDEMPOTENCY_KIND and hashed and session and "#" not in session:
            readings.append(ParsedKey(keys, IDEMPOTENCY_KIND, reading.id, True))
    return readings


# --- a lot's burn key (the field q:<burn key> of the account hash) -------------------
#: `pppp|eeeeeeeeeeeee|r|ccccccccccccc|<lot id>`: priority, expiry (ms, NEVER_EXPIRES_MS
#: for none), rank (0 promotional, 1 other), creation (ms), lot id. Fixed widths, so the
#: keys sort in burn-down order as strings; _lib.lua reads the expiry at characters 6-18
#: (burn_key_expiry) and the lot id from BURN_KEY_LOT_OFFSET (1-based), which
#: tests/test_metering.py pins to these.
BURN_KEY_EXPIRY = slice(5, 18)
BURN_KEY_LOT_OFFSET = 36


@dataclass(frozen=True)
class BurnKey:
    priority: int
    expires_at_ms: int
    rank: int
    created_ms: int
    lot_id: str

    def encode(self) -> str:
        return (
            f"{self.priority:04d}|{self.expires_at_ms:013d}|{self.rank}|"
            f"{self.created_ms:013d}|{self.lot_id}"
        )

    @classmethod
    def parse(cls, key: str) -> BurnKey:
        priority, expiry, rank, created, lot_id = key.split("|", 4)
        return cls(int(priority), int(expiry), int(rank), int(created), lot_id)
