"""Loading the scripts' library (storage/scripts.py) and calling its functions, on one
Redis or on every primary of a cluster."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from creditmeter.constants import SCRIPT_LOAD_ATTEMPTS
from creditmeter.storage import scripts
from creditmeter.storage.redis_client import (
    Client,
    check_reachable,
    on_every_primary,
    reachable,
)


def function_missing(exc: object) -> bool:
    """Whether Redis refused an FCALL because the library is not loaded."""
    return isinstance(exc, ResponseError) and "function not found" in str(exc).lower()


def library_loaded(exc: object) -> bool:
    """Whether Redis refused a FUNCTION LOAD because the library is there already."""
    return isinstance(exc, ResponseError) and "already exists" in str(exc)


async def load_library(client: Client) -> None:
    """FUNCTION LOAD the library on every primary (a no-op where it is there already);
    raises what a node answered otherwise (a lost connection included)."""
    for reply in await on_every_primary(client, "FUNCTION", "LOAD", scripts.library()):
        if isinstance(reply, Exception) and not library_loaded(reply):
            raise reply


async def call_each(
    client: Client, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    """FCALL function `name` once per (keys, args), in one pipeline (a batch per node);
    each reply, or the ResponseError of that call. Calls refused because the library is
    missing (a FUNCTION FLUSH, a Redis that lost its data) are sent again once it is
    loaded. A Redis away (or a node of a cluster) raises BackendUnavailable."""
    async with reachable():
        return await _call_each(client, name, calls)


async def _call_each(
    client: Client, name: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
) -> list[Any]:
    function = scripts.function_name(name)
    replies: list[Any] = [None] * len(calls)
    pending = list(range(len(calls)))
    for attempt in range(SCRIPT_LOAD_ATTEMPTS):
        if attempt:
            await load_library(client)
        async with client.pipeline(transaction=False) as pipe:
            for i in pending:
                keys, args = calls[i]
                pipe.fcall(function, len(keys), *keys, *args)
            results = await pipe.execute(raise_on_error=False)
        check_reachable(results)
        missing = []
        for i, result in zip(pending, results, strict=True):
            if function_missing(result):
                missing.append(i)
            else:
                replies[i] = result
        if not missing:
            return replies
        pending = missing
    raise ResponseError(f"the library of {name} was flushed {SCRIPT_LOAD_ATTEMPTS} times")


async def call(client: Client, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """One FCALL of function `name` (see `call_each`); raises the error it met."""
    [reply] = await call_each(client, name, [(keys, args)])
    if isinstance(reply, Exception):
        raise reply
    return reply
