"""The creditmeter Python SDK: typed sync (`Client`) and asyncio (`AsyncClient`) clients
with API-key auth, deadlines, retries with stable request ids, exceptions per error reason,
and a call-session helper.

    from creditmeter.client import Client, InsufficientCredits

    with Client("127.0.0.1:50051", api_key) as client:
        client.consume("alice", "text", quantity=1)
"""

from creditmeter.client.aio import AsyncClient
from creditmeter.client.errors import *  # noqa: F403
from creditmeter.client.errors import BY_REASON, CreditmeterError, from_rpc_error
from creditmeter.client.retry import NO_RETRY, RetryPolicy
from creditmeter.client.sessions import AsyncCallSession, CallSession, SessionMeter
from creditmeter.client.sync import Client

__all__ = [  # noqa: RUF022
    "AsyncClient",
    "Client",
    "RetryPolicy",
    "NO_RETRY",
    "CallSession",
    "AsyncCallSession",
    "SessionMeter",
    "CreditmeterError",
    "BY_REASON",
    "from_rpc_error",
]
