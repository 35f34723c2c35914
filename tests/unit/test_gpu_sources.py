"""GPU sources: the simulated GPU's feedback loop and the NVML source (real library where a GPU exists)."""

from __future__ import annotations

import pytest

from workers.gpu import InFlight, NvmlGpu, NvmlUnavailable, SimulatedGpu, open_gpu


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_simulated_gpu_adds_the_memory_and_compute_of_the_requests_really_running():
    inflight = InFlight()
    gpu = SimulatedGpu(0, 81920, "idle", 7, inflight, clock=Clock())
    before = gpu.read()

    inflight.take(4096)
    inflight.take(2048)
    during = gpu.read()
    room_during = gpu.room_mb()
    inflight.release(4096)
    inflight.release(2048)
    after = gpu.read()

    assert during.memory_used_mb == before.memory_used_mb + 6144
    assert during.gpu_util > before.gpu_util
    assert after == before
    assert during.memory_used_mb + during.memory_free_mb == during.memory_total_mb == 81920
    assert room_during == during.memory_free_mb == gpu.room_mb() - 6144


def test_simulated_tenants_are_reproducible_from_the_seed_and_differ_by_profile():
    def trace(tenants: str, seed: int) -> list[int]:
        clock = Clock()
        gpu = SimulatedGpu(0, 81920, tenants, seed, InFlight(), clock=clock)
        readings = []
        for second in range(0, 120, 5):
            clock.now = second
            readings.append(gpu.read().memory_used_mb)
        return readings

    assert trace("bursty", 3) == trace("bursty", 3)
    assert trace("bursty", 3) != trace("bursty", 4)
    assert max(trace("idle", 3)) < min(trace("nearly-full", 3))
    assert min(trace("nearly-full", 3)) > 0.8 * 81920


def test_simulated_gpu_refuses_an_unknown_tenant_profile_naming_the_choices():
    with pytest.raises(ValueError, match="idle, steady, bursty, nearly-full"):
        SimulatedGpu(0, 81920, "crowded", 0, InFlight())


def _nvml_missing_reason() -> str | None:
    try:
        NvmlGpu(0)
    except NvmlUnavailable as exc:
        return str(exc)
    return None


NVML_MISSING = _nvml_missing_reason()


@pytest.mark.skipif(NVML_MISSING is not None, reason=f"no NVIDIA GPU here: {NVML_MISSING}")
def test_nvml_source_reads_a_real_gpu():
    reading = NvmlGpu(0).read()

    assert reading.source == "nvml"
    assert reading.memory_total_mb > 0
    assert reading.memory_used_mb + reading.memory_free_mb <= reading.memory_total_mb + 1
    assert 0 <= reading.gpu_util <= 100
    assert reading.uuid.startswith("GPU-")
    assert reading.error is None


@pytest.mark.skipif(NVML_MISSING is not None, reason=f"no NVIDIA GPU here: {NVML_MISSING}")
def test_nvml_source_refuses_a_gpu_index_that_does_not_exist():
    with pytest.raises(NvmlUnavailable, match="does not exist"):
        NvmlGpu(999)


@pytest.mark.skipif(NVML_MISSING is None, reason="an NVIDIA GPU is present")
def test_nvml_source_without_a_driver_says_why_and_what_to_set():
    with pytest.raises(NvmlUnavailable, match="GPU_DISPATCH_GPU_SOURCE=nvml"):
        open_gpu(0, "nvml", total_mb=81920, tenants="idle", seed=0, inflight=InFlight())


@pytest.mark.skipif(NVML_MISSING is None, reason="an NVIDIA GPU is present")
def test_auto_source_falls_back_to_a_simulated_gpu_without_a_driver():
    gpu = open_gpu(0, "auto", total_mb=81920, tenants="idle", seed=0, inflight=InFlight())
    assert gpu.read().source == "simulated"
