"""What `AsyncClient` (client/aio.py) and `Client` (client/sync.py) share, and the one place
they differ outside await: the channel. sync.py is generated from aio.py by
scripts/gen-sync-client (unasync), which renames `open_async_channel` to `open_channel`; the
rest of this module is used by both as it is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from creditmeter.api.credits.v1 import packs_pb2, webhooks_pb2

#: RPC names served by the Packs service; every other name belongs to Credits.
PACKS_METHODS = frozenset(packs_pb2.DESCRIPTOR.services_by_name["Packs"].methods_by_name)
WEBHOOKS_METHODS = frozenset(
    webhooks_pb2.DESCRIPTOR.services_by_name["Webhooks"].methods_by_name
)


def auth_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),)


def open_async_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A `grpc.aio` channel (TLS with `credentials`, else plaintext), for `AsyncClient`."""
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A blocking channel (TLS with `credentials`, else plaintext), for `Client`."""
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)
