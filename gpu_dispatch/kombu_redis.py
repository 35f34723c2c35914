"""The one place that knows how kombu's Redis transport lays out queues and unacknowledged messages.

Recovery needs three things of it: which task ids sit in a queue's lists,
which messages workers hold unacknowledged, and to put one of those back or
drop it.  Each is done through kombu's own channel attributes and ``QoS``
methods where kombu has them; ``tests/unit/test_kombu_adapter.py`` pins what
is read here to the kombu versions in :data:`TESTED_KOMBU`, and fails loudly
on any other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import kombu

from gpu_dispatch.contract import ATTEMPT_HEADER

#: kombu versions (major, minor) whose Redis transport this adapter was tested with.
TESTED_KOMBU = ((5, 7),)


@dataclass(frozen=True, slots=True)
class Unacked:
    """One message a consumer took and has not acknowledged (kombu's ack emulation)."""

    tag: str
    queue: str
    task_id: str
    since: float | None  # Unix time kombu recorded it
    payload: dict


def task_id_of(payload: Any) -> tuple[str, int]:
    """The task id and attempt (``ATTEMPT_HEADER``, default 1) of a kombu message payload; ``("", 0)``
    when it is not a Celery task message."""
    try:
        headers = payload.get("headers") or {}
        return str(headers.get("id") or ""), int(headers.get(ATTEMPT_HEADER) or 1)
    except (AttributeError, TypeError, ValueError):
        return "", 0


class KombuRedis:
    """kombu's Redis transport as recovery sees it, over one of the app's broker connections.

    :param app: the Celery app; its broker connection is opened on first use.
    """

    def __init__(self, app: Any) -> None:
        self._app = app
        self._connection = None
        self._channel = None

    @property
    def channel(self):
        if self._channel is None:
            self._connection = self._app.connection_for_write()
            channel = self._connection.default_channel
            if getattr(channel, "global_keyprefix", ""):
                raise ValueError("gpu-dispatch does not support kombu's global_keyprefix transport option "
                                 "(broker_transport_options): use a Redis database of its own instead")
            self._channel = channel
        return self._channel

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._connection = self._channel = None

    def list_keys(self, queue: str) -> list[str]:
        """The Redis lists holding ``queue``'s messages: one per priority step (kombu's ``_q_for_pri``)."""
        channel = self.channel
        return [queue if not pri else f"{queue}{channel.sep}{pri}" for pri in channel.priority_steps]

    def queued_ids(self, queue: str) -> dict[str, int]:
        """Task id → attempt of every message waiting in ``queue``'s lists."""
        found: dict[str, int] = {}
        with self.channel.conn_or_acquire() as client:
            with client.pipeline(transaction=False) as pipe:
                for key in self.list_keys(queue):
                    pipe.lrange(key, 0, -1)
                lists = pipe.execute()
        for raw in (item for items in lists for item in items):
            try:
                task_id, attempt = task_id_of(json.loads(raw))
            except ValueError:
                continue
            if task_id:
                found[task_id] = max(attempt, found.get(task_id, 0))
        return found

    def unacked(self) -> Iterator[Unacked]:
        """Every message held unacknowledged, with the queue it was taken from."""
        channel = self.channel
        with channel.conn_or_acquire() as client:
            entries = client.hgetall(channel.unacked_key)
            tags = list(entries)
            since = client.zmscore(channel.unacked_index_key, tags) if tags else []
        for (tag, raw), when in zip(entries.items(), since):
            try:
                payload, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            task_id, _ = task_id_of(payload)
            yield Unacked(tag.decode() if isinstance(tag, bytes) else tag, routing_key or exchange, task_id,
                          when, payload if isinstance(payload, dict) else {})

    def restore(self, tag: str) -> None:
        """Put an unacknowledged message back at the head of its queue, marked redelivered (kombu's own)."""
        self.channel.qos.restore_by_tag(tag, leftmost=True)

    def drop(self, tag: str) -> None:
        """Forget an unacknowledged message (it is answered, or re-dispatched under a newer attempt)."""
        channel = self.channel
        with channel.conn_or_acquire() as client:
            client.pipeline().zrem(channel.unacked_index_key, tag) \
                .hdel(channel.unacked_key, tag).execute()


def kombu_version() -> tuple[int, int]:
    major, minor = kombu.VERSION[:2]
    return int(major), int(minor)
