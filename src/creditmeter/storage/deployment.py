"""What every process of a deployment must agree on before it makes a key: the number of
buckets the accounts are spread over.

It is chosen when the deployment's Redis is first used (`--buckets`, else the default:
64 on a single Redis, as release 0.1.0 had it fixed; 1,024 on a Redis Cluster) and stored in
Redis itself (`cm:buckets`), where every process -- servers, workers, flushers, the CLI --
reads it back at start. It lives beside the data it shapes: only Redis's keys depend on it
(the ledger holds account ids, not buckets), so a Redis that lost its data may take a new
number, and a rebuild from the ledger puts every account in its bucket under it.
"""

from __future__ import annotations

import logging

from creditmeter.constants import CLUSTER_DEFAULT_BUCKETS, DEFAULT_BUCKETS, KEY_PREFIX
from creditmeter.storage import layout
from creditmeter.storage.redis_client import Client, is_cluster_client


class BucketsMismatch(ValueError):
    """A process asked for a number of buckets other than the deployment's."""

log = logging.getLogger(__name__)

#: The deployment's number of buckets (a plain key: read alone, never with another).
BUCKETS_KEY = f"{KEY_PREFIX}:buckets"


def default_buckets(client: Client) -> int:
    return CLUSTER_DEFAULT_BUCKETS if is_cluster_client(client) else DEFAULT_BUCKETS


async def _has_older_data(client: Client) -> bool:
    """Whether Redis holds creditmeter data written before the number was stored (release
    0.1.0, whose 64 buckets were fixed)."""
    if await client.exists(layout.LAYOUT_KEY):
        return True
    async for _key in client.scan_iter(match=layout.ALL_BUCKETS_PATTERN, count=1000):
        return True
    return False


async def resolve_buckets(client: Client, requested: int | None = None) -> int:
    """The deployment's number of buckets, stored in Redis on first use, and put in force
    in this process (`layout.use_buckets`). `requested` applies to a new deployment only:
    asking an initialised one for another number is refused (BucketsMismatch) (it would move every
    account to another bucket)."""
    stored = await client.get(BUCKETS_KEY)
    if stored is None:
        if await _has_older_data(client):
            chosen = DEFAULT_BUCKETS
        else:
            chosen = default_buckets(client) if requested is None else requested
        layout.use_buckets(chosen)  # validates it before it is stored
        # NX: of servers starting together on a new deployment, the first one's number holds.
        if await client.set(BUCKETS_KEY, str(chosen), nx=True):
            log.info("deployment initialised with %d buckets", chosen)
        stored = await client.get(BUCKETS_KEY)
    count = int(str(stored))
    if requested is not None and requested != count:
        raise BucketsMismatch(
            f"--buckets {requested}: this deployment was initialised with {count} buckets; "
            "the number cannot change (it would move every account)"
        )
    layout.use_buckets(count)
    return count


async def restore_buckets(client: Client) -> None:
    """Put this process's number back after Redis lost its data (a running deployment
    keeps its number: processes starting later read it from here)."""
    await client.set(BUCKETS_KEY, str(layout.buckets()), nx=True)
