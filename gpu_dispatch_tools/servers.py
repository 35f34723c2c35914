"""Bring up, stop and report the two servers gpu-dispatch needs on one machine.

- **Redis** (broker and result backend): the server at the configured URL is
  used when it answers; otherwise Debian's ``redis-server`` is installed if
  missing and started on the configured port.
- **Nacos** (registry): a real Nacos server, the Java one, in standalone mode
  (:class:`NacosServer`), or three of them as one cluster (:class:`NacosCluster`,
  ``gpu-dispatch servers up --ha``).  The official server modules are not served
  from Maven Central here (only ``nacos-client`` is), so we run the Nacos
  :data:`NACOS_VERSION` server modules as republished there by
  ``com.pig4cloud.nacos`` (``com.alibaba.nacos`` classes built from the Nacos
  source).  That republish lacks the console module, which holds Nacos's main
  class and its auth system, and ships JRaft unable to create its groups, so the
  small Maven project in ``nacos-server/`` supplies the main class, the auth
  system and the fix (see its ``NacosMain``).  Maven builds it the first time,
  with its repository and output under ``<home>`` (about half a minute); Java 17
  runs it.  The README explains that choice.

  Auth is on when a user is configured (``GPU_DISPATCH_NACOS_USERNAME`` and
  ``GPU_DISPATCH_NACOS_PASSWORD``): the server then starts with
  ``nacos.core.auth.enabled=true`` and that user as its admin (created, or its
  password reset, at every start).  Its token key and server identity are random,
  made once and kept in ``<dir>/auth.secrets`` (mode 0600); the key, the identity
  and the password reach Java in its environment, never on its command line.

Everything the servers write (data, logs, pid files, Maven's repository, the
Nacos build) lives under ``<home>`` (``GPU_DISPATCH_HOME``, default ``.local/``),
which git ignores.  Starting is idempotent, stopping leaves no process behind,
and readiness is awaited with a deadline; a server that fails to come up is
reported with the last lines of its log and what to check.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpu_dispatch_tools.processes import spawn


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
#: HTTP ports of a local Nacos cluster's nodes, from the first: far enough apart that no node's
#: derived ports (gRPC +1000 and +1001, JRaft -1000) meet another's.
CLUSTER_PORT_STEP = 20
#: Nodes of a local Nacos cluster.
CLUSTER_SIZE = 3
#: How the readiness endpoint of a cluster node in Nacos 2.0's 1.x compatibility mode begins
#: (nacos-server's ConsoleHealthController).
COMPATIBILITY_MODE = "Naming is in 1.x compatibility mode"
#: Times a cluster node that exits while the cluster forms is launched again (see NacosCluster.start).
CLUSTER_RELAUNCHES = 2

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
#: Name prefix of the network interfaces gpu-dispatch's own tooling creates (the bridge of
#: :mod:`gpu_dispatch_tools.testhosts`); a server may be started on an address of such an interface.
TOOLING_INTERFACE_PREFIX = "gdha"


def tooling_addresses() -> set[str]:
    """IPv4 addresses of this machine's interfaces that gpu-dispatch's tooling created (named
    :data:`TOOLING_INTERFACE_PREFIX`...): the only non-loopback addresses it starts servers on."""
    try:
        done = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=5)
        links = json.loads(done.stdout or "[]")
    except (OSError, ValueError, subprocess.SubprocessError):
        return set()
    return {a["local"] for link in links if str(link.get("ifname", "")).startswith(TOOLING_INTERFACE_PREFIX)
            for a in link.get("addr_info", []) if a.get("local")}


def may_start_on(host: str) -> bool:
    """Whether gpu-dispatch starts a server bound to ``host``: loopback, or an address its tooling created."""
    return host in LOOPBACK or host in tooling_addresses()


def bind_addresses(host: str) -> list[str]:
    """Where a server for ``host`` listens: ``host``, and loopback too when ``host`` is a tooling address."""
    return [host] if host in LOOPBACK else ["127.0.0.1", host]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only from the first byte (it may hold a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


#: Clients that only ask a server whether it answers: one try (redis-py's default retries a refused
#: connection for seconds).
_PROBE = {"socket_connect_timeout": 1, "socket_timeout": 1, "retry": Retry(NoBackoff(), 0)}


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
    #: The server's umask (-1: ours); 0o077 for one whose files hold data or a password it rewrites itself.
    umask = -1

    def __init__(self, host: str, port: int, home: str | os.PathLike, dir: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.dir = dir or Path(home) / f"{self.name}-{port}"
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
        proc = self.launch()
        return self.await_ready(proc, time.monotonic() + timeout, timeout)

    def launch(self) -> subprocess.Popen:
        """Start the server's process (not waiting for it to answer) and write its pid file."""
        if not may_start_on(self.host):
            raise ServerError(f"{self.name} at {self.address} does not answer, and gpu-dispatch only starts "
                              "servers on this machine (127.0.0.1, or an address of a bridge its own tooling "
                              f"created, named {TOOLING_INTERFACE_PREFIX}*); start it there or point the setting "
                              "at 127.0.0.1")
        if self.pid() is not None:  # ours, but not answering: start afresh
            self.stop()
        self.ensure_installed()
        self.dir.mkdir(parents=True, exist_ok=True)
        argv, env = self.command()
        proc = spawn(argv, self.logfile, env, append=True, cwd=self.dir, umask=self.umask)
        self.pidfile.write_text(str(proc.pid))
        return proc

    def await_ready(self, proc: subprocess.Popen, deadline: float, timeout: float) -> str:
        """Wait until the launched server answers, or fail (stopping it) when it exits or ``deadline`` passes."""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pidfile.unlink(missing_ok=True)
                raise self._failure(f"exited with status {proc.returncode} while starting")
            if self.answering():
                return f"{self.name} started at {self.address} (pid {proc.pid}, log {self.logfile})"
            time.sleep(0.2)
        self.stop()
        raise self._failure(f"did not answer within {timeout:.0f} s")

    def kill(self) -> str:
        """SIGKILL the server we started (its whole process group), as a crash would; wait until it is gone."""
        pid = self.pid()
        if pid is None:
            return f"{self.name} at {self.address}: not started by gpu-dispatch, left alone"
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pidfile.unlink(missing_ok=True)
        return f"{self.name} at {self.address} killed (pid {pid})"

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
    """Debian's ``redis-server``, bound to loopback, durable: an append-only file fsynced every second
    (a restart loses nothing; a crash of the machine loses at most the last second), and no eviction
    (a full Redis refuses writes rather than drop queued requests).  ``docs/reliability.md``."""

    name = "redis"
    umask = 0o077  # its data files, and a config file Sentinel may rewrite (CONFIG REWRITE)

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
        client = redis.Redis.from_url(self.url or f"redis://{self.host}:{self.port}", **_PROBE)
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
        write_private(config, f"requirepass {password}\n" if password else "")
        return ([shutil.which("redis-server") or "redis-server", str(config), "--port", str(self.port),
                 "--bind", *bind_addresses(self.host),
                 "--dir", str(self.dir), "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                 "--maxmemory-policy", "noeviction", "--daemonize", "no", "--protected-mode", "yes"], {})


@dataclass(frozen=True)
class NacosAuth:
    """Auth on, with this admin user: created at the server's start, or its password reset to this one."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def from_settings(cls, username: str, password: str) -> "NacosAuth | None":
        """Auth when a user is configured (GPU_DISPATCH_NACOS_USERNAME/PASSWORD), else None (auth off)."""
        if not username:
            return None
        if not password:
            raise ServerError(f"GPU_DISPATCH_NACOS_USERNAME={username!r} is set but GPU_DISPATCH_NACOS_PASSWORD is "
                              "empty; the local Nacos would start with auth on and no password for its admin: set "
                              "both, or neither for auth off")
        return cls(username, password)


#: Name the local Sentinel set gives the primary it watches, unless GPU_DISPATCH_SENTINEL_MASTER says otherwise.
SENTINEL_MASTER = "gpu-dispatch"
#: The local HA topology's URL when GPU_DISPATCH_BROKER_URL is not a ``sentinel://`` one.
DEFAULT_SENTINEL_URL = "sentinel://127.0.0.1:26379;sentinel://127.0.0.1:26380;sentinel://127.0.0.1:26381/0"
#: A data node of the set listens this far below the first sentinel's port (the primary), and one above that.
DATA_PORT_OFFSET = 100
#: Milliseconds a primary may not answer before a sentinel thinks it down (two must agree to fail over).
SENTINEL_DOWN_AFTER_MS = 1500
#: Milliseconds a failover may take before another sentinel tries.
SENTINEL_FAILOVER_TIMEOUT_MS = 10000


class RedisNode(RedisServer):
    """One data node of a :class:`RedisSentinelSet`: durable as :class:`RedisServer`, everything (the password
    too) in its 0600 config file, which Sentinel may rewrite (``CONFIG REWRITE`` after reconfiguring it)."""

    def __init__(self, host: str, port: int, home: str | os.PathLike, password: str | None,
                 min_replicas_to_write: int = 0, min_replicas_max_lag: int = 10) -> None:
        super().__init__(host, port, home)
        self.password = password
        self.replica_of: tuple[str, int] | None = None
        self.min_replicas_to_write = min_replicas_to_write
        self.min_replicas_max_lag = min_replicas_max_lag
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{host}:{port}/0"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password,
                           **{**_PROBE, "socket_connect_timeout": timeout, "socket_timeout": timeout})

    def role(self) -> str | None:
        """``master``, ``slave``, or ``None`` when it does not answer."""
        client = self.client()
        try:
            return client.info("replication").get("role")
        except redis.RedisError:
            return None
        finally:
            client.close()

    def command(self) -> tuple[list[str], dict[str, str]]:
        lines = [f"port {self.port}", f"bind {' '.join(bind_addresses(self.host))}", f"dir {self.dir}",
                 "daemonize no", "protected-mode yes", 'save ""', "appendonly yes", "appendfsync everysec",
                 "maxmemory-policy noeviction", f"replica-announce-ip {self.host}", "repl-diskless-sync-delay 0",
                 f"min-replicas-to-write {self.min_replicas_to_write}",
                 f"min-replicas-max-lag {self.min_replicas_max_lag}"]
        if self.password:
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.replica_of:
            lines.append(f"replicaof {self.replica_of[0]} {self.replica_of[1]}")
        config = self.dir / "redis.conf"
        write_private(config, "\n".join(lines) + "\n")
        return [shutil.which("redis-server") or "redis-server", str(config)], {}


class SentinelNode(LocalServer):
    """One Redis Sentinel (``redis-server --sentinel``).  Its config file (0600, with the primary's password as
    ``auth-pass``) is also where Sentinel keeps what it learnt (the current primary, replicas, other
    sentinels, the epoch): it is written only when missing, so a restarted sentinel knows the topology."""

    name = "sentinel"
    umask = 0o077  # Sentinel rewrites its config file (with the auth-pass) as it learns the topology

    def __init__(self, host: str, port: int, home: str | os.PathLike, master_name: str, password: str | None,
                 down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
                 failover_timeout_ms: int = SENTINEL_FAILOVER_TIMEOUT_MS) -> None:
        super().__init__(host, port, home)
        self.master_name = master_name
        self.password = password
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.monitor: tuple[str, int] | None = None  # the primary to watch, for a fresh config
        self.config = self.dir / "sentinel.conf"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port,
                           **{**_PROBE, "socket_connect_timeout": timeout, "socket_timeout": timeout})

    def answering(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def ensure_installed(self) -> None:
        RedisServer.ensure_installed(self)  # type: ignore[arg-type]

    def installed_as(self) -> str:
        return shutil.which("redis-server") or "not installed"

    def master(self) -> tuple[str, int] | None:
        """The primary this sentinel names now, or ``None`` when it does not answer."""
        client = self.client()
        try:
            addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
        except redis.RedisError:
            return None
        finally:
            client.close()
        return (addr[0].decode(), int(addr[1])) if addr else None

    def saved_master(self) -> tuple[str, int] | None:
        """The primary named in this sentinel's config file (Sentinel rewrites it after a failover)."""
        try:
            text = self.config.read_text()
        except OSError:
            return None
        found = re.search(rf"^sentinel monitor {re.escape(self.master_name)} (\S+) (\d+) \d+$", text, re.M)
        return (found.group(1), int(found.group(2))) if found else None

    def view(self) -> dict[str, str]:
        """What this sentinel says of the primary (``SENTINEL MASTER``), empty when it does not answer."""
        client = self.client()
        try:
            flat = client.execute_command("SENTINEL", "MASTER", self.master_name)
        except redis.RedisError:
            return {}
        finally:
            client.close()
        def text(v: Any) -> str:
            return v.decode() if isinstance(v, bytes) else str(v)

        if isinstance(flat, dict):
            return {text(k): text(v) for k, v in flat.items()}
        items = [text(v) for v in flat]
        return dict(zip(items[::2], items[1::2]))

    def command(self) -> tuple[list[str], dict[str, str]]:
        name = self.master_name
        ours = [f"port {self.port}", f"bind {' '.join(bind_addresses(self.host))}", f"dir {self.dir}",
                "daemonize no", f"sentinel announce-ip {self.host}"]
        auth = f"sentinel auth-pass {name} {self.password}" if self.password else ""
        if self.config.exists() and self.saved_master():
            text = re.sub(rf"^sentinel auth-pass {re.escape(name)} .*\n?", "", self.config.read_text(), flags=re.M)
            write_private(self.config, text.rstrip("\n") + "\n" + (auth + "\n" if auth else ""))
        else:
            host, port = self.monitor or (self.host, self.port - DATA_PORT_OFFSET)
            lines = [*ours, f"sentinel monitor {name} {host} {port} 2",
                     f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
                     f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
                     f"sentinel parallel-syncs {name} 1"] + ([auth] if auth else [])
            write_private(self.config, "\n".join(lines) + "\n")
        return [shutil.which("redis-server") or "redis-server", str(self.config), "--sentinel"], {}


class RedisSentinelSet:
    """Redis with Sentinel on this machine: a primary, a replica and three sentinels (quorum 2).

    Clients reach it through a ``sentinel://`` URL naming the sentinels, and the primary's name
    (``GPU_DISPATCH_SENTINEL_MASTER``); the data nodes listen :data:`DATA_PORT_OFFSET` below the first
    sentinel's port and one above that.  Each data node is durable as :class:`RedisServer` (AOF fsynced
    every second, no eviction); replication is asynchronous, so a failover can lose what the dead primary
    acknowledged and had not yet sent to the replica (``docs/reliability.md``).  Starting is idempotent and
    follows the topology Sentinel has settled on (after a failover the old primary comes back as a
    replica); stopping stops the sentinels first, so stopping does not fail over.

    :param host: the address every member listens on and announces (loopback, or a tooling bridge's, in
        which case they listen on loopback too).
    :param sentinel_ports: the three sentinels' ports.
    :param data_ports: the data nodes' ports; the first is the primary of a fresh set.
    :param password: the data nodes' password (``requirepass``/``masterauth``; the sentinels' ``auth-pass``),
        only ever in 0600 config files.
    :param min_replicas_to_write: the primary refuses writes while fewer replicas than this are connected
        (and have answered within ``min_replicas_max_lag`` seconds); 0 turns it off.
    """

    name = "redis-sentinel"

    def __init__(self, host: str, sentinel_ports: tuple[int, ...], data_ports: tuple[int, ...],
                 home: str | os.PathLike, *, master_name: str = SENTINEL_MASTER, password: str | None = None,
                 db: int = 0, down_after_ms: int = SENTINEL_DOWN_AFTER_MS,
                 failover_timeout_ms: int = SENTINEL_FAILOVER_TIMEOUT_MS, min_replicas_to_write: int = 0,
                 min_replicas_max_lag: int = 10) -> None:
        self.host = host
        self.master_name = master_name
        self.password = password
        self.db = db
        self.nodes = [RedisNode(host, p, home, password, min_replicas_to_write, min_replicas_max_lag)
                      for p in data_ports]
        self.sentinels = [SentinelNode(host, p, home, master_name, password, down_after_ms, failover_timeout_ms)
                          for p in sentinel_ports]

    @classmethod
    def from_url(cls, url: str, master_name: str, home: str | os.PathLike, **options: Any) -> "RedisSentinelSet":
        """The set a ``sentinel://`` URL names (its sentinels; the data nodes by :data:`DATA_PORT_OFFSET`)."""
        hosts, ports, password, db = set(), [], None, 0
        for part in url.split(";"):
            parsed = urlparse(part.strip())
            if parsed.scheme != "sentinel":
                raise ServerError(f"{part.strip()!r} is not a sentinel:// URL (GPU_DISPATCH_BROKER_URL); use e.g. "
                                  f"{DEFAULT_SENTINEL_URL}")
            hosts.add(parsed.hostname or "127.0.0.1")
            ports.append(parsed.port or 26379)
            password = parsed.password or password
            if parsed.path.strip("/"):
                db = int(parsed.path.strip("/"))
        if len(hosts) != 1 or len(ports) != 3:
            raise ServerError(f"the local Sentinel set is three sentinels on one address; {sanitize_url(url)!r} "
                              f"names {len(ports)} on {len(hosts)} (use e.g. {DEFAULT_SENTINEL_URL})")
        first = ports[0] - DATA_PORT_OFFSET
        return cls(hosts.pop(), tuple(ports), (first, first + 1), home, master_name=master_name or SENTINEL_MASTER,
                   password=password, db=db, **options)

    # -- what clients use --------------------------------------------------------------

    def url(self, db: int | None = None) -> str:
        """The ``sentinel://`` URL of this set (with the password), for database ``db``."""
        auth = f":{self.password}@" if self.password else ""
        parts = [f"sentinel://{auth}{s.host}:{s.port}" for s in self.sentinels]
        return ";".join(parts) + f"/{self.db if db is None else db}"

    @property
    def address(self) -> str:
        return f"{self.host}:{','.join(str(s.port) for s in self.sentinels)}"

    # -- topology ---------------------------------------------------------------------

    def members(self) -> list[LocalServer]:
        return [*self.nodes, *self.sentinels]

    def node_at(self, address: tuple[str, int] | None) -> RedisNode | None:
        return next((n for n in self.nodes if address and n.port == address[1]), None)

    def primary(self) -> tuple[str, int] | None:
        """The primary most answering sentinels name now; ``None`` when none answers."""
        named = [m for m in (s.master() for s in self.sentinels) if m]
        return max(set(named), key=named.count) if named else None

    def current_primary(self) -> RedisNode:
        """The node that is (or, with the set down, was last) the primary: what the sentinels say, else their
        config files, else the first data node."""
        for where in (self.primary(), *(s.saved_master() for s in self.sentinels)):
            node = self.node_at(where)
            if node is not None:
                return node
        return self.nodes[0]

    def answering(self) -> bool:
        """Every member answers and the sentinels agree on a primary that answers as one."""
        if not all(m.answering() for m in self.members()):
            return False
        node = self.node_at(self.primary())
        return node is not None and node.role() == "master"

    def healthy(self) -> bool:
        """:meth:`answering`, and the sentinels see the replica(s) and each other: a failover can happen."""
        if not self.answering():
            return False
        for sentinel in self.sentinels:
            view = sentinel.view()
            if int(view.get("num-slaves", 0)) < len(self.nodes) - 1 \
                    or int(view.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        primary = self.node_at(self.primary())
        client = primary.client()
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return sum(r.get("state") == "online" for r in replicas) >= len(self.nodes) - 1

    # -- start, stop, faults ------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start whatever member is not running, as the current topology wants it; wait until the set is
        :meth:`healthy`."""
        if self.healthy():
            return f"{self.name} already answering at {self.address} (primary {self.primary_address()})"
        done = []
        primary = self.current_primary()
        for node in sorted(self.nodes, key=lambda n: n is not primary):
            if not node.answering():
                node.replica_of = None if node is primary else (primary.host, primary.port)
                done.append(node.start(timeout))
        for sentinel in self.sentinels:
            if not sentinel.answering():
                sentinel.monitor = (primary.host, primary.port)
                done.append(sentinel.start(timeout))
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise ServerError(f"{self.name} at {self.address}: every member started but the sentinels do not "
                                  f"see a primary with its replica and each other within {timeout:.0f} s:\n"
                                  + "\n".join(self.status_lines())
                                  + f"\nCheck the sentinels' logs: {self.sentinels[0].logfile} ...")
            time.sleep(0.2)
        done.append(f"{self.name} ready at {self.address}: primary {self.primary_address()}, master name "
                    f"{self.master_name!r}")
        return "\n".join(done)

    def start_node(self, node: RedisNode, timeout: float = START_TIMEOUT) -> str:
        """(Re)start one data node as a replica of the current primary (after a fault, say)."""
        primary = self.node_at(self.primary())
        node.replica_of = None if primary in (None, node) else (primary.host, primary.port)
        return node.start(timeout)

    def primary_address(self) -> str:
        where = self.primary()
        return f"{where[0]}:{where[1]}" if where else "none"

    def stop(self, timeout: float = STOP_TIMEOUT) -> str:
        """Stop the members gpu-dispatch started: sentinels first, then replicas, the primary last."""
        primary = self.current_primary()
        order = [*self.sentinels, *sorted(self.nodes, key=lambda n: n is primary)]
        return "\n".join(m.stop(timeout) for m in order)

    def kill_primary(self) -> RedisNode:
        """SIGKILL the data node the sentinels name as primary (fault injection); returns it."""
        node = self.node_at(self.primary())
        if node is None:
            raise ServerError(f"{self.name} at {self.address}: no sentinel names a primary")
        node.kill()
        return node

    def wait_for_failover(self, old: RedisNode, timeout: float = 60.0) -> RedisNode:
        """Wait until a majority of sentinels name another primary that answers as one; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            named = [s.master() for s in self.sentinels]
            node = self.node_at(self.primary())
            if node is not None and node is not old and sum(m == (node.host, node.port) for m in named) >= 2 \
                    and node.role() == "master":
                return node
            time.sleep(0.05)
        raise ServerError(f"{self.name} at {self.address}: no failover from {old.address} within {timeout:.0f} s:\n"
                          + "\n".join(self.status_lines()))

    def status_lines(self) -> list[str]:
        primary = self.primary()
        lines = []
        for member in self.members():
            line = member.status().line()
            if isinstance(member, RedisNode) and member.answering():
                line += " primary" if primary and member.port == primary[1] else " replica"
            lines.append(line)
        lines.append(f"primary of {self.master_name!r} per the sentinels: {self.primary_address()}")
        return lines

    def status(self) -> list[Status]:
        """Each member's status (as a cluster's)."""
        return self.statuses()

    def statuses(self) -> list[Status]:
        return [m.status() for m in self.members()]


def sanitize_url(url: str) -> str:
    return re.sub(r"(://[^:/@;]*:)[^@;]*@", r"\1**@", url)


class NacosServer(LocalServer):
    """Nacos 2.0.4 (Java), standalone or one node of a :class:`NacosCluster`.

    Ports, all fixed by Nacos relative to ``port``: HTTP ``port``, client gRPC ``port + 1000``,
    cluster gRPC ``port + 1001``, JRaft ``port - 1000``.  HTTP listens on ``host`` only; Nacos
    2.0.4 binds its gRPC and JRaft ports on every interface.

    :param auth: the admin user when auth is on; ``None`` for auth off.
    :param members: ``ip:port`` of every node (this one included) to run as a cluster node; ``None``
        for standalone.
    :param secrets_file: where the token key and server identity are kept (a cluster's nodes share one);
        default ``<dir>/auth.secrets``.
    """

    name = "nacos"

    def __init__(self, host: str, port: int, home: str | os.PathLike, *, auth: NacosAuth | None = None,
                 members: list[str] | None = None, dir: Path | None = None,
                 secrets_file: Path | None = None) -> None:
        super().__init__(host, port, home, dir)
        self.auth = auth
        self.members = members
        self.secrets_file = secrets_file or self.dir / "auth.secrets"
        self.build_dir = Path(home) / f"nacos-server-{NACOS_VERSION.removesuffix('.RELEASE')}"
        self.maven_repo = Path(home) / "m2"
        self.build_log = Path(home) / f"{self.build_dir.name}-build.log"

    @classmethod
    def from_addresses(cls, addresses: str, home: str | os.PathLike, auth: NacosAuth | None = None) -> "NacosServer":
        host, port = _split_address(addresses.split(",")[0])
        return cls(host, port, home, auth=auth)

    @property
    def grpc_port(self) -> int:
        return self.port + 1000

    @property
    def readiness_url(self) -> str:
        return f"http://{self.host}:{self.port}/nacos/v1/console/health/readiness"

    def answering(self) -> bool:
        if self.readiness()[0] != 200:
            return False
        try:
            with socket.create_connection((self.host, self.grpc_port), timeout=1):
                return True
        except OSError:
            return False

    def readiness(self) -> tuple[int, str]:
        """Status and body of the readiness endpoint; ``(0, reason)`` when it does not answer."""
        try:
            with urllib.request.urlopen(self.readiness_url, timeout=2) as reply:
                return reply.status, reply.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except (OSError, urllib.error.URLError, http.client.HTTPException) as exc:
            # HTTPException: a node still starting may answer with something that is not HTTP yet
            # (seen: the request line echoed back, BadStatusLine) — not ready, like a closed port.
            return 0, f"{type(exc).__name__}: {exc}"

    def request(self, method: str, path: str, params: dict[str, str]) -> tuple[int, str]:
        """Call Nacos's HTTP API (``/nacos`` + ``path``), logged in as the admin when auth is on."""
        base = f"http://{self.host}:{self.port}/nacos"
        query = dict(params)
        try:
            if self.auth is not None:
                form = urllib.parse.urlencode({"username": self.auth.username, "password": self.auth.password})
                with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/auth/users/login", data=form.encode(),
                                                                   method="POST"), timeout=5) as reply:
                    query["accessToken"] = json.loads(reply.read())["accessToken"]
            url = f"{base}{path}?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as reply:
                return reply.status, reply.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError, KeyError) as exc:
            return 0, str(exc)

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
        # java.util.concurrent.atomic: Nacos's Hessian serializer writes persistent instances' AtomicLongs.
        opens = ["java.base/java.lang", "java.base/java.util", "java.base/java.util.concurrent.atomic",
                 "java.base/java.nio", "java.base/sun.nio.ch"]
        mode = ["-Dnacos.standalone=true"]
        if self.members is not None:
            (self.dir / "conf").mkdir(parents=True, exist_ok=True)
            (self.dir / "conf" / "cluster.conf").write_text("".join(f"{m}\n" for m in self.members))
            mode = ["-Dnacos.standalone=false", "-DembeddedStorage=true"]
        env = _java_env()
        auth = []
        if self.auth is not None:
            key, identity = self._secrets()
            auth = ["-Dnacos.core.auth.enabled=true", f"-Dgpudispatch.nacos.admin.username={self.auth.username}"]
            env.update({"NACOS_CORE_AUTH_DEFAULT_TOKEN_SECRET_KEY": key,
                        "NACOS_CORE_AUTH_SERVER_IDENTITY_VALUE": identity,
                        "GPUDISPATCH_NACOS_ADMIN_PASSWORD": self.auth.password})
        return [
            _java() or "java", "-Xms256m", "-Xmx512m", "-XX:-OmitStackTraceInFastThrow",
            *(arg for module in opens for arg in ("--add-opens", f"{module}=ALL-UNNAMED")),
            *mode,
            *auth,
            f"-Dnacos.home={self.dir}",
            f"-Dserver.port={self.port}",
            f"-Dserver.address={self.host}",
            f"-Dnacos.inetutils.ip-address={ip}",
            f"-Dderby.stream.error.file={self.dir / 'logs' / 'derby.log'}",
            f"-Djava.io.tmpdir={self.dir / 'tmp'}",
            "-cp", f"{self.build_dir / 'classes'}{os.pathsep}{self.build_dir / 'lib' / '*'}",
            "gpudispatch.nacos.NacosMain",
        ], env

    def _secrets(self) -> tuple[str, str]:
        """The token key (base64 of 32 random bytes) and server identity, made once and kept private."""
        try:
            saved = json.loads(self.secrets_file.read_text())
            return saved["token_secret_key"], saved["server_identity"]
        except (OSError, ValueError, KeyError):
            pass
        key = base64.b64encode(secrets.token_bytes(32)).decode()
        identity = secrets.token_urlsafe(24)
        self.secrets_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.secrets_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"token_secret_key": key, "server_identity": identity}, out)
        return key, identity

    def hints(self) -> list[str]:
        hints = super().hints() + [
            f"are Nacos's other ports taken? gRPC {self.grpc_port} and {self.port + 1001}, JRaft "
            f"{self.port - 1000} (ss -ltnp | grep -E '{self.grpc_port}|{self.port + 1001}|{self.port - 1000}')",
            f"is Java {JAVA_MIN}+ the `java` found? (java -version)",
            f"did the build finish? ({self.build_dir}, log {self.build_log}; delete the directory to rebuild)",
            f"Nacos's own logs: {self.dir / 'logs'}",
        ]
        if self.members is not None:
            hints.append(f"a cluster node is ready only once a majority of {', '.join(self.members)} is up")
        return hints


class NacosCluster:
    """Three :class:`NacosServer` nodes on this machine as one Nacos cluster (``cluster.conf`` lists them,
    embedded storage replicated by JRaft), for a highly available registry.

    Clients list every node: ``GPU_DISPATCH_NACOS_SERVER=127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3``.  Each
    node's files live in ``<home>/nacos-cluster-P1/node-P/``; the nodes share one token key and server
    identity (``<home>/nacos-cluster-P1/auth.secrets``), so a token from one node is valid on all.  A node
    is ready only once a majority of the nodes is up (JRaft needs a leader), so :meth:`start` launches all
    the nodes before waiting for any.
    """

    name = "nacos cluster"

    def __init__(self, host: str, ports: list[int], home: str | os.PathLike, auth: NacosAuth | None = None) -> None:
        if len(ports) != CLUSTER_SIZE or len(set(ports)) != CLUSTER_SIZE:
            raise ServerError(f"a local Nacos cluster has {CLUSTER_SIZE} nodes on distinct ports, not {ports}")
        self.host = host
        self.ports = ports
        self.auth = auth
        self.dir = Path(home) / f"nacos-cluster-{ports[0]}"
        ip = "127.0.0.1" if host == "localhost" else host
        members = [f"{ip}:{port}" for port in ports]
        self.nodes = [NacosServer(host, port, home, auth=auth, members=members, dir=self.dir / f"node-{port}",
                                  secrets_file=self.dir / "auth.secrets") for port in ports]

    @classmethod
    def from_addresses(cls, addresses: str, home: str | os.PathLike, auth: NacosAuth | None = None) -> "NacosCluster":
        """The nodes named by ``addresses`` when it lists three; from one address, that port and the next two
        at :data:`CLUSTER_PORT_STEP` apart."""
        parsed = [_split_address(a) for a in addresses.split(",") if a.strip()]
        hosts = {host for host, _ in parsed}
        if len(hosts) != 1:
            raise ServerError(f"the nodes of a local Nacos cluster share one host; GPU_DISPATCH_NACOS_SERVER names "
                              f"{', '.join(sorted(hosts))}")
        ports = [port for _, port in parsed]
        if len(ports) == 1:
            ports = [ports[0] + i * CLUSTER_PORT_STEP for i in range(CLUSTER_SIZE)]
        return cls(hosts.pop(), ports, home, auth=auth)

    @property
    def addresses(self) -> str:
        """What clients set GPU_DISPATCH_NACOS_SERVER to."""
        return ",".join(node.address for node in self.nodes)

    @property
    def address(self) -> str:
        return self.addresses

    def answering(self) -> bool:
        return all(node.answering() for node in self.nodes)

    def ensure_installed(self) -> None:
        self.nodes[0].ensure_installed()

    def installed_as(self) -> str:
        return self.nodes[0].installed_as()

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start the nodes that do not answer (all at once) and wait until every node answers.

        A node that exits while the cluster forms is launched again (up to :data:`CLUSTER_RELAUNCHES`
        times): Nacos 2.x with embedded storage sometimes fails its start when the config group's
        Raft leader changes under its first read ("The Raft Group [nacos_config] did not find the
        Leader node", alibaba/nacos#10698); a second start joins the cluster as usual.
        """
        deadline = time.monotonic() + timeout
        self.ensure_installed()
        launched = {node: node.launch() for node in self.nodes if not node.answering()}
        if not launched:
            return f"{self.name} already answering at {self.addresses}"
        pending, relaunches, done = dict(launched), dict.fromkeys(launched, 0), []
        switched, next_switch = False, 0.0
        try:
            while pending:
                if not switched and time.monotonic() >= next_switch and any(
                        node.readiness()[1].startswith(COMPATIBILITY_MODE) for node in pending):
                    switched, said = self._leave_compatibility_mode()
                    done.append(said)
                    next_switch = time.monotonic() + 3.0
                for node, proc in list(pending.items()):
                    if proc.poll() is not None:
                        if relaunches[node] >= CLUSTER_RELAUNCHES:
                            node.pidfile.unlink(missing_ok=True)
                            raise node._failure(f"exited with status {proc.returncode} while starting, "
                                                f"{relaunches[node] + 1} times")
                        relaunches[node] += 1
                        done.append(f"{node.name} at {node.address} exited while the cluster formed; launched again")
                        pending[node] = node.launch()
                    elif node.answering():
                        done.append(f"{node.name} started at {node.address} (pid {proc.pid}, log {node.logfile})")
                        del pending[node]
                if pending and time.monotonic() >= deadline:
                    raise next(iter(pending))._failure(f"did not answer within {timeout:.0f} s")
                time.sleep(0.2)
        except ServerError:
            for node in launched:
                node.stop()
            raise
        return "\n".join(done) + f"\n{self.name} up: GPU_DISPATCH_NACOS_SERVER={self.addresses}"

    def _leave_compatibility_mode(self) -> tuple[bool, str]:
        """Turn Nacos 2.0's double write off: the cluster then serves gRPC (2.x) clients, and remembers it.

        A new 2.0.4 cluster starts compatible with 1.x nodes and clients, refusing gRPC requests until
        its upgrade check passes, which in 2.0.4 may never happen once some nodes have upgraded and
        others restart; Nacos's upgrade guide has the operator switch double write off instead.  The
        switch is a cluster-wide setting (any node takes it); each node applies it within 5 s.
        """
        replies = []
        for node in self.nodes:
            status, body = node.request("PUT", "/v1/ns/operator/switches",
                                        {"entry": "doubleWriteEnabled", "value": "false"})
            if status == 200:
                return True, f"{self.name}: double write off (doubleWriteEnabled=false via {node.address}): 2.x mode"
            replies.append(f"{node.address}: {status} {body[:200]}")
        return False, f"{self.name}: could not turn double write off yet ({'; '.join(replies)})"

    def stop(self, timeout: float = STOP_TIMEOUT) -> str:
        return "\n".join(node.stop(timeout) for node in self.nodes)

    def status(self) -> list[Status]:
        return [node.status() for node in self.nodes]

    def kill_node(self, index: int) -> "NacosServer":
        """SIGKILL one node (fault injection); the other two go on serving."""
        node = self.nodes[index]
        print(f"  {node.kill()}")
        return node

    def start_node(self, node: "NacosServer", timeout: float = START_TIMEOUT * 3) -> str:
        """Start a killed node again; it rejoins with its own data and the others' instances."""
        return node.start(timeout=timeout)


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ServerError(f"Nacos address {address.strip()!r} is not host:port (GPU_DISPATCH_NACOS_SERVER); "
                          "use e.g. 127.0.0.1:8848")
    return host, int(port)


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


def local_servers(conf: object, ha: bool = False) -> tuple[RedisServer, NacosServer | NacosCluster]:
    """The Redis and Nacos servers named by the settings (``celeryconfig`` or ``app.conf``): Nacos
    standalone, or a :class:`NacosCluster` with ``ha``; auth on when a Nacos user is configured."""
    return RedisServer.from_url(conf.broker_url, conf.home), local_nacos(conf, cluster=ha)


def local_nacos(conf: object, cluster: bool = False) -> NacosServer | NacosCluster:
    """The Nacos the settings name: one node, or with ``cluster`` a :class:`NacosCluster` (of the three
    addresses given, or of three nodes from the one); auth on when a Nacos user is configured."""
    auth = NacosAuth.from_settings(conf.nacos_username, conf.nacos_password)
    return (NacosCluster if cluster else NacosServer).from_addresses(conf.nacos_server_addresses, conf.home, auth=auth)


def ha_redis(conf: object, **options: Any) -> RedisSentinelSet:
    """The local Redis-with-Sentinel set: the broker URL's when it is ``sentinel://``, else
    :data:`DEFAULT_SENTINEL_URL` (clients then need GPU_DISPATCH_BROKER_URL set to it)."""
    url = conf.broker_url if conf.broker_url.startswith("sentinel://") else DEFAULT_SENTINEL_URL
    return RedisSentinelSet.from_url(url, conf.sentinel_master or SENTINEL_MASTER, conf.home, **options)


def local_ha_servers(conf: object) -> list:
    """The servers of the highly available topology (``gpu-dispatch servers up --ha``): Redis with Sentinel
    and a 3-node Nacos cluster, each with ``start``/``stop``/``status``."""
    return [ha_redis(conf), local_nacos(conf, cluster=True)]


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
