"""Prometheus metrics of the dispatcher: what an operator graphs and alerts on.

Counted in every process that dispatches (an app on the producer path, a
dispatcher worker); served over HTTP by the dispatcher worker on
``GPU_DISPATCH_METRICS_ADDRESS``:``GPU_DISPATCH_METRICS_PORT`` (``/metrics``).
Gauges per GPU are labelled with its queue (``gpu.<ip>.<port>``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

#: Requests sent to a GPU, by GPU and by path (producer, central, rescue).
DECISIONS = Counter("gpu_dispatch_decisions_total", "Requests sent to a GPU's queue", ["gpu", "path"])
#: Times a request found no eligible GPU and was retried later.
RETRIES = Counter("gpu_dispatch_no_gpu_retries_total", "Retries of requests that found no eligible GPU")
#: Requests failed with NoGpuAvailable after the bounded wait.
NO_GPU_FAILURES = Counter("gpu_dispatch_no_gpu_failures_total",
                          "Requests failed because no GPU was eligible for the whole wait")
#: Producer-path calls handed to the central dispatcher (no view yet, or no eligible GPU).
HANDED_TO_CENTRAL = Counter("gpu_dispatch_handed_to_central_total",
                            "Producer-path requests sent to the dispatch queue instead", ["reason"])
#: Requests re-dispatched by recovery, by why: the worker holding it is gone (``holder``), its
#: queue has no live owner (``ownerless``), it vanished in transit (``lost``), the worker refused it.
RECOVERED = Counter("gpu_dispatch_recovered_total", "Requests re-dispatched by the ledger's recovery", ["reason"])
#: Requests recovery ended with an error on their AsyncResult, by why (``time_limit``, ``no_gpu``).
ENDED = Counter("gpu_dispatch_recovery_failed_total", "Requests recovery answered with an error", ["reason"])
#: Messages of a dead dispatcher worker put back on (or dropped from) the dispatch queue.
RESCUED = Counter("gpu_dispatch_rescued_total", "dispatch messages of a dead dispatcher handled", ["kind"])
#: Age of each GPU's last metadata reading, seconds.
READING_AGE = Gauge("gpu_dispatch_reading_age_seconds", "Age of each GPU's last metadata reading", ["gpu"])
#: Requests waiting for each GPU (sent, not running yet), as the ledger counts them.
QUEUE_DEPTH = Gauge("gpu_dispatch_queue_depth", "Requests waiting for each GPU (ledger)", ["gpu"])
#: Requests running on each GPU, as the ledger counts them.
RUNNING = Gauge("gpu_dispatch_running", "Requests running on each GPU (ledger)", ["gpu"])
#: Seconds since the dispatcher's view last heard from Nacos (list or push).
VIEW_AGE = Gauge("gpu_dispatch_view_age_seconds", "Seconds since the registry view last heard from Nacos")
#: Seconds Nacos has been unreachable (0 while it answers).
REGISTRY_OUTAGE = Gauge("gpu_dispatch_registry_outage_seconds", "Seconds Nacos has not answered (0: it answers)")
#: What became of the registry's entries, by kind (see dispatcher.trust.Verdict.kind).
VERDICT_KINDS = ("trusted", "drained", "unhealthy", "unclaimed", "forged", "malformed", "schema", "queue")
INSTANCES = Gauge("gpu_dispatch_instances", "Registry entries by verdict (trusted, or why excluded)", ["verdict"])
#: Requests with prefix affinity: sent to the GPU of their prefix (kept), or elsewhere (moved: it was
#: overloaded, or not eligible).
AFFINITY = Counter("gpu_dispatch_affinity_total", "Requests with prefix affinity, by outcome", ["outcome"])
