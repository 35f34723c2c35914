"""Prometheus metrics of the dispatcher: what an operator graphs and alerts on.

Counted in every process that dispatches (an app on the producer path, a
dispatcher worker); served over HTTP by the dispatcher worker on
``GPU_DISPATCH_METRICS_PORT`` (``/metrics``).  Gauges per GPU are labelled
with the instance key ``ip:port``.
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
#: Messages moved out of orphaned GPU queues, by kind: queued (waiting in the list) or
#: unacked (taken by a worker that died before acknowledging).
RESCUED = Counter("gpu_dispatch_rescued_total", "Messages rescued from orphaned GPU queues", ["kind"])
#: Age of each GPU's last metadata reading, seconds.
READING_AGE = Gauge("gpu_dispatch_reading_age_seconds", "Age of each GPU's last metadata reading", ["gpu"])
#: Messages waiting in each GPU's queue at the last count.
QUEUE_DEPTH = Gauge("gpu_dispatch_queue_depth", "Messages waiting in each GPU's broker queue", ["gpu"])
#: Seconds since the dispatcher's view last heard from Nacos (list or push).
VIEW_AGE = Gauge("gpu_dispatch_view_age_seconds", "Seconds since the registry view last heard from Nacos")
#: Instances in the service whose metadata is unusable.
MALFORMED = Gauge("gpu_dispatch_malformed_instances", "Instances skipped for malformed metadata")
