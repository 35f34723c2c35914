"""The one Nacos client facade that GPU workers and the dispatcher share.

``nacos-sdk-python`` 3.x is an asyncio + gRPC client.  Celery code is
synchronous, so :class:`Registry` owns a background thread running an event
loop, creates the SDK client *inside* that loop, and offers plain blocking
methods, each bounded by a timeout.  Facts of the SDK this class relies on
(see ``docs/architecture.md``):

- an ephemeral instance lives exactly as long as this client's gRPC
  connection; there is no heartbeat to send, and a killed process's instance
  vanishes when the server notices the connection is gone;
- one connection holds one instance per service: a process serving several
  GPUs needs one :class:`Registry` per GPU;
- ``update`` re-registers and replaces the whole metadata map;
- the SDK's ``list_instances`` reads its subscription cache once the service
  is subscribed (and subscribes as a side effect); :meth:`Registry.list_instances`
  queries the server instead, so a failed list means Nacos did not answer;
- pushes of an empty instance list are dropped unless
  ``update_cache_when_empty`` is set — we set it, because "the last GPU is
  gone" is exactly what the dispatcher must hear;
- subscription callbacks run on the client's event loop, so calling back into
  the client from one would deadlock; :meth:`Registry._call` refuses that with
  a clear error instead of hanging;
- gRPC channels do not survive ``fork()``: build the registry in the process
  that uses it (a Celery ``worker_process_init`` or bootstep, never at import);
- the SDK's reconnection loop can end for good after a server restart (3.2.0:
  a stray ``CancelledError`` while it reconnects stops its handler task, and
  the health check keeps passing on the old channel), leaving the client
  ``UNHEALTHY`` for ever with every call failing "client not connected".
  :class:`Registry` heals that: when every call has failed for
  ``reconnect_after`` seconds while the server's gRPC port accepts
  connections, it opens a new client, replays its registrations and
  subscriptions on it, and shuts the old one;
- with auth enabled on the server, the SDK logs in over HTTP (``/v1/auth/users/login``)
  and sends the token with every gRPC request; a refused login or request
  (a wrong password, no user at all, a user without permission) fails the call
  with a ``NacosException`` (code 403, or "get access token failed"), which
  :class:`Registry` reports as a :class:`RegistryError` naming the settings
  ``GPU_DISPATCH_NACOS_USERNAME`` / ``GPU_DISPATCH_NACOS_PASSWORD``.  The SDK's
  first login runs in a task nobody awaits; its failure is logged here as one
  warning instead of asyncio's "Task exception was never retrieved" traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from gpu_dispatch.settings import getter
from v2.nacos import (ClientConfigBuilder, DeregisterInstanceParam, NacosException,
                      NacosNamingService, RegisterInstanceParam, SubscribeServiceParam)
from v2.nacos.common.nacos_exception import NO_RIGHT

log = logging.getLogger(__name__)

#: Seconds :meth:`Registry.close` waits for the SDK to shut its connection.
CLOSE_TIMEOUT = 5.0
#: Seconds of failing calls, with the server reachable, after which the client is replaced.
RECONNECT_AFTER = 10.0


class RegistryError(Exception):
    """A call to the Nacos server failed or timed out; safe to retry."""


@dataclass(frozen=True)
class Instance:
    """One registered instance as the registry reports it (SDK types stay inside this module)."""

    ip: str
    port: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True
    enabled: bool = True
    cluster: str = "DEFAULT"
    weight: float = 1.0

    @property
    def key(self) -> str:
        """Nacos's identity of the instance in its service: ``ip:port``, or ``ip:port#cluster`` outside
        the default cluster."""
        return f"{self.ip}:{self.port}" if self.cluster in ("", "DEFAULT") else f"{self.ip}:{self.port}#{self.cluster}"


Callback = Callable[[list[Instance]], None]


class Registry:
    """Blocking access to one Nacos service through one client connection.

    :param server_addresses: ``host:port[,host:port]`` of the Nacos server(s) (HTTP port).
    :param service: the service name, e.g. ``gpu-inference``.
    :param namespace: Nacos namespace id; ``""`` is ``public``.
    :param group: Nacos group, default ``DEFAULT_GROUP``.
    :param username: Nacos user when the server has auth enabled, else ``""``.
    :param password: that user's password.
    :param timeout: seconds; the longest any one call may take.
    :param home: directory under which the client writes its logs and cache
        (``<home>/nacos-client``), instead of the user's home directory.
    :param reconnect_after: seconds every call may fail while the server's gRPC
        port accepts connections before the SDK client is given up and replaced
        (see the module docstring).
    """

    def __init__(self, *, server_addresses: str, service: str, home: str, namespace: str = "",
                 group: str = "DEFAULT_GROUP", username: str = "", password: str = "",
                 timeout: float = 5.0, reconnect_after: float = RECONNECT_AFTER) -> None:
        self.service = service
        self.group = group
        self.namespace = namespace
        self.timeout = timeout
        self.server_addresses = server_addresses
        self.reconnect_after = reconnect_after
        self.username = username
        self._state_lock = threading.Lock()
        self._registered: dict[tuple[str, int], dict[str, str]] = {}  # replayed on a new client
        self._subscriptions: list[Callable[[list], Awaitable[None]]] = []  # likewise
        self._reachable_failing_since: float | None = None  # monotonic
        self._replacing: Any = None  # the concurrent Future of a replacement under way
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._on_loop_exception)
        self._thread = threading.Thread(target=self._loop.run_forever, name="nacos-registry", daemon=True)
        self._thread.start()
        client_dir = os.path.join(home, "nacos-client")
        builder = (ClientConfigBuilder()
                   .server_address(server_addresses)
                   .namespace_id(namespace)
                   .log_dir(os.path.join(client_dir, "logs"))
                   .cache_dir(os.path.join(client_dir, "cache"))
                   .log_level(logging.WARNING))
        if username:
            builder = builder.username(username).password(password)
        config = builder.build()
        config.timeout_ms = int(timeout * 1000)
        config.grpc_config.grpc_timeout = int(timeout * 1000)
        config.update_cache_when_empty = True
        config.load_cache_at_start = False
        self._config = config
        self._grpc_offset = config.grpc_config.port_offset
        try:
            self._client: NacosNamingService = self._call(NacosNamingService.create_naming_service(config),
                                                          what="connect")
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_config(cls, conf: Any, **overrides: Any) -> "Registry":
        """Build a registry from the settings in ``celeryconfig`` (or a Celery ``app.conf``);
        ``overrides`` replace settings by name, e.g. ``nacos_service="other"``."""
        get = getter(conf, **overrides)
        return cls(server_addresses=get("nacos_server_addresses"), service=get("nacos_service"),
                   namespace=get("nacos_namespace"), group=get("nacos_group"),
                   username=get("nacos_username"), password=get("nacos_password"),
                   timeout=get("nacos_timeout"), home=get("home"))

    # -- instances ------------------------------------------------------------

    def register(self, ip: str, port: int, metadata: Mapping[str, str]) -> None:
        """Register (or replace) this client's ephemeral instance with ``metadata``."""
        with self._state_lock:
            self._registered[(ip, port)] = dict(metadata)
        self._call(self._client.register_instance(self._instance(ip, port, metadata)), what=f"register {ip}:{port}")

    def update(self, ip: str, port: int, metadata: Mapping[str, str]) -> None:
        """Replace the whole metadata map of this client's instance."""
        with self._state_lock:
            self._registered[(ip, port)] = dict(metadata)
        self._call(self._client.update_instance(self._instance(ip, port, metadata)), what=f"update {ip}:{port}")

    def deregister(self, ip: str, port: int) -> None:
        """Remove this client's instance now (the server also drops it when the client disconnects)."""
        with self._state_lock:
            self._registered.pop((ip, port), None)
        param = DeregisterInstanceParam(ip=ip, port=port, service_name=self.service, group_name=self.group,
                                        ephemeral=True)
        self._call(self._client.deregister_instance(param), what=f"deregister {ip}:{port}")

    def _instance(self, ip: str, port: int, metadata: Mapping[str, str]) -> RegisterInstanceParam:
        return RegisterInstanceParam(ip=ip, port=port, metadata=dict(metadata), service_name=self.service,
                                     group_name=self.group, ephemeral=True)

    def list_instances(self, healthy_only: bool = True) -> list[Instance]:
        """Instances of the service as the server reports them now.

        Asked of the server every time (a ``ServiceQueryRequest``): the SDK's own
        ``list_instances`` answers from its subscription cache once subscribed,
        even while the server is down, so it cannot tell a fresh list from a
        stale one.  Raises :class:`RegistryError` when the server does not answer.
        """
        query = self._client.grpc_client_proxy.query_instance_of_service(self.service, self.group, "",
                                                                         healthy_only)
        service = self._call(query, what="list instances")
        return [_convert(i) for i in (service.hosts if service is not None else None) or []
                if i.enabled or not healthy_only]

    def subscribe(self, callback: Callback) -> None:
        """Call ``callback(instances)`` on every change the server pushes, an empty list included.

        The callback runs on the registry's event-loop thread: keep it short and
        never call this registry from inside it.
        """
        async def on_change(instances: list) -> None:
            try:
                callback([_convert(i) for i in instances or []])
            except Exception:  # a broken callback must not kill the SDK's push handling
                log.exception("Nacos subscription callback for %s failed", self.service)

        with self._state_lock:
            self._subscriptions.append(on_change)
        self._call(self._client.subscribe(self._subscription(on_change)), what=f"subscribe to {self.service}")

    def _subscription(self, on_change: Callable[[list], Awaitable[None]]) -> SubscribeServiceParam:
        return SubscribeServiceParam(service_name=self.service, group_name=self.group, subscribe_callback=on_change)

    # -- lifecycle ------------------------------------------------------------

    def close(self) -> None:
        """Shut the client's connection (dropping its ephemeral instance) and stop the loop thread.

        Bounded: gives up after :data:`CLOSE_TIMEOUT` seconds.  Safe to call twice.
        """
        self._closed = True
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._client.shutdown(), self._loop).result(CLOSE_TIMEOUT)
            except Exception as exc:  # closing is best effort: the server drops us anyway
                log.warning("Nacos client did not shut down cleanly: %s", exc)
        self._stop_loop()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _stop_loop(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(cancel_rest(), self._loop).result(CLOSE_TIMEOUT + 1)
            except Exception as exc:
                log.debug("cancelling the Nacos client's tasks: %s", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CLOSE_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Awaitable[Any], *, what: str) -> Any:
        if threading.current_thread() is self._thread:
            coro.close()  # type: ignore[attr-defined]
            raise RuntimeError(f"cannot {what} from inside a Nacos subscription callback: it runs on the "
                               "client's event loop and would deadlock; hand the work to another thread")
        future = asyncio.run_coroutine_threadsafe(_bounded(coro, self.timeout), self._loop)
        try:
            result = future.result(self.timeout + 1)
        except (NacosException, asyncio.TimeoutError, FutureTimeout, OSError) as exc:
            future.cancel()
            refused = self._refusal(exc)
            if refused:  # the server answered: the connection is fine, the credentials are not
                self._reachable_failing_since = None
                raise RegistryError(f"Nacos at {self.server_addresses}: could not {what}: {refused}") from exc
            self._after_failure()
            raise RegistryError(f"Nacos at {self.server_addresses}: could not {what}: "
                                f"{_describe(exc)} (GPU_DISPATCH_NACOS_SERVER, GPU_DISPATCH_NACOS_TIMEOUT)") from exc
        self._reachable_failing_since = None
        return result

    # -- auth failures ---------------------------------------------------------------

    def _refusal(self, exc: BaseException) -> str | None:
        """What to tell the user when ``exc`` is the server refusing our credentials, else None."""
        if not isinstance(exc, NacosException):
            return None
        if exc.error_code == NO_RIGHT:
            who = f"user {self.username!r}" if self.username else "an anonymous client (no user set)"
        elif "get access token failed" in str(exc.message) and self._server_reachable():
            who = f"the login of user {self.username!r} (wrong user name or password?)"
        else:
            return None
        return (f"the server refused {who}: {exc.message}; set GPU_DISPATCH_NACOS_USERNAME and "
                "GPU_DISPATCH_NACOS_PASSWORD to a Nacos user allowed to use the service")

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The SDK's unawaited first login: one warning naming the settings, not a traceback."""
        exc = context.get("exception")
        if isinstance(exc, NacosException) and "get access token failed" in str(exc.message):
            log.warning("Nacos at %s: logging in as %r failed (%s); check GPU_DISPATCH_NACOS_USERNAME and "
                        "GPU_DISPATCH_NACOS_PASSWORD", self.server_addresses, self.username, exc.message)
            return
        loop.default_exception_handler(context)

    # -- replacing a client that no longer reconnects -----------------------------

    def _after_failure(self) -> None:
        """Count a failed call; replace the client once calls have failed for
        ``reconnect_after`` seconds while the server accepts connections."""
        if self._closed or (self._replacing is not None and not self._replacing.done()):
            return
        if not self._server_reachable():
            self._reachable_failing_since = None  # down: the SDK's own reconnection is what should act
            return
        now = time.monotonic()
        if self._reachable_failing_since is None:
            self._reachable_failing_since = now
        elif now - self._reachable_failing_since >= self.reconnect_after:
            log.warning("Nacos at %s answers but this client's calls have failed for %.0f s: it has stopped "
                        "reconnecting; replacing it with a new client", self.server_addresses,
                        now - self._reachable_failing_since)
            self._reachable_failing_since = now  # next replacement no sooner than reconnect_after from now
            self._replacing = asyncio.run_coroutine_threadsafe(self._replace_client(), self._loop)

    def _server_reachable(self) -> bool:
        """Whether any configured server's gRPC port accepts a TCP connection now."""
        for address in self._config.server_list:
            host, _, port = address.removeprefix("http://").removeprefix("https://").rstrip("/").rpartition(":")
            if not port.isdigit():
                continue
            try:
                with socket.create_connection((host, int(port) + self._grpc_offset), timeout=1.0):
                    return True
            except OSError:
                continue
        return False

    async def _replace_client(self) -> None:
        """Open a new client, replay registrations and subscriptions on it, swap it in, shut the old one."""
        try:
            # Not bounded by ``timeout``: the SDK's start gives up by itself after three tries
            # (a cancelled start would leave its tasks running).
            new = await NacosNamingService.create_naming_service(self._config)
        except Exception as exc:
            log.warning("could not open a new Nacos client to %s: %s", self.server_addresses, _describe(exc))
            return
        if self._closed:
            await _quietly(new.shutdown())
            return
        with self._state_lock:
            registered, subscriptions = dict(self._registered), list(self._subscriptions)
        try:
            for (ip, port), metadata in registered.items():
                await asyncio.wait_for(new.register_instance(self._instance(ip, port, metadata)), self.timeout)
            for on_change in subscriptions:
                await asyncio.wait_for(new.subscribe(self._subscription(on_change)), self.timeout)
        except (NacosException, asyncio.TimeoutError, OSError) as exc:
            log.warning("new Nacos client: replaying instances %d, subscriptions %d failed (%s); its own redo "
                        "retries them", len(registered), len(subscriptions), _describe(exc))
        old, self._client = self._client, new
        log.warning("Nacos client to %s replaced; carried over: instances %d, subscriptions %d",
                    self.server_addresses, len(registered), len(subscriptions))
        await _quietly(old.shutdown())


async def _bounded(coro: Awaitable[Any], timeout: float) -> Any:
    return await asyncio.wait_for(coro, timeout)


async def _quietly(coro: Awaitable[Any]) -> None:
    """Shut a client down within :data:`CLOSE_TIMEOUT`, logging rather than raising."""
    try:
        await asyncio.wait_for(coro, CLOSE_TIMEOUT)
    except Exception as exc:
        log.debug("shutting an old Nacos client: %s", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, FutureTimeout)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _convert(instance: Any) -> Instance:
    weight = instance.weight
    return Instance(ip=instance.ip, port=int(instance.port), metadata=dict(instance.metadata or {}),
                    healthy=bool(instance.healthy), enabled=bool(instance.enabled),
                    cluster=instance.clusterName or "DEFAULT", weight=1.0 if weight is None else float(weight))
