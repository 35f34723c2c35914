"""Registry instance metadata → typed GPU state.

:func:`parse_instance` turns one instance's metadata (all values strings) into a
:class:`GpuState`, or raises :class:`MalformedMetadata` with a reason an operator
can act on; each instance is checked on its own, so a malformed one never
affects the others.  ``docs/scoring.md`` lists what is refused and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from gpu_dispatch.contract import METADATA_KEYS, SEED_KEYS
from scoring.errors import MalformedMetadata

#: Metadata keys gpu-dispatch workers add to :data:`SEED_KEYS`; only ``queue`` is required.
EXTRA_KEYS = tuple(k for k in METADATA_KEYS if k not in SEED_KEYS)

#: Largest memory a GPU may report, in MB (4 TiB; today's largest cards have under 300 GB).
MAX_MEMORY_MB = 4 * 1024 * 1024
#: Largest plausible request count (``concurrent_requests``, ``max_concurrency``).
MAX_COUNT = 100_000
#: Largest plausible ``gpu_index``: NVML numbers the GPUs of one host from 0.
MAX_GPU_INDEX = 1023
#: ``memory_used_mb + memory_free_mb`` may differ from ``memory_total_mb`` by this
#: fraction of the total (NVML counts driver-reserved memory in neither, on some drivers) ...
MEMORY_SUM_TOLERANCE_FRACTION = 0.05
#: ... or by this many MB, whichever is larger (small cards reserve a few hundred MB).
MEMORY_SUM_TOLERANCE_MB = 1024
#: An ``updated_at`` (Unix ms) below this (March 1973) was written in seconds, not milliseconds.
MIN_UPDATED_AT_MS = 10**11
#: How far in the future, in ms, a worker's ``updated_at`` may lie (clock skew between hosts).
MAX_CLOCK_SKEW_MS = 60_000
#: Longest queue name accepted: AMQP's limit, which Celery's brokers share.
MAX_QUEUE_NAME = 255
#: Longest text value quoted back in an error message, in characters.
_QUOTE_LIMIT = 40


@dataclass(frozen=True, slots=True)
class GpuState:
    """One GPU as its last metadata reading describes it.

    Memory is in MB, ``gpu_util`` in percent (0–100), ``updated_at_ms`` in Unix
    milliseconds of the reading (``None`` when the worker did not say), so the
    reading's age is known to whoever holds the state.  Text fields a worker may
    leave out (``worker``, ``source``, ``gpu_name``, ``gpu_uuid``, ``schema``)
    are ``""`` then; ``max_concurrency`` is ``None`` when unknown.
    """

    key: str
    ip: str
    port: int
    queue: str
    gpu_index: int
    memory_total_mb: float
    memory_used_mb: float
    memory_free_mb: float
    gpu_util: float
    concurrent_requests: int
    max_concurrency: int | None
    model_name: str
    source: str
    worker: str
    gpu_name: str
    gpu_uuid: str
    schema: str
    updated_at_ms: int | None
    healthy: bool = True
    enabled: bool = True
    #: Memory this worker's own running requests held at the reading, MB (part of ``memory_used_mb``).
    held_mb: float = 0.0
    incarnation: str = ""
    #: The model server's own load, when it publishes one (vLLM): requests waiting and running inside
    #: it, and its KV cache in use (percent); ``None`` when not published.
    model_waiting: int | None = None
    model_running: int | None = None
    kv_cache_used_pct: float | None = None
    #: Memory other tenants used at the reading, MB: what is used, less our own requests' share.
    tenant_mb: float = field(init=False, repr=False, compare=False)
    #: Memory our requests could use with none of them running: total less other tenants', MB.
    room_mb: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once per reading: the memory filter and scorers read them on every decision.
        tenant = max(0.0, self.memory_used_mb - self.held_mb)
        object.__setattr__(self, "tenant_mb", tenant)
        object.__setattr__(self, "room_mb", self.memory_total_mb - tenant)

    def age_s(self, now_ms: int) -> float | None:
        """Seconds since the reading at ``now_ms`` (Unix ms); ``None`` when unknown.

        A reading stamped slightly in the future (clock skew) is 0 s old.
        """
        if self.updated_at_ms is None:
            return None
        return max(0.0, (now_ms - self.updated_at_ms) / 1000.0)


def parse_instance(ip: str, port: int, metadata: Mapping[str, str], *, healthy: bool = True,
                   enabled: bool = True, now_ms: int, key: str | None = None) -> GpuState:
    """Read one registry instance as a :class:`GpuState`.

    :param ip: the instance's address as the registry reports it.
    :param port: the instance's port (1–65535).
    :param metadata: the instance's metadata; every value a string.
    :param healthy: the registry's health flag for the instance.
    :param enabled: the registry's enabled flag for the instance.
    :param now_ms: the reader's clock, Unix ms; bounds how far in the future
        ``updated_at`` may lie (:data:`MAX_CLOCK_SKEW_MS`).
    :param key: how the state is named; default ``"<ip>:<port>"``.
    :raises MalformedMetadata: with ``.key`` and a ``.reason`` naming the key
        and value at fault (see the module docstring for what is refused).
    """
    key = key or f"{ip}:{port}"
    if not isinstance(ip, str) or not ip.strip():
        raise MalformedMetadata(key, "the instance has no ip address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MalformedMetadata(key, f"port {port!r} is not a TCP port (1–65535)")
    if not isinstance(metadata, Mapping):
        raise MalformedMetadata(key, f"metadata is a {type(metadata).__name__}, not a mapping of strings")
    read = _Reader(key, metadata)

    queue = read.text("queue", missing="no `queue` key: not a gpu-dispatch worker")
    if len(queue) > MAX_QUEUE_NAME or any(ch.isspace() for ch in queue):
        raise MalformedMetadata(key, f"queue {_quote(queue)} is not a usable queue name "
                                     f"(no whitespace, at most {MAX_QUEUE_NAME} characters)")
    gpu_index = read.whole("gpu_index", high=MAX_GPU_INDEX)
    total = read.number("memory_total_mb", high=MAX_MEMORY_MB)
    if total == 0:
        raise MalformedMetadata(key, "memory_total_mb is 0: a GPU has memory; is NVML reading the right device?")
    used = read.number("memory_used_mb", high=MAX_MEMORY_MB)
    free = read.number("memory_free_mb", high=MAX_MEMORY_MB)
    if free > total:
        raise MalformedMetadata(key, f"memory_free_mb {free:g} exceeds memory_total_mb {total:g}")
    tolerance = max(MEMORY_SUM_TOLERANCE_FRACTION * total, MEMORY_SUM_TOLERANCE_MB)
    if abs(used + free - total) > tolerance:
        raise MalformedMetadata(key, f"memory_used_mb {used:g} + memory_free_mb {free:g} = {used + free:g}, "
                                     f"far from memory_total_mb {total:g} (tolerance {tolerance:g} MB)")
    gpu_util = read.number("gpu_util", high=100)
    concurrent = read.whole("concurrent_requests", high=MAX_COUNT)
    model_name = read.text("model_name", missing="missing `model_name` (the model this GPU serves)")
    max_concurrency = read.whole("max_concurrency", low=1, high=MAX_COUNT, required=False)
    # Declared, not measured: a request may use less than it said; never more than is used counts.
    held = read.number("held_mb", high=MAX_MEMORY_MB, required=False) or 0.0
    updated_at = read.whole("updated_at", high=now_ms + MAX_CLOCK_SKEW_MS, required=False,
                            too_high=f"lies more than {MAX_CLOCK_SKEW_MS // 1000} s in the future "
                                     f"(reader's clock {now_ms}); are the hosts' clocks in sync?")
    if updated_at is not None and updated_at < MIN_UPDATED_AT_MS:
        raise MalformedMetadata(key, f"updated_at {updated_at} reads as seconds; it must be Unix milliseconds")
    return GpuState(
        key=key, ip=ip, port=port, queue=queue, gpu_index=gpu_index, memory_total_mb=total,
        memory_used_mb=used, memory_free_mb=free, gpu_util=gpu_util, concurrent_requests=concurrent,
        max_concurrency=max_concurrency, model_name=model_name, source=read.optional_text("source"),
        worker=read.optional_text("worker"), gpu_name=read.optional_text("gpu_name"),
        gpu_uuid=read.optional_text("gpu_uuid"), schema=read.optional_text("schema"),
        updated_at_ms=updated_at, healthy=bool(healthy), enabled=bool(enabled), held_mb=min(held, used),
        incarnation=read.optional_text("incarnation"),
        model_waiting=read.whole("model_waiting", high=MAX_COUNT, required=False),
        model_running=read.whole("model_running", high=MAX_COUNT, required=False),
        kv_cache_used_pct=read.number("kv_cache_used_pct", high=100, required=False),
    )


class _Reader:
    """Reads typed values out of one instance's metadata, raising with the key and value at fault."""

    def __init__(self, key: str, metadata: Mapping[str, str]) -> None:
        self._key = key
        self._metadata = metadata

    def _raw(self, name: str) -> str | None:
        value = self._metadata.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise MalformedMetadata(self._key, f"{name} is not a string (got {type(value).__name__})")
        value = value.strip()
        return value or None

    def text(self, name: str, *, missing: str) -> str:
        value = self._raw(name)
        if value is None:
            raise MalformedMetadata(self._key, missing)
        return value

    def optional_text(self, name: str) -> str:
        return self._raw(name) or ""

    def number(self, name: str, *, high: float, required: bool = True) -> float | None:
        value = self._raw(name)
        if value is None:
            if not required:
                return None
            raise MalformedMetadata(self._key, f"missing `{name}`")
        try:
            number = float(value)
        except ValueError:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: not a number") from None
        if not math.isfinite(number):
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: not a finite number")
        if number < 0:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: negative")
        if number > high:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: absurd (above {high:g})")
        return number

    def whole(self, name: str, *, high: int, low: int = 0, required: bool = True,
              too_high: str | None = None) -> int | None:
        value = self._raw(name)
        if value is None:
            if required:
                raise MalformedMetadata(self._key, f"missing `{name}`")
            return None
        try:
            number = float(value)
        except ValueError:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: not a whole number") from None
        if not math.isfinite(number) or not number.is_integer():
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: not a whole number")
        if number < 0:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: negative")
        if number < low:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: must be at least {low}")
        if number > high:
            raise MalformedMetadata(self._key, f"{name} is {_quote(value)}: "
                                               f"{too_high or f'absurd (above {high})'}")
        return int(number)


def _quote(value: str) -> str:
    if len(value) > _QUOTE_LIMIT:
        value = value[:_QUOTE_LIMIT] + "…"
    return repr(value)
