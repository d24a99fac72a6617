"""An account's whole hash as a rebuild writes it (restore.lua): the domain says what the
account is (`AccountImage`, derived from the ledger by creditmeter.domain.recovery), and
this module names its fields, through the modules that read each part back (`totals`,
`limits`, `credit_line`, `recharge`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from creditmeter.storage import credit_line, limits
from creditmeter.storage.limits import Counter, OwnLimit
from creditmeter.storage.recharge import OwnPolicy, own_policy_field
from creditmeter.storage.totals import Totals, totals_fields

#: Per subscription, credits of its periods' lots that expired unused since its last
#: renewal (remove_lot in _lib.lua adds to it, renew.lua takes it).
CARRY = "carry:"


@dataclass(frozen=True)
class AccountImage:
    """An account's figures, options and counters (not its lots: restore takes those apart)."""

    #: Credit in the account's lots.
    balance: int
    #: The account's change sequence number: its last event's seq.
    seq: int
    totals: Totals
    #: None: never set (the field stays absent).
    unlimited: bool | None = None
    #: subscription id -> credits to carry over at its next renewal.
    carry: Mapping[str, int] = field(default_factory=dict)
    #: The usage limits: the account's time zone, exemption, own limits, and the counters
    #: of the current periods.
    time_zone: str = ""
    exempt: bool = False
    own_limits: Sequence[OwnLimit] = ()
    counters: Sequence[Counter] = ()
    #: The credit line: the overdraft limit, the debt, and per lot (debt its grant repaid,
    #: its amount).
    overdraft: int = 0
    debt: int = 0
    repaid: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    #: The account's own recharge policy (None: the tenant's applies).
    recharge: OwnPolicy | None = None

    def fields(self) -> dict[str, str]:
        """The account hash's fields, as the scripts keep them (a limit counter only once
        it counted units)."""
        fields = totals_fields(self.totals)
        fields["balance"] = str(self.balance)
        fields["seq"] = str(self.seq)
        if self.unlimited is not None:
            fields["unlimited"] = "1" if self.unlimited else "0"
        fields.update((f"{CARRY}{sub}", str(n)) for sub, n in self.carry.items() if n)
        if self.time_zone:
            fields[limits.TIME_ZONE] = self.time_zone
        if self.exempt:
            fields[limits.EXEMPT] = "1"
        if self.own_limits:
            fields[limits.OWN_LIMITS_COUNT] = str(len(self.own_limits))
            fields.update(limits.own_limit_field(own) for own in self.own_limits)
        fields.update(credit_line.CreditLine(self.overdraft, self.debt, self.repaid).fields())
        if self.recharge is not None:
            fields.update([own_policy_field(self.recharge)])
        fields.update(limits.counter_field(c) for c in self.counters if c.units)
        return fields
