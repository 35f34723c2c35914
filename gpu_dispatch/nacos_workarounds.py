"""A workaround for nacos-sdk-python 3.2.x: a client that stopped reconnecting is replaced.

After a server restart, 3.2.0's reconnection handler can end on a stray
``CancelledError`` while its health check keeps passing on the old channel:
the client stays ``UNHEALTHY`` for ever and every call fails "client not
connected".  :class:`Healer` notices that (every call failing for
``reconnect_after`` seconds while a server's gRPC port accepts connections)
and has the registry open a new client (:func:`open_replacement`), replay its
registrations and subscriptions on it, and shut the old one.  Pinned to the
SDK's 3.2 line (pyproject.toml); ``tests/integration/test_registry.py`` shows it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Awaitable, Callable, Sequence

from v2.nacos import NacosException, NacosNamingService

log = logging.getLogger(__name__)

#: Seconds of failing calls, with the server reachable, after which the client is replaced.
RECONNECT_AFTER = 10.0


class Healer:
    """Counts failed calls and starts a replacement of the client when it is due (see the module doc).

    :param loop: the registry's event loop, where the replacement runs.
    :param reachable: whether a server's gRPC port accepts connections now.
    :param reconnect_after: seconds of failing calls before a replacement.
    :param name: the servers, for log lines.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, reachable: Callable[[], bool], reconnect_after: float,
                 name: str) -> None:
        self.loop, self.reachable, self.reconnect_after, self.name = loop, reachable, reconnect_after, name
        self._failing_since: float | None = None  # monotonic
        self._replacing: Any = None  # the concurrent Future of a replacement under way

    def succeeded(self) -> None:
        self._failing_since = None

    def failed(self, replace: Callable[[], Awaitable[None]]) -> None:
        """Count one failed call; run ``replace()`` on the loop once calls have failed long enough."""
        if self._replacing is not None and not self._replacing.done():
            return
        if not self.reachable():
            self._failing_since = None  # the server is down: the SDK's own reconnection is what should act
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.reconnect_after:
            log.warning("Nacos at %s answers but this client's calls have failed for %.0f s: it has stopped "
                        "reconnecting; replacing it with a new client", self.name, now - self._failing_since)
            self._failing_since = now  # the next replacement no sooner than reconnect_after from now
            self._replacing = asyncio.run_coroutine_threadsafe(replace(), self.loop)


def server_reachable(server_list: Sequence[str], grpc_offset: int) -> bool:
    """Whether any of the servers' gRPC port accepts a TCP connection now."""
    for address in server_list:
        host, _, port = address.removeprefix("http://").removeprefix("https://").rstrip("/").rpartition(":")
        if not port.isdigit():
            continue
        try:
            with socket.create_connection((host, int(port) + grpc_offset), timeout=1.0):
                return True
        except OSError:
            continue
    return False


async def open_replacement(config: Any, instances: Sequence[Any], subscriptions: Sequence[Any], timeout: float,
                           *, closed: Callable[[], bool], name: str) -> NacosNamingService | None:
    """A new client with ``instances`` registered and ``subscriptions`` made again; ``None`` if it failed."""
    try:
        # Not bounded by ``timeout``: the SDK's start gives up by itself after three tries
        # (a cancelled start would leave its tasks running).
        new = await NacosNamingService.create_naming_service(config)
    except Exception as exc:
        log.warning("could not open a new Nacos client to %s: %s", name, describe(exc))
        return None
    if closed():
        await quietly(new.shutdown())
        return None
    try:
        for instance in instances:
            await asyncio.wait_for(new.register_instance(instance), timeout)
        for subscription in subscriptions:
            await asyncio.wait_for(new.subscribe(subscription), timeout)
    except (NacosException, asyncio.TimeoutError, OSError) as exc:
        log.warning("new Nacos client: replaying instances %d, subscriptions %d failed (%s); its own redo "
                    "retries them", len(instances), len(subscriptions), describe(exc))
    log.warning("Nacos client to %s replaced; carried over: instances %d, subscriptions %d", name, len(instances),
                len(subscriptions))
    return new


async def quietly(coro: Awaitable[Any], timeout: float = 5.0) -> None:
    """Shut a client down within ``timeout``, logging rather than raising."""
    try:
        await asyncio.wait_for(coro, timeout)
    except Exception as exc:
        log.debug("shutting an old Nacos client: %s", exc)


def describe(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, FutureTimeout)):
        return "timed out"
    return str(exc) or type(exc).__name__
