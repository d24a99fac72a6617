"""Fingerprints are stored in request records: their bytes must not change across releases
(a retry after an upgrade must still match its first call)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from creditmeter.domain import ids


#: The definition every earlier release used.
def reference(operation: str, params: dict[str, Any]) -> str:
    canonical = json.dumps([operation, params], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text()


@given(st.text(), st.dictionaries(st.text(), scalars, max_size=8))
def test_flat_params_digest_as_json_dumps(operation: str, params: dict[str, Any]) -> None:
    assert ids.fingerprint(operation, params) == reference(operation, params)


@given(
    st.dictionaries(
        st.text(max_size=4),
        scalars | st.floats() | st.lists(scalars, max_size=3) | st.dictionaries(st.text(), scalars),
        max_size=4,
    )
)
def test_other_params_digest_as_json_dumps(params: dict[str, Any]) -> None:
    """Floats, lists and nested objects take json.dumps itself: the same bytes."""
    assert ids.fingerprint("Grant", params) == reference("Grant", params)


def test_known_digests_are_unchanged() -> None:
    """Digests of 0.x request records (a Consume of one text, a Grant), fixed here."""
    consume = {"account_id": "alice", "feature": "text", "quantity": None, "amount": None}
    assert ids.fingerprint("Consume", consume) == reference("Consume", consume)
    assert ids.fingerprint("Consume", consume) == "55cf6e3ed9edc10fcefa5fb4893fa100"
    grant = {"account_id": "bob", "amount": 50, "expires_at_ms": None, "valid_for_ms": 86_400_000,
             "priority": None, "source": "manual", "reference": "caf\u00e9 \"x\"\\n"}  # fmt: skip
    assert ids.fingerprint("Grant", grant) == reference("Grant", grant)
    assert ids.fingerprint("Grant", grant) == "07b7c0d4f71ce6f40c6f9187275d2290"


def test_a_str_subclass_is_written_as_json_dumps_writes_it() -> None:
    class Name(str):
        pass

    params = {"feature": Name("text"), "flag": True}
    assert ids.fingerprint("SetRate", params) == reference("SetRate", params)
