"""The state one GPU worker process keeps: who it is, its GPU, its requests in flight, its Nacos instance.

One :class:`GpuWorker` per worker process, built by the worker bootstep
(:mod:`workers.steps`) in the process that uses it — never at import, since
gRPC channels and NVML handles do not survive ``fork()``.  Tasks reach it
through :func:`current`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from gpu_dispatch.contract import gpu_queue
from gpu_dispatch.registry import Registry
from workers.backends import open_backend
from workers.gpu import InFlight, open_gpu

log = logging.getLogger(__name__)

#: Version of the metadata layout we publish (metadata key ``schema``).
METADATA_SCHEMA = "1"
#: Nacos (2.3+) refuses metadata over 1,024 characters; we keep well under it.
METADATA_LIMIT = 900

_current: "GpuWorker | None" = None


def current() -> "GpuWorker":
    """The GPU worker of this process; an error outside a GPU worker (started with ``--gpu``)."""
    if _current is None:
        raise RuntimeError("this process is not a GPU worker: start it with "
                           "`celery -A gpu_dispatch worker --gpu N` or `gpu-dispatch worker --gpu N`")
    return _current


def host_address() -> str:
    """This host's address as other hosts would reach it (``GPU_DISPATCH_WORKER_IP`` overrides)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class GpuWorker:
    """One GPU's worker: identity, GPU source, backend, requests in flight and the Nacos instance.

    :param conf: the app's settings (``app.conf``).
    :param gpu_index: which GPU this worker serves.
    :param hostname: the Celery worker's node name (published as ``worker``).
    :param concurrency: inference slots (the Celery pool's size), published as ``max_concurrency``.
    """

    def __init__(self, conf: Any, gpu_index: int, hostname: str, concurrency: int) -> None:
        self.conf = conf
        self.gpu_index = gpu_index
        self.hostname = hostname
        self.max_concurrency = concurrency
        self.ip = conf.worker_ip or host_address()
        self.port = conf.base_port + gpu_index
        self.queue = gpu_queue(self.ip, self.port)
        #: Direct queue of this worker's own control messages (refresh retries, first registration).
        self.control_queue = f"{self.queue}.control"
        self.inflight = InFlight()
        self.gpu = open_gpu(gpu_index, conf.gpu_source, total_mb=conf.sim_memory_mb, tenants=conf.sim_tenants,
                            seed=conf.sim_seed, inflight=self.inflight)
        self.backend = open_backend(conf, self.gpu, self.ip, self.port)
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        self._withdrawn = False
        self.check_metadata_size()

    # -- metadata ----------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """The instance metadata from a fresh reading: the seed article's keys, then ours.  All values are strings."""
        reading = self.gpu.read()
        return {
            "gpu_index": str(self.gpu_index),
            "memory_total_mb": str(reading.memory_total_mb),
            "memory_used_mb": str(reading.memory_used_mb),
            "memory_free_mb": str(reading.memory_free_mb),
            "gpu_util": str(reading.gpu_util),
            "concurrent_requests": str(self.inflight.count),
            "model_name": self.conf.model_name,
            "queue": self.queue,
            "worker": self.hostname,
            "updated_at": str(int(time.time() * 1000)),
            "source": reading.source,
            "gpu_name": reading.name,
            "gpu_uuid": reading.uuid,
            "max_concurrency": str(self.max_concurrency),
            "schema": METADATA_SCHEMA,
        }

    def check_metadata_size(self) -> None:
        size = sum(len(k) + len(v) for k, v in self.metadata().items())
        if size > METADATA_LIMIT:
            raise ValueError(f"instance metadata would be {size} characters, over our limit of {METADATA_LIMIT} "
                             "(Nacos refuses 1,024): shorten the worker name (-n), GPU_DISPATCH_MODEL_NAME or "
                             "GPU_DISPATCH_WORKER_IP")

    # -- Nacos -----------------------------------------------------------------

    def publish(self) -> dict[str, str] | None:
        """Read the GPU and register or update our instance with it; ``None`` once withdrawn.

        Raises :class:`~gpu_dispatch.registry.RegistryError` when Nacos cannot be
        reached (the refresh task retries on it).
        """
        with self._lock:
            if self._withdrawn:
                return None
            if self._registry is None:
                self._registry = Registry.from_config(self.conf)
            metadata = self.metadata()
            self._registry.update(self.ip, self.port, metadata)
            return metadata

    def withdraw(self) -> None:
        """Deregister and close the Nacos client; later :meth:`publish` calls do nothing.

        Called first on warm shutdown, so the dispatcher stops sending work here
        while the requests already running finish.
        """
        with self._lock:
            self._withdrawn = True
            registry, self._registry = self._registry, None
        if registry is None:
            return
        try:
            registry.deregister(self.ip, self.port)
            log.info("deregistered %s:%s (queue %s) from Nacos", self.ip, self.port, self.queue)
        except Exception as exc:  # closing the connection drops the ephemeral instance anyway
            log.warning("could not deregister %s:%s, closing the connection instead: %s", self.ip, self.port, exc)
        finally:
            registry.close()


def install(worker: GpuWorker | None) -> None:
    """Make ``worker`` this process's GPU worker (the bootstep calls this)."""
    global _current
    _current = worker
