"""The one Nacos client facade that GPU workers and the dispatcher share.

:class:`Registry` gives plain blocking calls, each bounded by a timeout, over
nacos-sdk-python's asyncio + gRPC client, which it runs on an event loop of
its own.  The SDK facts it relies on, and the SDK faults it works around
(:mod:`gpu_dispatch.nacos_workarounds`), are in ``docs/architecture.md``
("The Nacos client").
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from gpu_dispatch.nacos_workarounds import (RECONNECT_AFTER, Healer, describe as _describe, open_replacement,
                                           quietly, server_reachable)
from v2.nacos import (ClientConfigBuilder, DeregisterInstanceParam, NacosException,
                      NacosNamingService, RegisterInstanceParam, SubscribeServiceParam)
from v2.nacos.common.nacos_exception import NO_RIGHT

log = logging.getLogger(__name__)

#: Seconds :meth:`Registry.close` waits for the SDK to shut its connection.
CLOSE_TIMEOUT = 5.0


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
        self.username = username
        self._state_lock = threading.Lock()
        self._registered: dict[tuple[str, int], dict[str, str]] = {}  # replayed on a new client
        self._subscriptions: list[Callable[[list], Awaitable[None]]] = []  # likewise
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
        self._healer = Healer(self._loop, self._server_reachable, reconnect_after, server_addresses)
        try:
            self._client: NacosNamingService = self._call(NacosNamingService.create_naming_service(config),
                                                          what="connect")
        except BaseException:
            self._stop_loop()
            raise

    @property
    def reconnect_after(self) -> float:
        """Seconds of failing calls, with the server reachable, before the SDK client is replaced."""
        return self._healer.reconnect_after

    @reconnect_after.setter
    def reconnect_after(self, seconds: float) -> None:
        self._healer.reconnect_after = seconds

    @classmethod
    def from_config(cls, conf: Any, **overrides: Any) -> "Registry":
        """Build a registry from the settings in ``celeryconfig`` (or a Celery ``app.conf``);
        ``overrides`` replace settings by name, e.g. ``nacos_service="other"``."""
        def get(name: str) -> Any:
            return overrides[name] if name in overrides else getattr(conf, name)
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
                self._healer.succeeded()
                raise RegistryError(f"Nacos at {self.server_addresses}: could not {what}: {refused}") from exc
            self._after_failure()
            raise RegistryError(f"Nacos at {self.server_addresses}: could not {what}: "
                                f"{_describe(exc)} (GPU_DISPATCH_NACOS_SERVER, GPU_DISPATCH_NACOS_TIMEOUT)") from exc
        self._healer.succeeded()
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

    # -- replacing a client that no longer reconnects (gpu_dispatch/nacos_workarounds.py) ------

    def _after_failure(self) -> None:
        if not self._closed:
            self._healer.failed(self._replace_client)

    def _server_reachable(self) -> bool:
        return server_reachable(self._config.server_list, self._grpc_offset)

    async def _replace_client(self) -> None:
        with self._state_lock:
            registered, subscriptions = dict(self._registered), list(self._subscriptions)
        replays = [self._instance(ip, port, metadata) for (ip, port), metadata in registered.items()]
        new = await open_replacement(self._config, replays, [self._subscription(s) for s in subscriptions],
                                     self.timeout, closed=lambda: self._closed, name=self.server_addresses)
        if new is not None:
            old, self._client = self._client, new
            await quietly(old.shutdown(), CLOSE_TIMEOUT)


async def _bounded(coro: Awaitable[Any], timeout: float) -> Any:
    return await asyncio.wait_for(coro, timeout)


def _convert(instance: Any) -> Instance:
    weight = instance.weight
    return Instance(ip=instance.ip, port=int(instance.port), metadata=dict(instance.metadata or {}),
                    healthy=bool(instance.healthy), enabled=bool(instance.enabled),
                    cluster=instance.clusterName or "DEFAULT", weight=1.0 if weight is None else float(weight))
