"""Page tokens (AIP-158) of every paged listing: the position after the last item and the
listing's scope (its filters), as URL-safe base64 of a JSON object. One codec; each
listing names its fields (kept as each wrote them before, so tokens stay valid across an
upgrade)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from creditmeter.domain.validation import Violations

T = TypeVar("T")


def encode(fields: Mapping[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(dict(fields)).encode()).decode()


def decode(
    token: str,
    scope: Mapping[str, object],
    position: Callable[[dict[str, Any]], T],
    v: Violations,
    other: str,
) -> T | None:
    """The position (`position` of the token's fields) of a token this server issued for
    a listing of the same `scope` (fields that must match); else None and a violation on
    page_token (`other` says what differs when only the scope does)."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if all(data[name] == value for name, value in scope.items()):
            return position(data)
        v.add("page_token", other)
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError):
        v.add("page_token", "not a token this server issued")
    return None


def by_creation(data: dict[str, Any]) -> tuple[int, str]:
    """The position of a listing by creation time: (create time, id of the last item)."""
    return int(data["c"]), str(data["i"])
