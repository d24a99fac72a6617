"""Server-assigned identifiers: a kind prefix, the time in ms (hex, so ids sort by
creation), and 64 random bits."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

#: The kind prefix of the transactions of call-session steps: their request records are
#: the session's own (see `storage.layout.session_request_id`), which the rebuild tells by it.
SESSION_TXN_PREFIX = "ses"


def new_id(prefix: str, now_ms: int) -> str:
    return f"{prefix}_{now_ms:011x}{secrets.token_hex(8)}"


def fingerprint(operation: str, params: Mapping[str, Any]) -> str:
    """A digest of an operation's parameters, to tell a retry from a reused request id.

    The digest is of `canonical_json(operation, params)`: stored request records hold it,
    so its bytes must never change (a retry after an upgrade must still match).
    """
    canonical = _flat_json(operation, params) or canonical_json(operation, params)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def canonical_json(operation: str, params: Mapping[str, Any]) -> str:
    """What a fingerprint digests: `[operation, params]` as compact JSON, keys sorted."""
    return json.dumps([operation, params], sort_keys=True, separators=(",", ":"))


def _json_scalar(value: Any) -> str | None:
    """`value` as json.dumps writes it, for None, str, int and bool; else None."""
    kind = type(value)
    if kind is str:
        return str(encode_basestring_ascii(value))  # json.dumps's own (ensure_ascii)
    if kind is int:
        return int.__repr__(value)  # as json.dumps (an int subclass: not here)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return None


def _flat_json(operation: str, params: Mapping[str, Any]) -> str | None:
    """`canonical_json` built by hand for the usual parameters (str keys; None, str,
    int and bool values), several times faster than json.dumps; None for anything else.
    tests/test_ids.py holds it to json.dumps's bytes."""
    parts = []
    for key in sorted(params):
        value = _json_scalar(params[key])
        if value is None or type(key) is not str:
            return None
        parts.append(f"{encode_basestring_ascii(key)}:{value}")
    return f"[{encode_basestring_ascii(operation)},{{{','.join(parts)}}}]"
