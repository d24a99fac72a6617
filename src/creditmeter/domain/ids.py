"""Server-assigned identifiers: a kind prefix, the time in ms (hex, so ids sort by
creation), and 64 random bits."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any

#: The kind prefix of the transactions of call-session steps: their request records are
#: the session's own (see `storage.layout.session_request_id`), which the rebuild tells by it.
SESSION_TXN_PREFIX = "ses"


def new_id(prefix: str, now_ms: int) -> str:
    return f"{prefix}_{now_ms:011x}{secrets.token_hex(8)}"


def fingerprint(operation: str, params: Mapping[str, Any]) -> str:
    """A digest of an operation's parameters, to tell a retry from a reused request id."""
    canonical = json.dumps([operation, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]
