"""What a GPU worker knows about its GPU: one interface, two sources.

- :class:`NvmlGpu` reads a real NVIDIA GPU through ``pynvml``.  NVML errors
  are reported in the reading (``error``), never raised into the worker.
- :class:`SimulatedGpu` stands in where no NVML driver answers.  Its memory
  and utilisation are the sum of an "other tenants" profile (seeded, so runs
  reproduce) and the requests this worker is really running, so the dispatch
  feedback loop is the one a real cluster has.

Both return a :class:`GpuReading`; ``source`` says which produced it.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Protocol

from gpu_dispatch.contract import SIMULATED_TENANTS

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    """One reading of one GPU.  Memory in MiB, utilisation in percent (0–100)."""

    index: int
    name: str
    uuid: str
    memory_total_mb: int
    memory_used_mb: int
    memory_free_mb: int
    gpu_util: int
    source: str  # "nvml" or "simulated"
    error: str | None = None  # set when the source could not read something


class Gpu(Protocol):
    index: int
    source: str

    def read(self) -> GpuReading: ...

    def room_mb(self) -> float:
        """Memory our next request could take on the card now, MiB."""


class InFlight:
    """The inference requests this worker is running right now, and the memory they hold (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._memory_mb = 0

    def take(self, memory_mb: int) -> None:
        """One more request runs, holding ``memory_mb`` MiB."""
        self._add(1, memory_mb)

    def release(self, memory_mb: int) -> None:
        """A request that held ``memory_mb`` MiB has finished."""
        self._add(-1, -memory_mb)

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    @property
    def memory_mb(self) -> int:
        with self._lock:
            return self._memory_mb

    def _add(self, count: int, memory_mb: int) -> None:
        with self._lock:
            self._count += count
            self._memory_mb += memory_mb


# --- NVML ----------------------------------------------------------------------

class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this machine (no driver, no such GPU); the message says why."""


class NvmlGpu:
    """A real NVIDIA GPU read through NVML (``pynvml``)."""

    source = "nvml"

    def __init__(self, index: int) -> None:
        with warnings.catch_warnings():  # pynvml 12+ warns that it wraps nvidia-ml-py; it does, on purpose
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml

        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if index >= count:
                raise NvmlUnavailable(f"GPU index {index} does not exist: NVML sees {count} GPU(s) "
                                      f"(indices 0..{count - 1}); pass another --gpu")
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._name = _text(pynvml.nvmlDeviceGetName(self._handle))
            self._uuid = _text(pynvml.nvmlDeviceGetUUID(self._handle))
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML: {exc}") from exc
        self.index = index

    def read(self) -> GpuReading:
        nvml, handle, errors = self._nvml, self._handle, []

        def get(what: str, call, default=None):
            try:
                return call()
            except nvml.NVMLError as exc:
                errors.append(f"{what}: {exc}")
                return default

        memory = get("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        util = get("utilisation", lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu, 0)
        total, used, free = ((memory.total // MIB, memory.used // MIB, memory.free // MIB) if memory else (0, 0, 0))
        if errors:
            log.warning("NVML could not read GPU %s: %s", self.index, "; ".join(errors))
        return GpuReading(index=self.index, name=self._name, uuid=self._uuid, memory_total_mb=int(total),
                          memory_used_mb=int(used), memory_free_mb=int(free), gpu_util=int(util),
                          source=self.source, error="; ".join(errors) or None)

    def room_mb(self) -> float:
        """What NVML reports free now (memory our admitted requests take shows as soon as they allocate)."""
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).free / MIB
        except self._nvml.NVMLError:
            return 0.0


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


# --- Simulated GPU ----------------------------------------------------------------

#: Other tenants' load profiles: (memory share of the card, utilisation %) around which they move.
TENANT_PROFILES = {
    "idle": (0.05, 3.0),
    "steady": (0.40, 45.0),
    "bursty": (0.30, 35.0),
    "nearly-full": (0.90, 85.0),
}
assert tuple(TENANT_PROFILES) == SIMULATED_TENANTS, "gpu_dispatch.contract names the profiles a setting may choose"

#: Utilisation (percentage points) one running simulated request adds.
UTIL_PER_REQUEST = 20.0


class SimulatedGpu:
    """A GPU whose load is other tenants' (seeded profile) plus this worker's own requests.

    :param index: GPU index.
    :param total_mb: MiB of memory on the card.
    :param tenants: one of :data:`TENANT_PROFILES`.
    :param seed: seed of the tenants' fluctuations.
    :param inflight: the worker's running requests; their memory and compute are added.
    :param clock: seconds, ``time.monotonic`` unless a test steers time.
    """

    source = "simulated"

    def __init__(self, index: int, total_mb: int, tenants: str, seed: int, inflight: InFlight,
                 clock=time.monotonic) -> None:
        self.set_tenants(tenants)
        self.index = index
        self.total_mb = total_mb
        self.inflight = inflight
        self._clock = clock
        self._start = clock()
        rng = random.Random(f"{seed}:{index}:{tenants}")
        # Three slow sine waves with seeded phases: reproducible, smooth, never periodic in a short run.
        self._waves = [(rng.uniform(20, 90), rng.uniform(0, 2 * math.pi)) for _ in range(3)]
        self._burst_phase = rng.uniform(0, 30)
        self.uuid = f"GPU-SIM-{seed:04d}-{index:04d}"

    def set_tenants(self, tenants: str) -> None:
        """Change the other tenants' profile (the next reading shows it)."""
        if tenants not in TENANT_PROFILES:
            raise ValueError(f"unknown tenant profile {tenants!r}; choose one of {', '.join(TENANT_PROFILES)} "
                             "(GPU_DISPATCH_SIM_TENANTS)")
        self.tenants = tenants

    def _tenant_load(self) -> tuple[float, float]:
        share, util = TENANT_PROFILES[self.tenants]
        t = self._clock() - self._start
        wobble = sum(math.sin(2 * math.pi * t / period + phase) for period, phase in self._waves) / 3
        if self.tenants == "bursty":
            bursting = ((t + self._burst_phase) % 30.0) < 10.0  # 10 s of every 30 s
            share, util = (share + 0.35, util + 45.0) if bursting else (share, util)
        return (min(max(share + 0.05 * wobble, 0.0), 0.97), min(max(util + 8.0 * wobble, 0.0), 100.0))

    def room_mb(self) -> float:
        """Total less other tenants' memory now, less what our running requests hold."""
        share, _ = self._tenant_load()
        return self.total_mb - int(self.total_mb * share) - self.inflight.memory_mb

    def read(self) -> GpuReading:
        share, tenant_util = self._tenant_load()
        own_memory = self.inflight.memory_mb
        used = min(int(self.total_mb * share) + own_memory, self.total_mb)
        util = min(tenant_util + UTIL_PER_REQUEST * self.inflight.count, 100.0)
        return GpuReading(index=self.index, name="Simulated GPU", uuid=self.uuid, memory_total_mb=self.total_mb,
                          memory_used_mb=used, memory_free_mb=self.total_mb - used, gpu_util=int(round(util)),
                          source=self.source)


def open_gpu(index: int, source: str, *, total_mb: int, tenants: str, seed: int, inflight: InFlight,
             simulated_count: int = 8) -> Gpu:
    """The GPU a worker reads: NVML, simulated, or (``auto``) NVML when a driver answers."""
    if index < 0:
        raise ValueError(f"--gpu {index}: a GPU index is 0 or more")
    if source in {"nvml", "auto"}:
        try:
            return NvmlGpu(index)
        except NvmlUnavailable as exc:
            if source == "nvml":
                raise NvmlUnavailable(f"{exc} (GPU_DISPATCH_GPU_SOURCE=nvml; use 'simulated' or 'auto' on a "
                                      "machine without NVIDIA GPUs)") from exc
            log.info("no NVML GPU %s (%s): using a simulated GPU", index, exc)
    if index >= simulated_count:
        raise ValueError(f"--gpu {index}: this host has {simulated_count} simulated GPUs (indices 0.."
                         f"{simulated_count - 1}); pass another --gpu or raise GPU_DISPATCH_SIM_GPUS")
    return SimulatedGpu(index, total_mb, tenants, seed, inflight)
