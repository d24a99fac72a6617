"""Recharge policies as Redis holds them (the format is in _lib.lua, "recharges"): the
account hash's own policy (`R`), the tenant default's argument, and the ledger's record
of both the account's policy (`recharge_policy` events) and the crossings
(`recharge_due` events).

What a policy means (a threshold and a pack, one recharge per crossing) is the domain's
(creditmeter.domain.recharge); this module only spells it for the scripts and reads back
what they wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: The account hash field of its own policy: "<threshold>:<pack id>", or OFF.
OWN_POLICY = "R"
OFF = "off"

#: The event kinds: a crossing, and a change of the account's own policy.
DUE_KIND = "recharge_due"
POLICY_KIND = "recharge_policy"


@dataclass(frozen=True)
class Policy:
    """A threshold and a pack ('' = none)."""

    threshold: int
    pack_id: str


@dataclass(frozen=True)
class OwnPolicy:
    """An account's own setting: a policy, or recharges turned off (policy None)."""

    policy: Policy | None

    @property
    def disabled(self) -> bool:
        return self.policy is None


def encode(policy: Policy | None) -> str:
    """A policy as the scripts' argument ('' = none)."""
    return "" if policy is None else f"{policy.threshold}:{policy.pack_id}"


def _decode(value: str) -> Policy:
    threshold, _, pack = value.partition(":")
    return Policy(int(threshold), pack)


def own_policy(fields: Mapping[str, str]) -> OwnPolicy | None:
    """The account's own setting from its hash, or None when it has none."""
    value = fields.get(OWN_POLICY)
    if value is None:
        return None
    return OwnPolicy(None if value == OFF else _decode(value))


def own_policy_field(own: OwnPolicy) -> tuple[str, str]:
    """The account's own setting as its field name and value (what a rebuild writes)."""
    return OWN_POLICY, OFF if own.policy is None else encode(own.policy)


def script_args(own: OwnPolicy | None) -> list[str]:
    """set_recharge.lua's what, threshold and pack arguments (None: remove)."""
    if own is None:
        return ["remove", "", ""]
    if own.policy is None:
        return ["off", "", ""]
    return ["set", str(own.policy.threshold), own.policy.pack_id]


def policy_event(amount: int, reference: str) -> OwnPolicy | None:
    """A `recharge_policy` event's setting (None: removed): set_recharge.lua writes the
    threshold in `amount` and "set:<pack>", "off" or "" in `reference`."""
    if reference == OFF:
        return OwnPolicy(None)
    if reference.startswith("set:"):
        return OwnPolicy(Policy(amount, reference[4:]))
    return None
