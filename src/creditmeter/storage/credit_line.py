"""The credit line (overdraft) as Redis holds it: the account hash's fields (the format is
in _lib.lua, "credit line").

The rule (charges past the lots down to the limit, money-in repaying first) is enforced by
the scripts; this module only names and reads back what they wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: Account hash fields: the overdraft limit, the debt, and per lot whose grant repaid
#: debt `rp:<lot>` = "<repaid> <lot amount>" (a refund of the lot brings the debt back).
OVERDRAFT = "od"
DEBT = "debt"
REPAID = "rp:"


def overdraft_limit(fields: Mapping[str, str]) -> int:
    """The account's overdraft limit (0: none)."""
    return int(fields.get(OVERDRAFT, "0"))


def debt(fields: Mapping[str, str]) -> int:
    """The account's debt (0: none)."""
    return int(fields.get(DEBT, "0"))


def repaid(fields: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """Per lot whose grant repaid debt: (debt repaid, the lot's amount)."""
    out = {}
    for name, value in fields.items():
        if name.startswith(REPAID):
            r, amount = value.split(" ")
            out[name[len(REPAID) :]] = (int(r), int(amount))
    return out


@dataclass(frozen=True)
class CreditLine:
    """An account's credit line: its overdraft limit, its debt, and per lot whose grant
    repaid debt (debt repaid, the lot's amount). Zero and empty: no credit line."""

    overdraft: int = 0
    debt: int = 0
    repaid: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, fields: Mapping[str, str]) -> CreditLine:
        """The credit line an account's fields hold."""
        return cls(overdraft_limit(fields), debt(fields), repaid(fields))

    def fields(self) -> dict[str, str]:
        """Its account fields, as the scripts keep them (each absent when 0)."""
        fields = {f"{REPAID}{lot}": f"{r} {amount}" for lot, (r, amount) in self.repaid.items()}
        if self.overdraft:
            fields[OVERDRAFT] = str(self.overdraft)
        if self.debt:
            fields[DEBT] = str(self.debt)
        return fields
