"""Loads the Lua scripts shipped in creditmeter/storage/lua as package data."""

from __future__ import annotations

from functools import cache
from importlib import resources

_PRELUDE = "_lib.lua"


@cache
def source(name: str) -> str:
    """The full text of script `name` (without .lua): the shared prelude, then the script.

    Redis has no `require`, so the helpers every account script needs (idempotency,
    events, expiry sweep) are prepended here rather than copied into each file.
    """
    folder = resources.files("creditmeter.storage") / "lua"
    prelude = (folder / _PRELUDE).read_text(encoding="utf-8")
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return f"{prelude}\n-- ---- {name}.lua ----\n{body}"


SCRIPT_NAMES = (
    "grant",
    "consume",
    "set_balance",
    "set_options",
    "sweep",
    "restore",
    "refund",
    "renew",
    "session",
)
