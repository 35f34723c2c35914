"""The one place for gpu-dispatch's settings.

Celery loads this module (``app.config_from_object("celeryconfig")``); our own
settings live here too, beside Celery's.  Every setting is read from an
environment variable, and each is declared once below with its variable name,
default, unit and meaning.  ``gpu-dispatch config`` prints them all with the
values in force; ``docs/configuration.md`` is generated from the same table.

A value that cannot be parsed stops the program at start-up with a message
that names the variable, e.g.::

    GPU_DISPATCH_REFRESH_INTERVAL='soon' is not a number (seconds between
    metadata refreshes); set it to e.g. 5
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable


class SettingError(ValueError):
    """A setting's environment variable holds a value we cannot use."""


@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    unit: str
    meaning: str


#: Every setting, by environment variable, in the order they are declared.
SETTINGS: dict[str, Setting] = {}


def _declare(env: str, default: Any, unit: str, meaning: str, parse: Callable[[str], Any] = str) -> Any:
    SETTINGS[env] = Setting(env, str(default), unit, meaning)
    raw = os.environ.get(env, str(default))
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        raise SettingError(f"{env}={raw!r} is not valid ({meaning}; unit: {unit}): {exc}; "
                           f"unset it to use the default {default!r}") from None


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value
    return parse


def _flag(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


# --- Broker and result backend (Redis) --------------------------------------

broker_url = _declare(
    "GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:6379/0", "URL",
    "Celery broker. Redis; add a password as redis://:PASSWORD@host:port/db, TLS as rediss://")
result_backend = _declare(
    "GPU_DISPATCH_RESULT_BACKEND", broker_url, "URL",
    "Celery result backend; defaults to the broker URL")
result_expires = _declare(
    "GPU_DISPATCH_RESULT_EXPIRES", 3600, "seconds",
    "how long a result stays in the backend for its AsyncResult to read", _positive(int))

# JSON only: the broker is a trust boundary, pickle would let anyone who can
# write to Redis run code on every worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Task events on, so Flower sees every dispatch and inference.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

broker_connection_retry_on_startup = True

# --- Nacos (the live registry of GPUs) --------------------------------------

nacos_server_addresses = _declare(
    "GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:8848", "host:port[,host:port...]",
    "Nacos server(s); the gRPC port is the HTTP port + 1000")
nacos_namespace = _declare(
    "GPU_DISPATCH_NACOS_NAMESPACE", "", "namespace id",
    "Nacos namespace holding the service; empty means 'public'")
nacos_group = _declare(
    "GPU_DISPATCH_NACOS_GROUP", "DEFAULT_GROUP", "group name", "Nacos group of the service")
nacos_username = _declare(
    "GPU_DISPATCH_NACOS_USERNAME", "", "user name", "Nacos user, when the server has auth enabled")
nacos_password = _declare(
    "GPU_DISPATCH_NACOS_PASSWORD", "", "password", "Nacos password, when the server has auth enabled")
nacos_service = _declare(
    "GPU_DISPATCH_NACOS_SERVICE", "gpu-inference", "service name",
    "Nacos service under which every GPU registers one ephemeral instance")
nacos_timeout = _declare(
    "GPU_DISPATCH_NACOS_TIMEOUT", 5.0, "seconds",
    "longest wait for one call to the Nacos server", _positive(float))

# --- Files -------------------------------------------------------------------

home = _declare(
    "GPU_DISPATCH_HOME", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".local"), "directory",
    "where servers' data, logs, pid files and the Nacos client's logs and cache are kept")
