"""A real Redis Cluster of Debian's redis-server: 3 primaries and 3 replicas on free loopback
ports (each below 55535, so that its cluster bus port, 10000 above, is one too), joined by
`redis-cli --cluster create`. `creditmeter bench --cluster` runs the server on one, and the
tests' fixtures (tests/cluster.py) start theirs from here.

Each node runs as the embedded Redis does (append-only file, no RDB snapshots, the same
hash-max-listpack-value; `appendfsync` everysec unless told), so what a test or the bench
sees of persistence and memory is what the server sees. The launcher asks the cluster
itself (CLUSTER NODES / CLUSTER SHARDS) who holds a slot, rather than trusting the slot
ranges `--cluster create` is known to assign."""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from creditmeter.constants import REDIS_HASH_MAX_LISTPACK_VALUE
from creditmeter.storage.embedded_redis import die_with_parent

PRIMARIES = 3
REPLICAS_PER_PRIMARY = 1
#: A node's cluster bus listens on its port plus this (Redis's fixed offset).
BUS_PORT_OFFSET = 10000
#: Client ports stay below this, so that the bus port is a valid port too.
MAX_CLIENT_PORT = 65535 - BUS_PORT_OFFSET
#: Node timeouts (ms): the session's cluster, and a failover test's own (faster detection).
SESSION_NODE_TIMEOUT_MS = 2000
FAILOVER_NODE_TIMEOUT_MS = 1000
#: How long the whole cluster may take to come up, or a restarted node to rejoin.
START_TIMEOUT_S = 30.0
#: How long a failover may take in wait_failover unless told otherwise.
FAILOVER_TIMEOUT_S = 30.0
#: Pause between polls of the nodes' state.
POLL_S = 0.02
#: Tries at a node whose port was taken between our check and its bind.
PORT_ATTEMPTS = 5
LOG_TAIL_LINES = 15
#: util-linux's setpriv, to start nodes with a parent-death signal (see _spawn).
SETPRIV = shutil.which("setpriv")
#: The nodes' append-only file fsync policy unless told otherwise (as the tests run them).
DEFAULT_APPENDFSYNC = "everysec"


class ClusterStartError(RuntimeError):
    """The cluster (or a restarted node) did not come up in time; the message has the nodes'
    log tails."""


def _port_range() -> tuple[int, int]:
    """Client ports to pick from: both a port and its bus port below the kernel's ephemeral
    range, so no outgoing connection (our own clients', the nodes' bus links) can take one
    between our check and the node's bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = min(MAX_CLIENT_PORT, low - BUS_PORT_OFFSET)
    return (10000, top) if top > 11000 else (1024, MAX_CLIENT_PORT)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A loopback port whose bus port is free too, and which clashes with neither port of the
    nodes in `taken`."""
    low, high = _port_range()
    for _ in range(1000):
        port = random.randrange(low, high)
        clashes = {port, port + BUS_PORT_OFFSET} & {
            p + d for p in taken for d in (0, BUS_PORT_OFFSET)
        }
        if not clashes and _is_free(port) and _is_free(port + BUS_PORT_OFFSET):
            return port
    raise ClusterStartError("no free pair of loopback ports (port, port + 10000) found")


@dataclass(eq=False)
class RedisNode:
    """One redis-server of the cluster: its port, directory and (while it runs) process."""

    port: int
    dir: Path
    node_timeout_ms: int
    appendfsync: str = DEFAULT_APPENDFSYNC
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    #: Stopped by freeze() (SIGSTOP): the process lives but answers nothing.
    frozen: bool = False
    #: time.monotonic() of the last kill() or freeze(), for wait_failover's measure, and
    #: the ids of the node's replicas just before it (one of them is to take over).
    killed_at: float | None = None
    replicas_at_kill: frozenset[str] = frozenset()
    _client: redis.Redis | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """`redis://` for this node alone (its own commands: INFO, CONFIG, SCAN)."""
        return f"redis://{self.address}"

    @property
    def running(self) -> bool:
        """The process is alive (frozen or not)."""
        return self.process is not None and self.process.poll() is None

    @property
    def answering(self) -> bool:
        return self.running and not self.frozen

    @property
    def log(self) -> Path:
        return self.dir / "redis.log"

    def args(self, binary: str) -> list[str]:
        return [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", str(self.log),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--hash-max-listpack-value", str(REDIS_HASH_MAX_LISTPACK_VALUE),
            # The default waits 5 s for more replicas before a diskless full sync: every
            # replica's first sync (at creation, after a restart) would wait for it.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip

    def client(self) -> redis.Redis:
        """A plain (non-cluster) connection to this node alone, strings decoded."""
        if self._client is None:
            self._client = redis.Redis(
                port=self.port,
                decode_responses=True,
                socket_connect_timeout=0.5,
                socket_timeout=2.0,
            )
        return self._client

    def command(self, *args: Any) -> Any:
        """One command on this node, its reply as redis-py parses it."""
        return self.client().execute_command(*args)  # type: ignore[no-untyped-call]

    def close_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def info(self, section: str) -> dict[str, Any]:
        """INFO `section`, as redis-py parses it (numbers as ints)."""
        return dict(self.client().info(section))

    def cluster_state(self) -> str:
        """CLUSTER INFO's cluster_state: 'ok' or 'fail' (INFO's cluster section lacks it)."""
        raw = str(self.command("CLUSTER", "INFO"))
        fields = dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)
        return fields["cluster_state"]

    def role(self) -> str:
        """'master' or 'slave', as the node itself says (ROLE)."""
        return str(self.command("ROLE")[0])

    def log_tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return f"--- {self.address} ({self.dir}/redis.log)\n" + "\n".join(lines[-LOG_TAIL_LINES:])


@dataclass(frozen=True)
class NodeView:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str  # "-" for a primary
    connected: bool
    has_slots: bool

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failing(self) -> bool:
        return bool({"fail", "fail?"} & self.flags)

    @property
    def serving(self) -> bool:
        """A primary that holds slots (a failed-over primary may stay listed as a master
        with none)."""
        return self.is_primary and self.has_slots


def parse_cluster_nodes(raw: str) -> dict[str, NodeView]:
    """CLUSTER NODES' text, by node id."""
    views = {}
    for line in raw.splitlines():
        items = line.split(" ")
        node_id, addr, flags, master_id, _ping, _pong, _epoch, link = items[:8]
        port = int(addr.split("@")[0].rsplit(":", 1)[1] or 0)
        views[node_id] = NodeView(
            node_id,
            port,
            frozenset(flags.split(",")),
            master_id,
            link == "connected",
            # Slot ranges follow; "[slot->-id]" entries are migrations, not slots held.
            any(not item.startswith("[") for item in items[8:]),
        )
    return views


class RedisClusterNodes:
    """3 primaries + 3 replicas of redis-server on loopback, in their own directories under
    `root`. start() brings them up and joins them; stop() removes every process."""

    def __init__(
        self,
        root: Path,
        node_timeout_ms: int = SESSION_NODE_TIMEOUT_MS,
        *,
        appendfsync: str = DEFAULT_APPENDFSYNC,
    ) -> None:
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if not (binary and cli):
            raise ClusterStartError(
                "redis-server/redis-cli are not installed: ./scripts/test and ./scripts/bench "
                "install them (apt-get install redis-server redis-tools)"
            )
        self.binary, self.cli = binary, cli
        self.root = root
        self.node_timeout_ms = node_timeout_ms
        self.appendfsync = appendfsync
        self.nodes: list[RedisNode] = []
        #: Seconds start() took, from the first process to the last replica in sync.
        self.startup_s = 0.0

    # -- lifecycle

    def start(self) -> None:
        began = time.monotonic()
        taken: set[int] = set()
        for i in range(PRIMARIES * (1 + REPLICAS_PER_PRIMARY)):
            port = free_cluster_port(taken)
            taken.add(port)
            node_dir = self.root / f"node{i}"
            node_dir.mkdir(parents=True)
            self.nodes.append(RedisNode(port, node_dir, self.node_timeout_ms, self.appendfsync))
        for node in self.nodes:
            self._spawn(node)
        for node in self.nodes:
            self._wait_answers(node, taken)
        # redis-cli gives the first PRIMARIES addresses the slots and makes the rest their
        # replicas (it tries to put a replica on another host than its primary: all are
        # 127.0.0.1 here, so it may warn about anti-affinity, which is harmless).
        created = subprocess.run(
            [
                self.cli, "--cluster", "create", *(n.address for n in self.nodes),
                "--cluster-replicas", str(REPLICAS_PER_PRIMARY), "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
            check=False,
        )  # fmt: skip
        if created.returncode != 0:
            raise ClusterStartError(
                f"redis-cli --cluster create failed ({created.returncode}):\n"
                f"{created.stdout}\n{created.stderr}\n{self._log_tails()}"
            )
        self._wait(began + START_TIMEOUT_S, "the cluster to come up", self._settled)
        self.startup_s = time.monotonic() - began

    def stop(self) -> None:
        """SIGKILL every node (its data is thrown away with the directory) and wait for it."""
        for node in self.nodes:
            node.close_client()
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(10)

    def kill(self, node: RedisNode) -> None:
        """SIGKILL: no AOF fsync, no goodbye to the cluster, as a crashed host."""
        assert node.process is not None and node.running, f"{node.address} is not running"
        if not node.frozen:
            node.replicas_at_kill = frozenset(self._replicas_of(node))
        node.close_client()
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(10)
        node.frozen = False
        node.killed_at = time.monotonic()

    def freeze(self, node: RedisNode) -> None:
        """SIGSTOP: the node keeps its sockets open but answers nothing (clients time out
        rather than being refused), as a hung host or a partition; thaw() resumes it."""
        assert node.process is not None and node.answering, f"{node.address} is not answering"
        node.replicas_at_kill = frozenset(self._replicas_of(node))
        node.close_client()
        node.process.send_signal(signal.SIGSTOP)
        node.frozen = True
        node.killed_at = time.monotonic()

    def thaw(self, node: RedisNode, timeout: float = START_TIMEOUT_S, settle: bool = True) -> None:
        """SIGCONT a frozen node and (unless not `settle`) wait until the cluster is whole
        again (a primary that was failed over meanwhile rejoins as a replica)."""
        assert node.process is not None and node.frozen, f"{node.address} is not frozen"
        node.process.send_signal(signal.SIGCONT)
        node.frozen = False
        if settle:
            self.wait_settled(timeout)

    def wait_settled(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every answering node has cluster_state:ok, they agree on 3 primaries
        and every replica's link is up."""
        self._wait(time.monotonic() + timeout, "the cluster to settle", self._settled)

    def restart(self, node: RedisNode, timeout: float = START_TIMEOUT_S, wait: bool = True) -> None:
        """Start a stopped node again on its port, directory and nodes.conf, and (unless not
        `wait`: then see wait_settled) wait until the cluster is whole: a primary that was
        failed over rejoins as a replica of its successor and syncs from it.

        The node dies with the thread that started it (its parent-death signal): under a
        running event loop, call this from the loop's thread rather than a worker's."""
        assert not node.running, f"{node.address} is still running"
        self._spawn(node)
        if not wait:
            return
        deadline = time.monotonic() + timeout
        self._wait(deadline, f"{node.address} to answer", lambda: self._answers(node))
        self._wait(deadline, f"{node.address} to rejoin", self._settled)

    def wait_failover(self, old_primary: RedisNode, timeout: float = FAILOVER_TIMEOUT_S) -> float:
        """Wait until a replica of `old_primary` (stopped by kill() or freeze()) is a primary
        that every answering node sees as such, with cluster_state:ok everywhere; the seconds
        from the kill to then."""
        assert old_primary.killed_at is not None, "kill() or freeze() the primary first"
        replicas = [n for n in self._answering() if n.node_id in old_primary.replicas_at_kill]
        assert replicas, f"{old_primary.address} had no answering replica to fail over to"

        def promoted() -> bool:
            winners = [n for n in replicas if n.role() == "master"]
            if not winners:
                return False
            for node in self._answering():
                if node.cluster_state() != "ok":
                    return False
                view = self._views(node)
                if not view[winners[0].node_id].serving or view[old_primary.node_id].serving:
                    return False
            return True

        self._wait(
            old_primary.killed_at + timeout, f"a replica of {old_primary.address} to take over",
            promoted,
        )  # fmt: skip
        return time.monotonic() - old_primary.killed_at

    def flushall(self) -> None:
        """FLUSHALL on every answering primary (function libraries stay loaded)."""
        for node in self.primaries():
            node.client().flushall()

    # -- what the cluster says

    @property
    def url(self) -> str:
        """`redis+cluster://` and the first primaries' addresses: the seeds the server takes."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:PRIMARIES])

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """The url's seeds as (host, port), for redis-py's ClusterNode."""
        return [("127.0.0.1", n.port) for n in self.nodes[:PRIMARIES]]

    def roles(self) -> list[tuple[RedisNode, str]]:
        """Every answering node and its role ('master' or 'slave'), as it says itself."""
        return [(n, n.role()) for n in self._answering()]

    def primaries(self) -> list[RedisNode]:
        return [n for n, role in self.roles() if role == "master"]

    def replicas(self) -> list[RedisNode]:
        return [n for n, role in self.roles() if role == "slave"]

    def replicas_of(self, primary: RedisNode) -> list[RedisNode]:
        """The nodes that the cluster lists as replicas of `primary`."""
        ids = self._replicas_of(primary)
        return [n for n in self.nodes if n.node_id in ids]

    def primary_of_slot(self, slot: int) -> RedisNode:
        """The primary serving `slot`, from CLUSTER SHARDS of an answering node."""
        asker = self._answering()[0]
        for raw in asker.command("CLUSTER", "SHARDS"):
            shard = _pairs(raw)
            ranges = shard["slots"]  # [first, last, first, last, ...]
            if any(lo <= slot <= hi for lo, hi in zip(ranges[::2], ranges[1::2], strict=True)):
                for member in map(_pairs, shard["nodes"]):
                    if member["role"] == "master" and member["health"] == "online":
                        return self._by_port(int(member["port"]))
        raise LookupError(f"{asker.address} knows no online primary for slot {slot}")

    def primary_for_key(self, key: str | bytes) -> RedisNode:
        slot = int(self._answering()[0].command("CLUSTER", "KEYSLOT", key))
        return self.primary_of_slot(slot)

    # -- internals

    def _spawn(self, node: RedisNode) -> None:
        # A pytest killed outright takes its nodes with it: their parent-death signal.
        # setpriv(1) sets it in the child, where it can: a preexec_fn runs Python in a
        # forked child, which crashes if other threads (gRPC's) were busy at the fork (a
        # node restarted under gRPC load segfaulted so).
        options: dict[str, Any] = {}
        if SETPRIV is not None:
            command = [SETPRIV, "--pdeathsig", "TERM", *node.args(self.binary)]
        else:
            command, options = node.args(self.binary), {"preexec_fn": die_with_parent}
        node.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **options,
        )

    def _wait_answers(self, node: RedisNode, taken: set[int]) -> None:
        """Wait for a new node to answer; if its port was taken meanwhile (it exits at
        once), move it to another port. A node that exits at once leaving no log line
        is started again too (a preexec_fn that crashed in the forked child did that);
        any other early exit fails with its log."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for _ in range(PORT_ATTEMPTS):
            while node.running and not self._answers(node):
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"{node.address} did not answer\n{node.log_tail()}")
                time.sleep(POLL_S)
            if node.running:
                node.node_id = str(node.command("CLUSTER", "MYID"))
                return
            tail = node.log_tail()
            if "Address already in use" not in tail and tail.strip().count("\n") > 0:
                raise ClusterStartError(f"{node.address} exited\n{tail}")
            taken.discard(node.port)
            node.port = free_cluster_port(taken)
            taken.add(node.port)
            node.close_client()
            self._spawn(node)
        raise ClusterStartError(f"no port could be bound for {node.dir}\n{node.log_tail()}")

    def _answers(self, node: RedisNode) -> bool:
        try:
            # PING answers while the AOF is still loading; a node is up once it is loaded.
            return node.info("persistence").get("loading") == 0
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    def _answering(self) -> list[RedisNode]:
        """The nodes that answer (alive and not frozen)."""
        return [n for n in self.nodes if n.answering]

    def _by_port(self, port: int) -> RedisNode:
        return next(n for n in self.nodes if n.port == port)

    def _views(self, node: RedisNode) -> dict[str, NodeView]:
        return parse_cluster_nodes(node.command("CLUSTER", "NODES"))

    def _replicas_of(self, primary: RedisNode) -> set[str]:
        ids: set[str] = set()
        for node in self._answering():
            if node is not primary:
                ids |= {
                    v.node_id for v in self._views(node).values() if v.master_id == primary.node_id
                }
        return ids

    def _settled(self) -> bool:
        """Every answering node has cluster_state:ok, sees every answering node as healthy and
        the same 3 primaries serving slots; every answering replica's link to its primary is
        up."""
        running = self._answering()
        seen: set[frozenset[str]] = set()
        for node in running:
            if node.cluster_state() != "ok":
                return False
            views = self._views(node)
            if any(n.node_id not in views or views[n.node_id].failing for n in running):
                return False
            seen.add(frozenset(v.node_id for v in views.values() if v.serving))
            replication = node.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return len(seen) == 1 and len(next(iter(seen))) == PRIMARIES

    def _wait(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (redis.RedisError, KeyError, LookupError) as error:
                last_error = error  # a node mid-restart or mid-failover: ask again
            time.sleep(POLL_S)
        raise ClusterStartError(
            f"timed out waiting for {what} (last error: {last_error!r})\n"
            f"{self._describe()}\n{self._log_tails()}"
        )

    def _describe(self) -> str:
        """One line per node: what it says of itself, as far as it answers."""
        lines = []
        for node in self.nodes:
            if not node.answering:
                lines.append(f"{node.address}: {'frozen' if node.frozen else 'not running'}")
                continue
            try:
                replication = node.info("replication")
                lines.append(
                    f"{node.address}: {replication['role']}, cluster_state "
                    f"{node.cluster_state()}, link {replication.get('master_link_status', '-')}"
                )
            except redis.RedisError as error:
                lines.append(f"{node.address}: {error!r}")
        return "\n".join(lines)

    def _log_tails(self) -> str:
        return "\n".join(n.log_tail() for n in self.nodes)


def _pairs(flat: list[Any] | dict[str, Any]) -> dict[str, Any]:
    """A RESP2 flat [name, value, ...] list (CLUSTER SHARDS' maps) as a dict (RESP3 gives
    a dict already)."""
    if isinstance(flat, dict):
        return flat
    return {str(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


@contextlib.contextmanager
def running_cluster(
    node_timeout_ms: int, root: Path | None = None, *, appendfsync: str = DEFAULT_APPENDFSYNC
) -> Iterator[RedisClusterNodes]:
    """A started cluster in `root` (or a fresh temporary directory, removed afterwards),
    its processes stopped however the block ends, a failed start included."""
    owned = root is None
    directory = Path(tempfile.mkdtemp(prefix="creditmeter-cluster-")) if root is None else root
    cluster = RedisClusterNodes(directory, node_timeout_ms, appendfsync=appendfsync)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
