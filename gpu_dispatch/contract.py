"""The external contract (``DESIGN.md``, "External contract"), written once.

Queue and task names, the instance metadata keys with their meaning, the
metadata schema and size limit, and which queue names may ever receive work.
The GPU worker writes metadata from :data:`METADATA_KEYS`, the scoring reads
it, the tests check it and ``docs/metadata.md`` is generated from it
(``gpu-dispatch config --metadata``).
"""

from __future__ import annotations

import re

#: Queue the apps' dispatch_inference requests go to (central dispatcher workers consume it).
DISPATCH_QUEUE = "dispatch"
#: Fan-out exchange that carries refresh_gpu_metadata to every GPU worker.
REFRESH_EXCHANGE = "gpu.refresh"
#: Suffixes of a GPU worker's own lanes: its fan-out refresh queue and its direct control queue.
CONTROL_SUFFIX, REFRESH_SUFFIX = ".control", ".refresh"

DISPATCH_TASK = "dispatch_inference"
INFERENCE_TASK = "run_inference"
REFRESH_TASK = "refresh_gpu_metadata"

#: Message header carrying a request's attempt number (1, then +1 per re-dispatch by the ledger).
ATTEMPT_HEADER = "gpu_dispatch_attempt"

#: Version of the metadata layout (key ``schema``); readers exclude instances of another version.
METADATA_SCHEMA = "2"
#: Schemas a reader understands.
KNOWN_SCHEMAS = frozenset({METADATA_SCHEMA})
#: Nacos (2.3+) refuses metadata over 1,024 characters (keys and values); we keep well under it.
METADATA_LIMIT = 900

#: Every metadata key a GPU worker publishes: key → (example, meaning).  The first seven are the
#: seed article's and never change meaning; all values are strings, as Nacos requires.
METADATA_KEYS: dict[str, tuple[str, str]] = {
    "gpu_index": ("0", "GPU index on its host (seed article)"),
    "memory_total_mb": ("81920", "GPU memory, MiB (seed article)"),
    "memory_used_mb": ("20480", "used by anyone, MiB (seed article)"),
    "memory_free_mb": ("61440", "free, MiB (seed article)"),
    "gpu_util": ("37", "utilisation, percent 0–100 (seed article)"),
    "concurrent_requests": ("2", "inference requests running on this worker now (seed article)"),
    "model_name": ("llama-7b-sim", "the model this worker serves (seed article)"),
    "queue": ("gpu.10.0.0.5.8000", "the Celery queue to send this GPU's work to"),
    "worker": ("gpu0@host", "Celery node name of the worker"),
    "incarnation": ("5f0c2a9e81d4", "id of this worker process; a restarted worker is a new incarnation"),
    "held_mb": ("4096", "memory this worker's running requests held at the reading, MiB (part of memory_used_mb)"),
    "updated_at": ("1795530611805", "when the reading was taken, Unix milliseconds"),
    "source": ("nvml", "where the reading came from: nvml or simulated"),
    "gpu_name": ("NVIDIA H100 80GB HBM3", "product name (NVML) or Simulated GPU"),
    "gpu_uuid": ("GPU-5c1f…", "NVML UUID, or GPU-SIM-<seed>-<index>"),
    "max_concurrency": ("4", "inference slots of the worker"),
    "schema": (METADATA_SCHEMA, "version of this layout"),
}
#: Keys a GPU worker publishes only when it has something to say: the model server's own load (vLLM's
#: /metrics; llama.cpp's server has none) and why the model server does not answer.
OPTIONAL_METADATA_KEYS: dict[str, tuple[str, str]] = {
    "model_waiting": ("3", "requests waiting inside the model server (vllm:num_requests_waiting)"),
    "model_running": ("8", "requests the model server is running (vllm:num_requests_running)"),
    "kv_cache_used_pct": ("41.5", "the model server's KV cache in use, percent (vllm:kv_cache_usage_perc)"),
    "backend_error": ("cannot reach http://10.0.0.5:8000", "the model server does not answer: no work is sent here"),
    "gpu_error": ("memory: Unknown Error", "NVML could not read the GPU: no work is sent here"),
}
#: The seed article's keys, which its clients read.
SEED_KEYS = ("gpu_index", "memory_total_mb", "memory_used_mb", "memory_free_mb", "gpu_util",
             "concurrent_requests", "model_name")

#: The other tenants' load profiles a simulated GPU can carry (GPU_DISPATCH_SIM_TENANTS; workers/gpu.py).
SIMULATED_TENANTS = ("idle", "steady", "bursty", "nearly-full")

#: A GPU queue's name: ``gpu.<ip>.<port>`` (IPv4, or IPv6 with colons), nothing else.
GPU_QUEUE_PATTERN = re.compile(r"^gpu\.(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]{2,39})\.\d{1,5}$")
#: Names that are never a target of work: our and Celery's own queues, kombu's keys.
RESERVED_NAMES = frozenset({DISPATCH_QUEUE, "celery", "celeryev", "unacked", "unacked_index", "unacked_mutex",
                            REFRESH_EXCHANGE})
#: Key prefixes that are never a target of work (kombu's bindings, our own keys).
RESERVED_PREFIXES = ("_kombu.", "gpu-dispatch:", "celery-task-meta-")


def gpu_queue(ip: str, port: int) -> str:
    """The per-GPU queue of the instance at ``ip:port`` (also published in its metadata as ``queue``)."""
    return f"gpu.{ip}.{port}"


def queue_refusal(queue: str) -> str | None:
    """Why ``queue`` may never receive work, or ``None`` when it is a well-formed GPU queue name."""
    if queue in RESERVED_NAMES or queue.startswith(RESERVED_PREFIXES):
        return f"queue {queue!r} is a reserved name"
    if not GPU_QUEUE_PATTERN.match(queue):
        return f"queue {queue[:60]!r} is not a GPU queue name (gpu.<ip>.<port>)"
    return None


def metadata_size(metadata: dict[str, str]) -> int:
    """Characters Nacos counts against its metadata limit: every key and value."""
    return sum(len(k) + len(v) for k, v in metadata.items())
