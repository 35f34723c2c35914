"""Bring up, stop and report the two servers gpu-dispatch needs on one machine.

- **Redis** (broker and result backend): the server at the configured URL is
  used when it answers; otherwise Debian's ``redis-server`` is installed if
  missing and started on the configured port.
- **Nacos** (registry): a real Nacos server, the Java one, in standalone mode.
  The official server modules are not served from Maven Central here (only
  ``nacos-client`` is), so we run the Nacos :data:`NACOS_VERSION` server modules
  as republished there by ``com.pig4cloud.nacos`` (``com.alibaba.nacos`` classes
  built from the Nacos source).  That republish lacks the console module, which
  holds Nacos's main class, so the small Maven project in ``nacos-server/``
  supplies one (see its ``NacosMain``).  Maven builds it the first time, with
  its repository and output under ``<home>`` (about half a minute); Java 17 runs
  it.  The README explains that choice.

Everything the servers write (data, logs, pid files, Maven's repository, the
Nacos build) lives under ``<home>`` (``GPU_DISPATCH_HOME``, default ``.local/``),
which git ignores.  Starting is idempotent, stopping leaves no process behind,
and readiness is awaited with a deadline; a server that fails to come up is
reported with the last lines of its log and what to check.
"""
from __future__ import annotations

import hashlib
import os
import re
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

import redis

from gpu_dispatch.settings import getter

#: Nacos server release we build and run (``com.pig4cloud.nacos:nacos-naming`` / ``nacos-config`` on
#: Maven Central); pinned in ``nacos-server/pom.xml`` too.
NACOS_VERSION = "2.0.4.RELEASE"
#: The Maven project that starts it (our main class over the republished server modules).
NACOS_PROJECT = Path(__file__).resolve().parent.parent / "nacos-server"
#: Oldest Java that runs it.
JAVA_MIN = 17
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

    def kill(self) -> str:
        """SIGKILL the server we started (fault injection: a crash, not a shutdown)."""
        pid = self.pid()
        if pid is None:
            return f"{self.name} at {self.address}: not started by gpu-dispatch, left alone"
        _signal_group(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return f"{self.name} at {self.address} killed (pid {pid})"

    def _failure(self, what: str) -> ServerError:
        tail = _tail(self.logfile, LOG_TAIL_LINES)
        checks = "\n".join(f"  - {h}" for h in self.hints())
        return ServerError(f"{self.name} at {self.address} {what}.\nLast lines of {self.logfile}:\n{tail}\n"
                           f"Check:\n{checks}")


class RedisServer(LocalServer):
    """Debian's ``redis-server``, bound to loopback, durable: an append-only file fsynced every second
    (a restart loses nothing; a crash of the machine loses at most the last second), and no eviction
    (a full Redis refuses writes rather than drop queued requests).  ``docs/reliability.md``."""

    name = "redis"

    @classmethod
    def from_url(cls, url: str, home: str | os.PathLike) -> "RedisServer":
        parsed = urlparse(url)
        if parsed.scheme not in {"redis", "rediss"}:
            raise ServerError(f"broker URL {url!r} is not a Redis URL (GPU_DISPATCH_BROKER_URL); "
                              "use e.g. redis://127.0.0.1:6379/0")
        server = cls(parsed.hostname or "127.0.0.1", parsed.port or 6379, home)
        server.url = url
        return server

    #: The URL clients use (its password, TLS); plain ``redis://host:port`` when not set.
    url = ""

    def answering(self) -> bool:
        client = redis.Redis.from_url(self.url or f"redis://{self.host}:{self.port}",
                                      socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.AuthenticationError:
            return True  # a server that wants (another) password is answering
        except redis.RedisError:
            return False
        finally:
            client.close()

    def ensure_installed(self) -> None:
        if shutil.which("redis-server"):
            return
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise ServerError("redis-server is not installed and cannot be installed here without root and "
                              "apt-get; install it (Debian/Ubuntu: apt-get install redis-server) or point "
                              "GPU_DISPATCH_BROKER_URL at a running Redis")
        _apt_install(["redis-server"], "install redis-server yourself")

    def installed_as(self) -> str:
        return shutil.which("redis-server") or "not installed"

    def command(self) -> tuple[list[str], dict[str, str]]:
        # A password goes in a file only we can read: on the command line, `ps` would show it.
        config = self.dir / "redis.conf"
        password = urlparse(self.url).password if self.url else None
        config.write_text(f"requirepass {password}\n" if password else "")
        config.chmod(0o600)
        return ([shutil.which("redis-server") or "redis-server", str(config), "--port", str(self.port), "--bind", self.host,
                 "--dir", str(self.dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                 "--maxmemory-policy", "noeviction", "--daemonize", "no", "--protected-mode", "yes"], {})


class NacosServer(LocalServer):
    """Nacos 2.0.4 (Java) in standalone mode.

    Ports, all fixed by Nacos relative to ``port``: HTTP ``port``, client gRPC ``port + 1000``,
    cluster gRPC ``port + 1001``, JRaft ``port - 1000``.  HTTP listens on ``host`` only; Nacos
    2.0.4 binds its gRPC and JRaft ports on every interface.
    """

    name = "nacos"

    def __init__(self, host: str, port: int, home: str | os.PathLike) -> None:
        super().__init__(host, port, home)
        self.build_dir = Path(home) / f"nacos-server-{NACOS_VERSION.removesuffix('.RELEASE')}"
        self.maven_repo = Path(home) / "m2"
        self.build_log = Path(home) / f"{self.build_dir.name}-build.log"

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

    # -- build -------------------------------------------------------------------

    def _stamp(self) -> Path:
        """Marks a finished build of exactly the current ``nacos-server/`` sources."""
        digest = hashlib.sha1()
        for path in sorted(p for p in NACOS_PROJECT.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(NACOS_PROJECT)).encode() + b"\0" + path.read_bytes())
        return self.build_dir / f".built-{digest.hexdigest()[:12]}"

    def _built(self) -> bool:
        return NACOS_PROJECT.is_dir() and self._stamp().exists()

    def ensure_installed(self) -> None:
        if not (NACOS_PROJECT / "pom.xml").exists():
            raise ServerError(f"the Nacos server's Maven project is missing ({NACOS_PROJECT}); gpu-dispatch "
                              "starts its local Nacos only from a source checkout (or point "
                              "GPU_DISPATCH_NACOS_SERVER at a running Nacos)")
        _ensure_java_and_maven()
        if self._built():
            return
        print(f"building the Nacos server {NACOS_VERSION} (com.pig4cloud.nacos modules from Maven Central + "
              f"{NACOS_PROJECT.name}/) into {self.build_dir} (once; about half a minute; log "
              f"{self.build_log}) ...", flush=True)
        shutil.rmtree(self.build_dir, ignore_errors=True)  # no stale classes or jars of an older build
        self.build_log.parent.mkdir(parents=True, exist_ok=True)
        # -U: retry downloads that an earlier, failed build left marked as failed in the repository.
        argv = [shutil.which("mvn") or "mvn", "-B", "-ntp", "-U", "-f", str(NACOS_PROJECT / "pom.xml"),
                f"-Dmaven.repo.local={self.maven_repo}", f"-Dnacos.build.dir={self.build_dir}",
                "compile", "org.apache.maven.plugins:maven-dependency-plugin:3.6.1:copy-dependencies"]
        with open(self.build_log, "wb") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  env=_java_env())
        if done.returncode != 0 or not (self.build_dir / "classes" / "application.properties").exists():
            raise ServerError(
                f"building the Nacos server failed (`{' '.join(argv)}`).\nLast lines of {self.build_log}:\n"
                f"{_tail(self.build_log, LOG_TAIL_LINES)}\nCheck:\n"
                f"  - Java {JAVA_MIN}+ with its compiler: `java -version`, `javac -version` "
                f"(Debian: apt-get install openjdk-17-jdk-headless)\n"
                "  - Maven: `mvn -version` (Debian: apt-get install maven)\n"
                "  - that Maven Central (https://repo.maven.apache.org/maven2) is reachable, with any proxy "
                "or mirror set in ~/.m2/settings.xml")
        self._stamp().touch()

    def installed_as(self) -> str:
        if not self._built():
            return "not installed"
        return (f"Nacos {NACOS_VERSION} (com.pig4cloud.nacos server modules + gpu-dispatch main class) "
                f"built in {self.build_dir}")

    def command(self) -> tuple[list[str], dict[str, str]]:
        ip = "127.0.0.1" if self.host == "localhost" else self.host
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        opens = ["java.base/java.lang", "java.base/java.util", "java.base/java.nio", "java.base/sun.nio.ch"]
        return [
            _java() or "java", "-Xms256m", "-Xmx512m", "-XX:-OmitStackTraceInFastThrow",
            *(arg for module in opens for arg in ("--add-opens", f"{module}=ALL-UNNAMED")),
            "-Dnacos.standalone=true",
            f"-Dnacos.home={self.dir}",
            f"-Dserver.port={self.port}",
            f"-Dserver.address={self.host}",
            f"-Dnacos.inetutils.ip-address={ip}",
            f"-Dderby.stream.error.file={self.dir / 'logs' / 'derby.log'}",
            f"-Djava.io.tmpdir={self.dir / 'tmp'}",
            "-cp", f"{self.build_dir / 'classes'}{os.pathsep}{self.build_dir / 'lib' / '*'}",
            "gpudispatch.nacos.NacosMain",
        ], _java_env()

    def hints(self) -> list[str]:
        return super().hints() + [
            f"are Nacos's other ports taken? gRPC {self.grpc_port} and {self.port + 1001}, JRaft "
            f"{self.port - 1000} (ss -ltnp | grep -E '{self.grpc_port}|{self.port + 1001}|{self.port - 1000}')",
            f"is Java {JAVA_MIN}+ the `java` found? (java -version)",
            f"did the build finish? ({self.build_dir}, log {self.build_log}; delete the directory to rebuild)",
            f"Nacos's own logs: {self.dir / 'logs'}",
        ]


def _java() -> str | None:
    """The ``java`` to use: ``$JAVA_HOME/bin/java`` when set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    return shutil.which("java")


def _java_env() -> dict[str, str]:
    java = _java()
    return {**os.environ, "JAVA_HOME": str(Path(java).resolve().parent.parent)} if java else dict(os.environ)


def _java_major(java: str) -> int:
    done = subprocess.run([java, "-version"], capture_output=True, text=True)
    match = re.search(r'version "(?:1\.)?(\d+)', done.stderr + done.stdout)
    return int(match.group(1)) if match else 0


def _ensure_java_and_maven() -> None:
    """Java 17+ (with ``javac``) and Maven, installed with apt-get when missing and we may."""
    java = _java()
    missing = []
    if not java or _java_major(java) < JAVA_MIN or not (Path(java).resolve().parent / "javac").exists():
        missing.append("openjdk-17-jdk-headless")
    if not shutil.which("mvn"):
        missing.append("maven")
    if missing:
        _apt_install(missing, f"install Java {JAVA_MIN}+ (a JDK) and Maven yourself, or point "
                              "GPU_DISPATCH_NACOS_SERVER at a running Nacos")
        java = _java()
        if not java or _java_major(java) < JAVA_MIN:
            raise ServerError(f"the Nacos server needs Java {JAVA_MIN}+, but `{java or 'java'} -version` reports "
                              f"an older one; install openjdk-17 and put it first on PATH (or set JAVA_HOME)")


def _apt_install(packages: list[str], otherwise: str) -> None:
    """Install Debian packages, or explain what to do when that is not possible here."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServerError(f"{', '.join(packages)} not installed and cannot be installed here without root and "
                          f"apt-get; {otherwise}")
    print(f"installing {' '.join(packages)} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(step, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServerError(f"`{' '.join(step)}` failed:\n{done.stderr[-2000:]}\nCheck that Debian's "
                              f"package mirror is reachable, or {otherwise}")


def local_servers(conf: object) -> tuple[RedisServer, NacosServer]:
    """The Redis and Nacos servers named by the settings (``celeryconfig`` or ``app.conf``)."""
    get = getter(conf)
    return (RedisServer.from_url(get("broker_url"), get("home")),
            NacosServer.from_addresses(get("nacos_server_addresses"), get("home")))


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
