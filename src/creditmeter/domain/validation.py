"""Request validation: collects every field violation, then raises them together."""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from creditmeter.constants import (
    ACCOUNT_ID_PATTERN,
    FEATURE_PATTERN,
    MAX_CREDITS,
    MAX_FEATURE_LENGTH,
    MAX_ID_LENGTH,
    MAX_REFERENCE_LENGTH,
    SESSION_ID_PATTERN,
    TENANT_ID_PATTERN,
)
from creditmeter.errors import InvalidRequest

_ACCOUNT_ID = re.compile(ACCOUNT_ID_PATTERN)
_FEATURE = re.compile(FEATURE_PATTERN)
_TENANT_ID = re.compile(TENANT_ID_PATTERN)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)
_PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")


def valid_tenant_id(tenant: str) -> bool:
    return _TENANT_ID.fullmatch(tenant) is not None


class Violations:
    """Field violations of one request, reported together as INVALID_ARGUMENT (AIP-193:
    every offending field, every time; InvalidRequest bounds what is sent).

    `prior` carries on what an earlier stage found (the transport, converting enums and
    timestamps), so one error names the fields of both. One reason per field: the first.
    """

    def __init__(self, prior: Violations | None = None) -> None:
        if prior is None:  # the usual case, on every call: nothing to copy
            self.items: list[tuple[str, str]] = []
            self._fields: set[str] = set()
        else:
            self.items = list(prior.items)
            self._fields = {f for f, _ in self.items}

    def add(self, field: str, why: str) -> None:
        if field not in self._fields:
            self._fields.add(field)
            self.items.append((field, why))

    def count(self, field: str, n: int, most: int, what: str = "entries") -> bool:
        """Check a repeated field's length before its entries; False when it has too many
        (its entries are then not checked one by one)."""
        if n > most:
            self.add(field, f"at most {most} {what}")
            return False
        return True

    def update_mask(
        self, paths: Sequence[str], updatable: Collection[str], most: int | None = None
    ) -> None:
        """Check an update mask (AIP-134): at least one path (at most `most`, if given),
        each naming a field that may be changed."""
        if not paths:
            self.add("update_mask", "name at least one field")
        elif most is None or self.count("update_mask.paths", len(paths), most, "paths"):
            for i, path in enumerate(paths):
                if path not in updatable:
                    self.add(f"update_mask.paths[{i}]", f"{path[:64]!r} cannot be changed")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidRequest(self.items)

    def account_id(self, value: str, field: str = "account_id") -> None:
        if not value:
            self.add(field, "required")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field, f"at most {MAX_ID_LENGTH} characters")
        elif not _ACCOUNT_ID.fullmatch(value):
            self.add(field, "only letters, digits and ._:@+=- are allowed")

    def session_id(self, value: str, field: str = "session_id") -> None:
        if not value:
            self.add(field, "required")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field, f"at most {MAX_ID_LENGTH} characters")
        elif not _SESSION_ID.fullmatch(value):
            self.add(field, "only letters, digits and ._:@+=- are allowed")

    def request_id(self, value: str, field: str = "request_id") -> None:
        if not value:
            self.add(field, "required on every mutating call (AIP-155)")
        elif len(value) > MAX_ID_LENGTH:
            self.add(field, f"at most {MAX_ID_LENGTH} characters")
        elif not _PRINTABLE_ASCII.fullmatch(value):
            self.add(field, "printable ASCII without spaces only")

    def feature(self, value: str, field: str = "feature") -> None:
        if not value:
            self.add(field, "required")
        elif not _FEATURE.fullmatch(value):
            self.add(
                field,
                "lowercase letters, digits and _, starting with a letter, at most"
                f" {MAX_FEATURE_LENGTH}",
            )

    def credits(self, value: int, field: str, allow_zero: bool = False) -> None:
        low = 0 if allow_zero else 1
        if value < low:
            self.add(field, "must not be negative" if allow_zero else "must be positive")
        elif value > MAX_CREDITS:
            self.add(field, "must be at most 2^53-1")

    def reference(self, value: str, field: str = "reference") -> None:
        if len(value) > MAX_REFERENCE_LENGTH:
            self.add(field, f"at most {MAX_REFERENCE_LENGTH} characters")
