"""A private redis-server child process, the default when no --redis-url is given.

It persists with an append-only file (fsync on every write by default, so no
acknowledged change is lost in a crash), keeps its files under <data-dir>/redis, listens
only on a unix socket (or loopback TCP when the socket path would be too long), and dies
with the server: it gets SIGTERM when the server process exits, even by SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import shutil
import signal
import socket
import time
from pathlib import Path

import redis.asyncio as aioredis

from creditmeter.constants import (
    MAX_UNIX_SOCKET_PATH,
    REDIS_DIR_NAME,
    REDIS_HASH_MAX_LISTPACK_VALUE,
    REDIS_SOCKET_NAME,
    REDIS_START_TIMEOUT_S,
)

INSTALL_HINT = "apt-get install -y redis-server"
_PR_SET_PDEATHSIG = 1
_ENDPOINT_FILE = "endpoint"


class RedisNotInstalled(RuntimeError):
    def __init__(self) -> None:
        super().__init__(f"redis-server not found on PATH; install it with: {INSTALL_HINT}")


class RedisStartFailed(RuntimeError):
    pass


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (in a child before exec,
    or early in a child process of our own)."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def endpoint_file(data_dir: Path) -> Path:
    """Where the embedded Redis writes its URL, for admin commands run beside the server."""
    return data_dir / REDIS_DIR_NAME / _ENDPOINT_FILE


class EmbeddedRedis:
    """Starts, watches and stops the private redis-server."""

    def __init__(self, data_dir: Path, appendfsync: str = "always") -> None:
        self.dir = (data_dir / REDIS_DIR_NAME).resolve()
        self.appendfsync = appendfsync
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""

    def _listen_args(self) -> tuple[list[str], str]:
        sock = self.dir / REDIS_SOCKET_NAME
        if len(str(sock)) <= MAX_UNIX_SOCKET_PATH:
            return ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"], (
                f"unix://{sock}"
            )
        port = _free_port()
        return ["--port", str(port), "--bind", "127.0.0.1"], f"redis://127.0.0.1:{port}/0"

    async def _shutdown_orphan(self, url: str) -> None:
        """A redis-server left by a server that died before its child could be told to stop."""
        client = aioredis.from_url(url, socket_connect_timeout=0.5)
        try:
            with contextlib.suppress(Exception):
                await client.shutdown(nosave=False)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def start(self) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisNotInstalled()
        self.dir.mkdir(parents=True, exist_ok=True)
        listen, url = self._listen_args()
        if url.startswith("unix://") and (self.dir / REDIS_SOCKET_NAME).exists():
            await self._shutdown_orphan(url)
        args = [
            binary,
            *listen,
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            "--protected-mode",
            "yes",
            # An account is one hash whose lot metadata (a JSON of ~200 bytes) is longer
            # than the default 64: above it Redis keeps the hash as a hashtable, at about
            # twice the bytes of a listpack (MEMORY USAGE of a one-lot account: 776 B
            # against 472 B, measured).
            "--hash-max-listpack-value",
            str(REDIS_HASH_MAX_LISTPACK_VALUE),
        ]
        self.process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,
            # Its own session: a Ctrl-C at the terminal reaches the server, which drains
            # its calls and then stops Redis, rather than Redis going first.
            start_new_session=True,
        )
        await self._wait_ready(url)
        self.url = url
        endpoint_file(self.dir.parent).write_text(url + "\n")
        return url

    async def _wait_ready(self, url: str) -> None:
        assert self.process is not None
        client = aioredis.from_url(url, socket_connect_timeout=0.5)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        try:
            while True:
                if self.process.returncode is not None:
                    raise RedisStartFailed(self._log_tail())
                try:
                    if await client.ping():
                        # PING answers while the AOF is still loading; wait for it.
                        info = await client.info("persistence")
                        if not info.get("loading"):
                            return
                except (aioredis.ConnectionError, aioredis.BusyLoadingError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisStartFailed(
                        "redis-server did not answer in time\n" + self._log_tail()
                    )
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        lines = log.read_text(errors="replace").splitlines()[-10:] if log.exists() else []
        return "redis-server failed to start:\n" + "\n".join(lines)

    async def stop(self) -> None:
        """SIGTERM makes redis-server fsync the append-only file and exit cleanly."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout=REDIS_START_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            endpoint_file(self.dir.parent).unlink()
