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
    # The body runs as a function so that the expiry index is kept (update_due) and the
    # account it changed is written back once (flush_account), whichever `return` it
    # ends by.
    return (
        f"{prelude}\n-- ---- {name}.lua ----\nlocal function script_body()\n{body}\nend\n"
        "local reply = script_body()\nupdate_due()\nflush_account()\nreturn reply\n"
    )


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


@cache
def standalone(name: str) -> str:
    """The text of a script that runs without the prelude (ack.lua, convert.lua)."""
    return (resources.files("creditmeter.storage") / "lua" / f"{name}.lua").read_text(
        encoding="utf-8"
    )
