"""kombu's Redis transports with two faults worked around: workers that die when Redis restarts, and
messages that kill a consumer.  Selected for ``redis://`` and ``sentinel://`` URLs by
``gpu_dispatch.celery``; ``docs/reliability.md`` ("Workarounds") tells each fault, its
upstream kin and the test that pins it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

#: Redis list where messages no consumer could read are set aside (newest first): an operator reads
#: it with ``gpu-dispatch dead-letters``.
DEAD_LETTER_KEY = "gpu-dispatch:dead-letter"
#: Longest dead-letter list kept (oldest entries dropped beyond it).
DEAD_LETTER_MAX = 10_000


def dead_letter(client: Any, queue: str, raw: bytes | str, reason: str) -> None:
    """Set a message aside in the dead-letter list, with why."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    entry = json.dumps({"queue": queue, "reason": reason, "at": time.time(), "message": raw[:100_000]})
    with client.pipeline() as pipe:
        pipe.lpush(DEAD_LETTER_KEY, entry).ltrim(DEAD_LETTER_KEY, 0, DEAD_LETTER_MAX - 1).execute()
    log.error("message on %s set aside in %s: %s (%s)", queue, DEAD_LETTER_KEY, reason, raw[:120])


def envelope_problem(message: Any) -> str | None:
    """Why a decoded list entry is not a kombu message envelope, or ``None`` when it is one."""
    if not isinstance(message, dict):
        return f"not a kombu message envelope (a JSON {type(message).__name__})"
    for key, kind in (("body", (str, bytes)), ("headers", dict), ("properties", dict)):
        if not isinstance(message.get(key), kind):
            return f"not a kombu message envelope (no {key})"
    if not isinstance(message["properties"].get("delivery_tag"), str) \
            or not isinstance(message["properties"].get("delivery_info"), dict):
        return "not a kombu message envelope (no delivery_tag or delivery_info)"
    return None


class _Survives:
    """What our channels add to kombu's (see the module docstring)."""

    _saved_connparams: dict | None = None

    def _connparams(self, asynchronous=False):
        transport = self.connection
        if transport is not None and transport.client is not None:
            params = super()._connparams(asynchronous=asynchronous)
            self._saved_connparams = {**(self._saved_connparams or {}), asynchronous: dict(params)}
            return params
        saved = (self._saved_connparams or {}).get(asynchronous)
        if saved is None:  # never connected: a broker error, which kombu handles, not an AttributeError
            raise kombu_redis.get_redis_ConnectionError()("kombu Redis channel used after its connection closed")
        return dict(saved)

    def _brpop_read(self, **options):
        # Capture the raw entry BRPOP returns, so an entry kombu cannot decode can be set aside.
        client = self.client
        parse, popped = client.parse_response, []

        def capture(*args, **kwargs):
            reply = parse(*args, **kwargs)
            popped.append(reply)
            return reply

        client.parse_response = capture
        try:
            return super()._brpop_read(**options)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if not popped or not popped[-1]:
                raise
            queue, raw = popped[-1]
            queue = kombu_redis.bytes_to_str(queue).rsplit(self.sep, 1)[0]
            dead_letter(client, queue, raw, f"cannot be read as a message: {type(exc).__name__}: {exc}")
            self._forget(raw)
            return True
        finally:
            del client.parse_response


    def _forget(self, raw: bytes) -> None:
        """Drop a set-aside message from the ack emulation, if kombu had already recorded it: left there,
        it would hold a prefetch slot for ever and come back after the visibility timeout."""
        try:
            tag = json.loads(raw)["properties"]["delivery_tag"]
        except (ValueError, TypeError, KeyError):
            return
        try:
            self.qos.reject(tag, requeue=False)
        except Exception as exc:  # never recorded: nothing to drop
            log.debug("dropping %s from the ack emulation: %r", tag, exc)


class Channel(_Survives, kombu_redis.Channel):
    pass


class SentinelChannel(_Survives, kombu_redis.SentinelChannel):
    def _sentinel_managed_pool(self, asynchronous=False):
        if self.connection is None or self.connection.client is None:
            raise kombu_redis.get_redis_ConnectionError()("kombu Redis channel used after its connection closed")
        return super()._sentinel_managed_pool(asynchronous)


class _DeliverChecked:
    """Transports whose every delivered entry is first checked to be a kombu envelope."""

    def _deliver(self, message, queue):
        problem = envelope_problem(message)
        if problem:
            channel = next((c for c in self.channels if c), None)
            if channel is not None:
                dead_letter(channel.client, queue, json.dumps(message), problem)
                return
        super()._deliver(message, queue)


class Transport(_DeliverChecked, kombu_redis.Transport):
    Channel = Channel


class SentinelTransport(_DeliverChecked, kombu_redis.SentinelTransport):
    Channel = SentinelChannel
