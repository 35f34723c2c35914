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

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from kombu import Exchange

from gpu_dispatch import contract


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
    SETTINGS[env] = Setting(env, sanitize(str(default)), unit, meaning)
    raw = os.environ.get(env, str(default))
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        shown = "***" if "PASSWORD" in env else sanitize(raw)
        raise SettingError(f"{env}={shown!r} is not valid ({meaning}; unit: {unit}): {exc}; "
                           f"unset it to use the default {sanitize(str(default))!r}") from None


def sanitize(value: str) -> str:
    """``value`` with the password of any URL in it replaced by ``**`` (for messages and listings)."""
    return re.sub(r"(://[^:/@;]*:)[^@;]*@", r"\1**@", value)


def _redis_url(raw: str) -> str:
    for part in raw.split(";"):
        url = urlparse(part.strip())
        if url.scheme not in {"redis", "rediss", "sentinel"}:
            raise ValueError(f"scheme {url.scheme or '(none)'!r} is not redis://, rediss:// or sentinel://")
        if not url.hostname:
            raise ValueError("no host")
        url.port  # raises ValueError for a port that is not a number in 0..65535
        if url.path.strip("/") and not url.path.strip("/").isdigit():
            raise ValueError(f"the database {url.path.strip('/')!r} is not a number")
    return raw


def _addresses(raw: str) -> str:
    for part in raw.split(","):
        host, _, port = part.strip().removeprefix("http://").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part.strip()!r} is not host:port")
    return raw


def _ip_or_empty(raw: str) -> str:
    if raw:
        ipaddress.ip_address(raw)  # a ValueError names what is wrong
    return raw


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value <= 0:
            raise ValueError("must be greater than 0")
        return value
    return parse


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _choice(raw: str, allowed: set[str]) -> str:
    if raw not in allowed:
        raise ValueError(f"expected one of {', '.join(sorted(allowed))}")
    return raw


# --- Broker and result backend (Redis) --------------------------------------

broker_url = _declare(
    "GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:6379/0", "URL",
    "Celery broker. Redis; add a password as redis://:PASSWORD@host:port/db, TLS as rediss://, Sentinel as "
    "sentinel://host:port;sentinel://host:port/db (with GPU_DISPATCH_SENTINEL_MASTER)", _redis_url)
result_backend = _declare(
    "GPU_DISPATCH_RESULT_BACKEND", broker_url, "URL",
    "Celery result backend; defaults to the broker URL", _redis_url)
sentinel_master = _declare(
    "GPU_DISPATCH_SENTINEL_MASTER", "", "name",
    "name of the Redis primary that Sentinel watches, for sentinel:// broker and backend URLs")
if (broker_url.startswith("sentinel://") or result_backend.startswith("sentinel://")) and not sentinel_master:
    raise SettingError("a sentinel:// URL (GPU_DISPATCH_BROKER_URL / GPU_DISPATCH_RESULT_BACKEND) needs the name of "
                       "the primary Sentinel watches: set GPU_DISPATCH_SENTINEL_MASTER, e.g. mymaster")
replica_wait = _declare(
    "GPU_DISPATCH_REPLICA_WAIT", 0, "replicas",
    "with Redis replication (Sentinel): a request is accepted only once its ledger record has reached this "
    "many replicas (WAIT), so a failover cannot lose it; 0 turns it off (docs/reliability.md)", _non_negative_int)
replica_wait_ms = _declare(
    "GPU_DISPATCH_REPLICA_WAIT_MS", 200, "milliseconds",
    "longest wait for GPU_DISPATCH_REPLICA_WAIT replicas; a request is then accepted anyway, with a warning "
    "(a replica that is down costs every request this long)", _positive(int))
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
task_events = _declare(
    "GPU_DISPATCH_TASK_EVENTS", "on", "on|off",
    "task events for Flower from this process; `gpu-dispatch dispatcher` turns them off for the dispatcher "
    "worker (Flower still sees each request from the app's task-sent and the GPU worker's events), which "
    "saves it three of its eight Redis round trips a request", lambda raw: _choice(raw, {"on", "off"}) == "on")
worker_send_task_events = task_events
task_send_sent_event = task_events
task_track_started = True

# Outlive a Redis restart (docs/reliability.md): never give up reconnecting; retry storing a result
# while Redis is away (a threads-pool worker that cannot store one would otherwise hold the request
# unacknowledged for ever); and let a publish wait out a short outage before delay() fails.
broker_connection_retry_on_startup = True
broker_connection_retry = True
broker_connection_max_retries = None
result_backend_always_retry = True
result_backend_max_retries = 30
result_backend_max_sleep_between_retries_ms = 2000
redis_backend_health_check_interval = 10
redis_socket_connect_timeout = 5
task_publish_retry_policy = {"max_retries": 20, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
#: Celery's consumer, setting aside in the dead-letter list what it cannot run (gpu_dispatch/consumer.py).
worker_consumer = "gpu_dispatch.consumer:Consumer"

# --- Nacos (the live registry of GPUs) --------------------------------------

nacos_server_addresses = _declare(
    "GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:8848", "host:port[,host:port...]",
    "Nacos server(s); the gRPC port is the HTTP port + 1000", _addresses)
nacos_namespace = _declare(
    "GPU_DISPATCH_NACOS_NAMESPACE", "", "namespace id",
    "Nacos namespace holding the service; empty means 'public'")
nacos_group = _declare(
    "GPU_DISPATCH_NACOS_GROUP", "DEFAULT_GROUP", "group name", "Nacos group of the service")
nacos_username = _declare(
    "GPU_DISPATCH_NACOS_USERNAME", "", "user name",
    "Nacos user, when the server has auth enabled; set, it also turns auth on for the local Nacos "
    "(`gpu-dispatch servers up`), with this user as its admin")
nacos_password = _declare(
    "GPU_DISPATCH_NACOS_PASSWORD", "", "password",
    "Nacos password, when the server has auth enabled (the local Nacos's admin password with the user above)")
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

# --- GPU workers ---------------------------------------------------------------

gpu_source = _declare(
    "GPU_DISPATCH_GPU_SOURCE", "auto", "auto|nvml|simulated",
    "where a GPU worker reads its GPU: NVML, a simulated GPU, or NVML when a driver answers else simulated",
    lambda raw: _choice(raw, {"auto", "nvml", "simulated"}))
worker_ip = _declare(
    "GPU_DISPATCH_WORKER_IP", "", "IP address",
    "address a GPU worker registers in Nacos; empty means this host's address", _ip_or_empty)
base_port = _declare(
    "GPU_DISPATCH_BASE_PORT", 8000, "TCP port",
    "a GPU's instance port is this + its GPU index (its model server's port, as in the seed article)",
    _positive(int))
max_concurrency = _declare(
    "GPU_DISPATCH_MAX_CONCURRENCY", 4, "requests",
    "inference requests one GPU worker runs at once (its Celery concurrency)", _positive(int))
model_name = _declare(
    "GPU_DISPATCH_MODEL_NAME", "llama-7b-sim", "name", "model a GPU worker serves, published as model_name")
refresh_interval = _declare(
    "GPU_DISPATCH_REFRESH_INTERVAL", 5.0, "seconds",
    "period of refresh_gpu_metadata (celery beat); metadata is never older than twice this", _positive(float))
max_inference_seconds = _declare(
    "GPU_DISPATCH_MAX_INFERENCE_SECONDS", 600, "seconds",
    "hard time limit of one inference; the broker's visibility timeout is set above it", _positive(int))
backend = _declare(
    "GPU_DISPATCH_BACKEND", "simulated", "simulated|openai|python",
    "what run_inference calls: a simulated model, an OpenAI-compatible server, or a Python callable",
    lambda raw: _choice(raw, {"simulated", "openai", "python"}))
openai_url = _declare(
    "GPU_DISPATCH_OPENAI_URL", "", "URL",
    "completions endpoint of the openai backend; empty means http://<instance ip>:<instance port>/v1/completions")
openai_model = _declare(
    "GPU_DISPATCH_OPENAI_MODEL", "", "name", "model field sent to the openai backend; empty means model_name")
openai_connect_timeout = _declare(
    "GPU_DISPATCH_OPENAI_CONNECT_TIMEOUT", 3.0, "seconds", "connect timeout of the openai backend", _positive(float))
openai_read_timeout = _declare(
    "GPU_DISPATCH_OPENAI_READ_TIMEOUT", 120.0, "seconds", "read timeout of the openai backend", _positive(float))
python_callable = _declare(
    "GPU_DISPATCH_PYTHON_CALLABLE", "", "module:function",
    "callable of the python backend, called as f(prompt, **options) -> str | dict; loaded once per worker")

# Simulated GPUs (where no NVML driver answers, or GPU_DISPATCH_GPU_SOURCE=simulated).
sim_memory_mb = _declare(
    "GPU_DISPATCH_SIM_MEMORY_MB", 81920, "MiB", "total memory of a simulated GPU", _positive(int))
sim_gpus = _declare(
    "GPU_DISPATCH_SIM_GPUS", 8, "GPUs", "GPUs a host of simulated GPUs has: --gpu must be below it", _positive(int))
sim_tenants = _declare(
    "GPU_DISPATCH_SIM_TENANTS", "idle", "|".join(contract.SIMULATED_TENANTS),
    "load other tenants put on a simulated GPU",
    lambda raw: _choice(raw, set(contract.SIMULATED_TENANTS)))
sim_seed = _declare(
    "GPU_DISPATCH_SIM_SEED", 0, "integer", "seed of the simulated tenants' load (reproducible runs)", int)
sim_ms_per_token = _declare(
    "GPU_DISPATCH_SIM_MS_PER_TOKEN", 2.0, "milliseconds",
    "simulated decode time per token on an idle GPU (slower as the GPU fills)", _positive(float))
lease_seconds = _declare(
    "GPU_DISPATCH_LEASE_SECONDS", 3.0, "seconds",
    "a GPU worker's lease in the broker, renewed every third of it; a worker silent this long (killed, hung, "
    "cut off) is treated as gone and the requests it held are re-dispatched", _positive(float))
broker_outage_seconds = _declare(
    "GPU_DISPATCH_BROKER_OUTAGE_SECONDS", 120.0, "seconds",
    "how long a GPU worker keeps retrying a ledger write while the broker's Redis does not answer",
    _positive(float))
request_memory_mb = _declare(
    "GPU_DISPATCH_REQUEST_MEMORY_MB", 2048, "MiB",
    "GPU memory a request is taken to need when it does not say memory_mb: dispatchers skip GPUs it would "
    "not fit on, and a simulated GPU holds it while the request runs", _positive(int))

# Celery settings that follow from the ones above.  acks_late + reject_on_worker_lost:
# a request whose worker dies mid-task goes back to the broker instead of vanishing.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
# Redis redelivers an unacknowledged message after the visibility timeout: keep it above
# the longest allowed inference, or a slow request would run twice.  Workers look for
# such messages every 5 s (kombu's default is every 100 s).
broker_transport_options = {
    "visibility_timeout": int(max_inference_seconds * 1.25) + 5,
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    **({"master_name": sentinel_master} if sentinel_master else {}),
}
result_backend_transport_options = {"master_name": sentinel_master} if sentinel_master else {}
#: Celery's Redis result backends with a fence: a GPU worker that lost its claim on an outcome while
#: cut off does not store it over the re-dispatched answer (gpu_dispatch/results.py).
override_backends = {"redis": "gpu_dispatch.results:RedisBackend", "rediss": "gpu_dispatch.results:RedisBackend",
                     "sentinel": "gpu_dispatch.results:SentinelBackend"}

# refresh_gpu_metadata to every GPU worker, through a fan-out exchange.  The producer
# (beat) must declare the exchange itself: on Redis, a message published to a fan-out
# exchange this process has not declared is routed as direct and silently lost, and
# Celery never declares Broadcast queues when publishing.  `expires`: a refresh that
# would run later than its interval is dropped; the next one is already due.
_refresh_exchange = Exchange(contract.REFRESH_EXCHANGE, type="fanout", durable=False)
beat_schedule = {
    "refresh-gpu-metadata": {
        "task": contract.REFRESH_TASK,
        "schedule": refresh_interval,
        "options": {"exchange": _refresh_exchange, "routing_key": contract.REFRESH_EXCHANGE,
                    "declare": [_refresh_exchange], "expires": refresh_interval},
    },
}
beat_schedule_filename = os.path.join(home, "celerybeat-schedule")

# --- Dispatcher ----------------------------------------------------------------

from scoring import PROFILES as _PROFILES  # noqa: E402  (pure, standard library only)


def _port_or_zero(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (1-65535) or 0")
    return value


dispatch_mode = _declare(
    "GPU_DISPATCH_DISPATCH_MODE", "producer", "producer|central",
    "producer: dispatch_inference.delay() picks the GPU in the calling process and publishes run_inference "
    "straight to its queue (one hop); central: it queues dispatch_inference on 'dispatch' for a dispatcher "
    "worker to pick (two hops)",
    lambda raw: _choice(raw, {"producer", "central"}))
dispatch_profile = _declare(
    "GPU_DISPATCH_PROFILE", "default", "profile name",
    "scoring profile that picks the GPU: default, seed (the seed article's formula) or p2c",
    lambda raw: _choice(raw, set(_PROFILES)))
max_prompt_bytes = _declare(
    "GPU_DISPATCH_MAX_PROMPT_BYTES", 1048576, "bytes",
    "largest prompt dispatch_inference accepts, UTF-8 encoded; a larger one is refused at delay()", _positive(int))
max_tokens = _declare(
    "GPU_DISPATCH_MAX_TOKENS", 8192, "tokens",
    "largest max_tokens dispatch_inference accepts; a larger one is refused at delay()", _positive(int))
affinity_prefix_chars = _declare(
    "GPU_DISPATCH_AFFINITY_PREFIX_CHARS", 0, "characters",
    "prefix affinity for every request: requests whose first this-many characters (of the prompt, or of the "
    "system message) are the same go to the GPU that served that prefix last, if it is not overloaded; 0 "
    "turns it off (a request can still ask with affinity_key=)", lambda raw: _non_negative_int(raw))
affinity_slack = _declare(
    "GPU_DISPATCH_AFFINITY_SLACK", 0.25, "fraction",
    "how far above the average load (requests running and waiting) a GPU may be and still take a request "
    "for affinity (bounded-load rule)", _positive(float))
affinity_ttl = _declare(
    "GPU_DISPATCH_AFFINITY_TTL", 600, "seconds",
    "how long a prefix is remembered for the GPU that served it (about as long as its model server keeps it "
    "cached)", _positive(int))
max_reading_age = _declare(
    "GPU_DISPATCH_MAX_READING_AGE", 15.0, "seconds",
    "a GPU whose metadata reading is older than this gets no work (keep it above twice "
    "GPU_DISPATCH_REFRESH_INTERVAL)", _positive(float))
no_gpu_wait = _declare(
    "GPU_DISPATCH_NO_GPU_WAIT", 30.0, "seconds",
    "how long a request waits (retrying) for an eligible GPU before it fails with NoGpuAvailable", _positive(float))
no_gpu_backoff = _declare(
    "GPU_DISPATCH_NO_GPU_BACKOFF", 0.5, "seconds",
    "first wait before retrying a request no GPU could take; doubles on each retry", _positive(float))
no_gpu_backoff_max = _declare(
    "GPU_DISPATCH_NO_GPU_BACKOFF_MAX", 5.0, "seconds",
    "longest single wait between retries of a request no GPU could take", _positive(float))
reconcile_interval = _declare(
    "GPU_DISPATCH_RECONCILE_INTERVAL", 5.0, "seconds",
    "period of the dispatcher's full instance list from Nacos (besides its push subscription)", _positive(float))
queue_depth_interval = _declare(
    "GPU_DISPATCH_QUEUE_DEPTH_INTERVAL", 0.25, "seconds",
    "period at which the dispatcher counts each GPU queue's waiting messages (one pipelined LLEN)",
    _positive(float))
rescue_interval = _declare(
    "GPU_DISPATCH_RESCUE_INTERVAL", 1.0, "seconds",
    "period of the dispatcher worker's recovery sweep over the request ledger (re-dispatch of what dead, "
    "hung or departed GPU workers held)", _positive(float))
dispatch_stall_seconds = _declare(
    "GPU_DISPATCH_DISPATCH_STALL_SECONDS", 10.0, "seconds",
    "a dispatch message held unacknowledged this long past its ETA, by no node that answers, is put back "
    "(its dispatcher worker died mid-dispatch); dispatching one takes milliseconds", _positive(float))
metrics_port = _declare(
    "GPU_DISPATCH_METRICS_PORT", 9808, "TCP port",
    "where a dispatcher worker serves Prometheus metrics (/metrics); 0 turns it off", _port_or_zero)
metrics_address = _declare(
    "GPU_DISPATCH_METRICS_ADDRESS", "127.0.0.1", "IP address",
    "address the dispatcher worker's metrics listen on; loopback unless you open it (e.g. 0.0.0.0)")

# dispatch_inference goes to the dispatch queue unless the producer path sends run_inference
# straight to a GPU queue; run_inference is always sent with the chosen GPU's queue.
task_routes = {contract.DISPATCH_TASK: {"queue": contract.DISPATCH_QUEUE}}
