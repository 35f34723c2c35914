"""Bring up, stop and report the two servers gpu-dispatch needs on one machine.

- **Redis** (broker and result backend): the server at the configured URL is
  used when it answers; otherwise Debian's ``redis-server`` is installed if
  missing and started on the configured port.
- **Nacos** (registry): a real Nacos server in standalone mode.  The official
  Java server is not published on Maven Central (only ``nacos-client`` is), so
  we run **r-nacos**, the Rust implementation of the Nacos server, pinned to
  :data:`RNACOS_VERSION` and built from crates.io with ``cargo install`` into
  our directory the first time (about 6 minutes on two cores).  The README
  explains that choice.

Everything the servers write (data, logs, pid files, the r-nacos build) lives
under ``<home>`` (``GPU_DISPATCH_HOME``, default ``.local/``), which git
ignores.  Starting is idempotent, stopping leaves no process behind, and
readiness is awaited with a deadline; a server that fails to come up is
reported with the last lines of its log and what to check.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

#: r-nacos release we build and run (crates.io package ``rnacos``).
RNACOS_VERSION = "0.8.8"
#: Seconds to wait for a server to answer after starting it.
START_TIMEOUT = 60.0
#: Seconds to wait for a server to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: Lines of a server's log shown when it fails to start.
LOG_TAIL_LINES = 25

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServerError(RuntimeError):
    """A server could not be installed, started or reached; the message says what to check."""


@dataclass
class Status:
    name: str
    address: str
    answering: bool
    pid: int | None
    managed: bool  # started by us (we hold its pid file) rather than found running

    def line(self) -> str:
        state = "up" if self.answering else "down"
        owner = f"pid {self.pid}, started by gpu-dispatch" if self.managed else "not started by gpu-dispatch"
        return f"{self.name:<6} {self.address:<22} {state:<5} ({owner})" if self.answering or self.managed \
            else f"{self.name:<6} {self.address:<22} {state}"


class LocalServer:
    """A server process we may start, whose files live in ``<home>/<name>-<port>/``."""

    name = "server"

    def __init__(self, host: str, port: int, home: str | os.PathLike) -> None:
        self.host = host
        self.port = port
        self.dir = Path(home) / f"{self.name}-{port}"
        self.pidfile = self.dir / "server.pid"
        self.logfile = self.dir / "server.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- to be provided by each server -----------------------------------------

    def answering(self) -> bool:
        raise NotImplementedError

    def ensure_installed(self) -> None:
        raise NotImplementedError

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def installed_as(self) -> str:
        raise NotImplementedError

    def hints(self) -> list[str]:
        return [f"is port {self.port} taken by another program? (ss -ltnp | grep {self.port})"]

    # -- shared behaviour --------------------------------------------------------

    def pid(self) -> int | None:
        """The pid in our pid file, if that process is still alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def status(self) -> Status:
        pid = self.pid()
        return Status(self.name, self.address, self.answering(), pid, pid is not None)

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the server unless it already answers; return what was done."""
        if self.answering():
            return f"{self.name} already answering at {self.address}"
        if self.host not in LOOPBACK:
            raise ServerError(f"{self.name} at {self.address} does not answer, and gpu-dispatch only starts "
                              "servers on this machine (127.0.0.1); start it there or point the setting at "
                              "127.0.0.1")
        if self.pid() is not None:  # ours, but not answering: start afresh
            self.stop()
        self.ensure_installed()
        self.dir.mkdir(parents=True, exist_ok=True)
        argv, env = self.command()
        with open(self.logfile, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.dir, env={**os.environ, **env}, start_new_session=True)
        self.pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise self._failure(f"exited with status {proc.returncode} while starting")
            if self.answering():
                return f"{self.name} started at {self.address} (pid {proc.pid}, log {self.logfile})"
            time.sleep(0.2)
        self.stop()
        raise self._failure(f"did not answer within {timeout:.0f} s")

    def stop(self, timeout: float = STOP_TIMEOUT) -> str:
        """Stop the server we started (its whole process group); never touch one we did not start."""
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return f"{self.name} at {self.address}: not started by gpu-dispatch, left alone"
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return f"{self.name} at {self.address} stopped (pid {pid})"

    def _failure(self, what: str) -> ServerError:
        tail = _tail(self.logfile, LOG_TAIL_LINES)
        checks = "\n".join(f"  - {h}" for h in self.hints())
        return ServerError(f"{self.name} at {self.address} {what}.\nLast lines of {self.logfile}:\n{tail}\n"
                           f"Check:\n{checks}")


class RedisServer(LocalServer):
    """Debian's ``redis-server``, without persistence, bound to loopback."""

    name = "redis"

    @classmethod
    def from_url(cls, url: str, home: str | os.PathLike) -> "RedisServer":
        parsed = urlparse(url)
        if parsed.scheme not in {"redis", "rediss"}:
            raise ServerError(f"broker URL {url!r} is not a Redis URL (GPU_DISPATCH_BROKER_URL); "
                              "use e.g. redis://127.0.0.1:6379/0")
        return cls(parsed.hostname or "127.0.0.1", parsed.port or 6379, home)

    def answering(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def ensure_installed(self) -> None:
        if shutil.which("redis-server"):
            return
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ServerError("redis-server is not installed and cannot be installed here without root and "
                              "apt-get; install it (Debian/Ubuntu: apt-get install redis-server) or point "
                              "GPU_DISPATCH_BROKER_URL at a running Redis")
        print("installing redis-server with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
            done = subprocess.run(step, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise ServerError(f"`{' '.join(step)}` failed:\n{done.stderr[-2000:]}\nCheck that Debian's "
                                  "package mirror is reachable, or install redis-server yourself")

    def installed_as(self) -> str:
        return shutil.which("redis-server") or "not installed"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return ([shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", self.host,
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--protected-mode", "yes"], {})


class NacosServer(LocalServer):
    """r-nacos in standalone mode: HTTP on ``port``, gRPC on ``port + 1000``, console on ``port + 2000``."""

    name = "nacos"

    def __init__(self, host: str, port: int, home: str | os.PathLike) -> None:
        super().__init__(host, port, home)
        self.install_root = Path(home) / f"rnacos-{RNACOS_VERSION}"
        self.binary = self.install_root / "bin" / "rnacos"

    @classmethod
    def from_addresses(cls, addresses: str, home: str | os.PathLike) -> "NacosServer":
        first = addresses.split(",")[0].strip()
        host, _, port = first.rpartition(":")
        if not host or not port.isdigit():
            raise ServerError(f"Nacos address {first!r} is not host:port (GPU_DISPATCH_NACOS_SERVER); "
                              "use e.g. 127.0.0.1:8848")
        return cls(host, int(port), home)

    @property
    def grpc_port(self) -> int:
        return self.port + 1000

    @property
    def readiness_url(self) -> str:
        return f"http://{self.host}:{self.port}/nacos/v1/console/health/readiness"

    def answering(self) -> bool:
        try:
            with urllib.request.urlopen(self.readiness_url, timeout=2) as reply:
                if reply.status != 200:
                    return False
            with socket.create_connection((self.host, self.grpc_port), timeout=1):
                return True
        except (OSError, urllib.error.URLError):
            return False

    def ensure_installed(self) -> None:
        if self.binary.exists():
            return
        cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
        if not Path(cargo).exists():
            raise ServerError("building the Nacos server (r-nacos) needs Rust's cargo, which is not installed; "
                              "install Rust (https://rustup.rs or Debian's `cargo` package) and retry")
        print(f"building the Nacos server r-nacos {RNACOS_VERSION} from crates.io into {self.install_root} "
              "(once; about 6 minutes on two cores) ...", flush=True)
        build_log = Path(self.install_root.parent) / f"rnacos-{RNACOS_VERSION}-build.log"
        build_log.parent.mkdir(parents=True, exist_ok=True)
        with open(build_log, "wb") as log:
            done = subprocess.run([cargo, "install", "rnacos", "--version", RNACOS_VERSION, "--locked",
                                   "--root", str(self.install_root)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not self.binary.exists():
            raise ServerError(f"`cargo install rnacos --version {RNACOS_VERSION}` failed.\nLast lines of "
                              f"{build_log}:\n{_tail(build_log, LOG_TAIL_LINES)}\nCheck that crates.io is "
                              "reachable and that a C toolchain (cc) is installed")

    def installed_as(self) -> str:
        return f"r-nacos {RNACOS_VERSION} at {self.binary}" if self.binary.exists() else "not installed"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return [str(self.binary)], {
            "RNACOS_HTTP_PORT": str(self.port),
            "RNACOS_GRPC_PORT": str(self.grpc_port),
            "RNACOS_HTTP_CONSOLE_PORT": str(self.port + 2000),
            "RNACOS_SDK_HOST": self.host,
            "RNACOS_CONSOLE_HOST": self.host,
            "RNACOS_DATA_DIR": str(self.dir / "data"),
            "RNACOS_RAFT_NODE_ADDR": f"{self.host}:{self.grpc_port}",
            # r-nacos otherwise pins an instance's first metadata and ignores the
            # re-registrations that carry every refresh; real Nacos has no such store.
            "RNACOS_NAMING_INSTANCE_METADATA_PERSISTENCE_ENABLE": "false",
            "RUST_LOG": "warn",
        }

    def hints(self) -> list[str]:
        return super().hints() + [
            f"is the gRPC port {self.grpc_port} (HTTP port + 1000) or console port {self.port + 2000} taken?",
            f"did the build finish? ({self.binary} should exist)",
        ]


def local_servers(conf: object, home: str | None = None) -> tuple[RedisServer, NacosServer]:
    """The Redis and Nacos servers named by the settings (``celeryconfig`` or ``app.conf``)."""
    get = (lambda n: conf[n]) if isinstance(conf, dict) else (lambda n: getattr(conf, n))
    base = home or get("home")
    return RedisServer.from_url(get("broker_url"), base), NacosServer.from_addresses(get("nacos_server_addresses"), base)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie that is not our child counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"
