"""Waiting for replicas (`--replica-acks N`): per node, a write and a `WAIT` on one
connection, in the pipeline of the work they cover.

The write (`INCR` of a bucket's `acks` key) puts the connection's replication offset past
every change its node made before -- the calls just sent, the first run of a call now only
replayed, the outbox entries a flusher read -- so WAIT counts the replicas that hold them
all. Used by the store (a change is answered once on N replicas) and by the flusher (an
entry goes to the ledger once on N replicas).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from creditmeter.constants import REPLICA_ACK_TIMEOUT_MS
from creditmeter.storage.layout import acks_key
from creditmeter.storage.redis_client import Client

#: Per node name ("" on a single Redis): one of its buckets' `acks` key, and the node
#: (None on a single Redis).
Targets = dict[str, tuple[str, Any]]


class ReplicaAcks:
    def __init__(self, client: Client, replicas: int) -> None:
        self.client = client
        #: Replicas each change must reach; 0: none is waited for.
        self.replicas = replicas
        self._locate = getattr(client, "get_node_from_key", None)

    def node_of(self, key: str) -> tuple[str, Any]:
        """The node that holds `key`'s bucket: its name and the node (""/None on one Redis)."""
        node = self._locate(acks_key(key)) if self._locate is not None else None
        return ("" if node is None else node.name), node

    def targets(self, keys: Sequence[str]) -> Targets:
        """The nodes holding the buckets of `keys` (any key of the layout each)."""
        found: Targets = {}
        for key in keys:
            name, node = self.node_of(key)
            found.setdefault(name, (acks_key(key), node))
        return found

    def request(self, pipe: Any, targets: Targets) -> int:
        """Add, per target node, the write and the WAIT to `pipe`; how many commands."""
        wait = ("WAIT", self.replicas, REPLICA_ACK_TIMEOUT_MS)
        for counter, node in targets.values():
            pipe.incr(counter)
            if node is None:
                pipe.execute_command(*wait)
            else:
                pipe.execute_command(*wait, target_nodes=node)
        return 2 * len(targets)

    def acked(self, targets: Targets, results: Sequence[Any]) -> set[str]:
        """The target nodes whose WAIT (every second of `request`'s results) counted
        enough replicas."""
        return {
            name for name, reply in zip(targets, results[1::2], strict=True)
            if not isinstance(reply, Exception) and int(reply) >= self.replicas
        }  # fmt: skip

    def all_acked(self, targets: Targets, results: Sequence[Any]) -> bool:
        return self.acked(targets, results) == targets.keys()
