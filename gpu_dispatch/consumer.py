"""Celery's consumer, with every message it cannot run set aside in the dead-letter list.

Celery logs a message it cannot decode, of an unknown format, for an unknown
task or with invalid fields, and then acknowledges (drops) it; ours first puts
it in :data:`~gpu_dispatch.transport.DEAD_LETTER_KEY`, with the reason, so an
operator can see what was injected (``gpu-dispatch dead-letters``).

It also reconnects to a broker it lost sooner than Celery's own (kombu's
default waits 2 s, then 4, 6 ... up to 30): every :data:`RECONNECT_STEP_S`
more, at most :data:`RECONNECT_MAX_S` — after a Sentinel failover (about 3 s)
a worker consumes again within half a second of the new primary, not at the
next of 2, 6, 12 s (``docs/reliability.md``).  Selected by
``celeryconfig.worker_consumer``.

And it has no Gossip step (as ``--without-gossip``): gossip is workers watching
each other (worker-online events, elections) and nothing here uses it — liveness is
the broker leases', Flower and ``celery inspect`` use events and remote control —
while on every broker reconnect its restart failed on the closed connection and
logged a traceback at ERROR (``Error on restarting Gossip: AttributeError``, kin of
kombu #582).
"""

from __future__ import annotations

import functools
import json
import logging

from celery.worker.consumer import Consumer as CeleryConsumer

from gpu_dispatch.transport import dead_letter

log = logging.getLogger(__name__)

#: Seconds before the first reconnection attempt, added per attempt, and the longest wait between two.
RECONNECT_STEP_S = 0.5
RECONNECT_MAX_S = 2.0


#: Celery's consumer steps we leave out (see the module docstring).
LEFT_OUT_STEPS = ("celery.worker.consumer.gossip:Gossip",)


class Consumer(CeleryConsumer):
    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [step for step in CeleryConsumer.Blueprint.default_steps if step not in LEFT_OUT_STEPS]

    def ensure_connected(self, conn):
        # Celery calls conn.ensure_connection(errback, max_retries, callback=...) with kombu's intervals.
        conn.ensure_connection = functools.partial(conn.ensure_connection, interval_start=RECONNECT_STEP_S,
                                                   interval_step=RECONNECT_STEP_S, interval_max=RECONNECT_MAX_S)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the instance attribute: the method is the class's again

    def on_decode_error(self, message, exc):
        self._set_aside(message, f"cannot be decoded: {type(exc).__name__}: {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body, message):
        self._set_aside(message, "not a Celery task message")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        self._set_aside(message, f"unknown task {message.headers.get('task')!r}")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        self._set_aside(message, f"invalid task message: {exc}")
        super().on_invalid_task(body, message, exc)

    def _set_aside(self, message, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key") or "?"
        try:
            raw = json.dumps({"headers": message.headers, "properties": message.properties,
                              "content-type": message.content_type, "body": _text(message.body)}, default=str)
            with self.app.connection_for_write() as connection:
                dead_letter(connection.default_channel.client, queue, raw, reason)
        except Exception as exc:  # the broker is away: Celery's own log line still says what was dropped
            log.error("could not set a message of %s aside (%s): %s", queue, reason, exc)


def _text(body) -> str:
    return body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
