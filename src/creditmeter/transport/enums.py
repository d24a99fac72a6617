"""Proto enum values and the domain's names for them (USAGE_LIMIT_PERIOD_DAY <-> 'day'):
every enum of the API prefixes its values with its own name (buf's ENUM_VALUE_PREFIX),
and every domain enum is a StrEnum of the rest in lowercase, so one pair of functions
converts them all."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, TypeAlias, TypeVar

from google.protobuf.descriptor import EnumDescriptor

from creditmeter.domain.validation import Violations

if TYPE_CHECKING:  # the stubs' generic name of protobuf's EnumTypeWrapper
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)

#: A generated enum (the type of `credits_pb2.LotSource`, say), its values of type V.
ProtoEnum: TypeAlias = "_EnumTypeWrapper[V]"


def enum_prefix(enum: EnumDescriptor) -> str:
    """The prefix of an enum's value names (buf's ENUM_VALUE_PREFIX rule): its name in
    UPPER_SNAKE_CASE and '_', e.g. USAGE_LIMIT_PERIOD_ for UsageLimitPeriod."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_pb(enum: ProtoEnum[V], name: str) -> V:
    """The proto value of a domain enum's name ('day' -> USAGE_LIMIT_PERIOD_DAY)."""
    return enum.Value(enum_prefix(enum.DESCRIPTOR) + name.upper())


def enum_text(enum: ProtoEnum[V], value: V) -> str:
    """A proto value as the domain (and the CLI) name it (USAGE_LIMIT_PERIOD_DAY -> 'day')."""
    return enum.Name(value).removeprefix(enum_prefix(enum.DESCRIPTOR)).lower()


def enum_name(enum: ProtoEnum[V], value: int, field: str, v: Violations) -> str | None:
    """The lowercase name (without the prefix) of a proto enum value; None for the zero
    value, and None with a violation for a number the enum does not have (a newer client's
    value, or garbage): every such field is reported, not only the first."""
    if value == 0:
        return None
    known = enum.DESCRIPTOR.values_by_number.get(value)
    if known is None:
        v.add(field, f"unknown value {value}")
        return None
    return known.name.removeprefix(enum_prefix(enum.DESCRIPTOR)).lower()
