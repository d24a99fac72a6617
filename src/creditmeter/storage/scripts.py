"""The Lua shipped in creditmeter/storage/lua (package data), as one Redis Functions library.

Every account script (SCRIPT_NAMES) is a function of one library: `_lib.lua`, the shared
prelude, is defined once when the library is loaded (FUNCTION LOAD), not run again on
every call as a prepended prelude of EVALSHA would be, and the library is kept in Redis's
own persistence (RDB and AOF) and replicated, so it survives a restart and a replica's
promotion. Its name and its functions' names carry a digest of its text: servers of two
releases sharing one Redis (a rolling upgrade) each call their own code.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

_PRELUDE = "_lib.lua"

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
    "set_limit",
    "set_recharge",
)


#: The function that runs consume.lua for many charges of one bucket in one call.
CONSUME_BATCH = "consume_batch"

#: The read-only function answering what consume would decide (check.lua), registered
#: with the `no-writes` flag: it is called with FCALL_RO, which a replica may serve.
CHECK = "check"

#: Scripts of the flusher and its leases, without the prelude: functions of the library
#: too, their text taking `KEYS` and `ARGV` as parameters. (A cluster pipeline cannot
#: carry EVALSHA, and EVAL would send a script's whole text per bucket.)
PLAIN_NAMES = ("ack", "backlog", "lease", "peers")


def _read(name: str) -> str:
    return (resources.files("creditmeter.storage") / "lua" / name).read_text(encoding="utf-8")


@cache
def _code() -> str:
    """The library's code below its shebang line (the part its digest is taken of)."""
    parts = [_read(_PRELUDE)]
    for name in SCRIPT_NAMES:
        # Each script's text is the body of a function: `return` ends the call wherever
        # it appears, and the wrapper (`run`) still records a recharge that fell due
        # (recharge_watch), keeps the expiry index (update_due) and writes the account
        # (flush_account) and the events (flush_events) back once.
        parts.append(f"-- ---- {name}.lua ----\nlocal function body_{name}()\n"
                     f"{_read(f'{name}.lua')}\nend\n")  # fmt: skip
    parts.append(
        "local function run(body, keys, args)\n"
        "  begin(keys, args)\n"
        "  local reply = body()\n"
        "  recharge_watch()\n"
        "  update_due()\n"
        "  flush_account()\n"
        "  flush_events()\n"
        "  return reply\n"
        "end\n"
    )
    parts.append(_read("consume_batch.lua"))
    parts.append(_read("check.lua"))
    for name in PLAIN_NAMES:
        parts.append(f"-- ---- {name}.lua ----\nlocal function plain_{name}(KEYS, ARGV)\n"
                     f"{_read(f'{name}.lua')}\nend\n")  # fmt: skip
    return "\n".join(parts)


@cache
def digest() -> str:
    """A short digest of the library's code: the version in its and its functions' names."""
    return hashlib.sha1(_code().encode()).hexdigest()[:12]


def library_name() -> str:
    return f"creditmeter_{digest()}"


def function_name(script: str) -> str:
    """The name to FCALL for script `script` (of SCRIPT_NAMES, CONSUME_BATCH, CHECK,
    PLAIN_NAMES)."""
    return f"cm_{digest()}_{script}"


@cache
def library() -> str:
    """The text to FUNCTION LOAD."""
    registrations = "".join(
        f"redis.register_function('{function_name(name)}', "
        f"function(keys, args) return run(body_{name}, keys, args) end)\n"
        for name in SCRIPT_NAMES
    ) + (f"redis.register_function('{function_name(CONSUME_BATCH)}', consume_batch)\n") + (
        f"redis.register_function{{function_name='{function_name(CHECK)}', callback=check, "
        "flags={'no-writes'}}\n"
    ) + "".join(
        f"redis.register_function('{function_name(name)}', plain_{name})\n" for name in PLAIN_NAMES
    )
    return f"#!lua name={library_name()}\n{_code()}\n{registrations}"


@cache
def standalone(name: str) -> str:
    """The text of a script that runs alone, by EVAL (convert.lua, once per account of an
    older release)."""
    return _read(f"{name}.lua")
