"""Celery's consumer, with every message it cannot run set aside in the dead-letter list.

Celery logs a message it cannot decode, of an unknown format, for an unknown
task or with invalid fields, and then acknowledges (drops) it; ours first puts
it in :data:`~gpu_dispatch.transport.DEAD_LETTER_KEY`, with the reason, so an
operator can see what was injected (``gpu-dispatch dead-letters``).  Selected
by ``celeryconfig.worker_consumer``.
"""

from __future__ import annotations

import json
import logging

from celery.worker.consumer import Consumer as CeleryConsumer

from gpu_dispatch.transport import dead_letter

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
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
