"""Redis clients for gpu-dispatch's own keys (ledger, claims), from the same URL Celery's broker uses.

``redis://`` and ``rediss://`` URLs give a plain client; ``sentinel://``
URLs (kombu's form: ``sentinel://host:port;sentinel://host:port/db`` with the
master's name in ``broker_transport_options["master_name"]``) give a client
that always talks to the current primary.  Every client has socket timeouts
and retries a command once on a dropped connection, so a Redis restart costs
a retry, not a hang.
"""

from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import urlparse

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

#: Seconds to wait for a connection, and for one command's answer.
CONNECT_TIMEOUT = 2.0
COMMAND_TIMEOUT = 5.0


def _common() -> dict[str, Any]:
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT,
            "health_check_interval": 10,
            "retry": Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
            "retry_on_error": [redis.ConnectionError, redis.TimeoutError]}


def client(url: str, transport_options: Mapping[str, Any] | None = None) -> redis.Redis:
    """A Redis client for ``url`` (the broker's), primary-following for ``sentinel://``."""
    if url.startswith("sentinel://"):
        return _sentinel_client(url, transport_options or {})
    return redis.Redis.from_url(url, **_common())


def _sentinel_client(url: str, options: Mapping[str, Any]) -> redis.Redis:
    master = options.get("master_name")
    if not master:
        raise ValueError("a sentinel:// broker URL needs broker_transport_options['master_name'] "
                         "(GPU_DISPATCH_SENTINEL_MASTER)")
    nodes, db, password = [], 0, None
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        nodes.append((parsed.hostname or "127.0.0.1", parsed.port or 26379))
        if parsed.path.strip("/"):
            db = int(parsed.path.strip("/"))
        password = parsed.password or password
    sentinel = Sentinel(nodes, socket_timeout=CONNECT_TIMEOUT,
                        sentinel_kwargs=dict(options.get("sentinel_kwargs") or {}))
    return sentinel.master_for(master, db=db, password=password, **_common())
