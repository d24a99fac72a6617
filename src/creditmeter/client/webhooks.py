"""Receiving creditmeter's webhooks: checking the `Creditmeter-Signature` header.

    from creditmeter.client.webhooks import verify_signature

    if not verify_signature(secret, request.headers["Creditmeter-Signature"], raw_body):
        return 400

The header is `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`; a body
whose `t` is older than the tolerance is refused too (a replayed request). Check the raw
bytes as received, before parsing the JSON. Deliveries are at least once: deduplicate on
the body's `id`.
"""

from __future__ import annotations

import hashlib
import hmac
import time

#: The header, and how old a signed timestamp may be (seconds).
SIGNATURE_HEADER = "Creditmeter-Signature"
DEFAULT_TOLERANCE_S = 300


def verify_signature(
    secret: str,
    header: str,
    body: bytes,
    *,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now_s: float | None = None,
) -> bool:
    """Whether `header` signs `body` with `secret`, at a time within `tolerance_s` of now.
    A header that is not of the form t=...,v1=... is not a valid signature."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            return False
        fields.setdefault(name, []).append(value)
    stamps, signatures = fields.get("t", []), fields.get("v1", [])
    if len(stamps) != 1 or not stamps[0].isdigit() or not signatures:
        return False
    now = time.time() if now_s is None else now_s
    if abs(now - int(stamps[0])) > tolerance_s:
        return False
    expected = hmac.new(
        secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    # The scheme allows several v1 values (Stripe's does): any one that matches will do.
    return any(hmac.compare_digest(expected, s) for s in signatures)
