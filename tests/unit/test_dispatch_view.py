"""The dispatcher's registry view, fed instance lists directly (no servers: nothing is started)."""

from __future__ import annotations

import random
import time

import pytest
import redis

from dispatcher.view import RegistryView
from gpu_dispatch.registry import Instance
from scoring import NoEligibleGpu, Request, get_profile


def metadata(port: int, *, free: int = 60000, updated_at: int | None = None, **extra: str) -> dict[str, str]:
    return {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": str(81920 - free),
            "memory_free_mb": str(free), "gpu_util": "10", "concurrent_requests": "0", "model_name": "llama",
            "queue": f"gpu.10.0.0.1.{port}", "worker": f"gpu{port}@host", "max_concurrency": "4",
            "updated_at": str(updated_at or int(time.time() * 1000)), **extra}


def gpu(port: int, **kwargs) -> Instance:
    return Instance("10.0.0.1", port, metadata(port, **kwargs))


@pytest.fixture
def view() -> RegistryView:
    # Never started: no Nacos client, no thread; the broker client connects only when used.
    return RegistryView(registry_factory=lambda: None, broker=redis.Redis(port=1), profile=get_profile("default", 15),
                        reconcile_interval=5, queue_depth_interval=1, service="gpu-inference", rng=random.Random(1))


def test_every_instance_is_parsed_and_a_malformed_one_is_kept_aside_with_its_reason(view):
    view.apply([gpu(8000), Instance("10.0.0.2", 8000, {"memory_free_mb": "-5", "queue": "q"}),
                Instance("10.0.0.3", 8000, {"weight": "1"})], "push")

    assert [c.state.key for c in view.candidates()] == ["10.0.0.1:8000"]
    malformed = view.malformed()
    assert "not a gpu-dispatch worker" in malformed["10.0.0.3:8000"]
    assert set(malformed) == {"10.0.0.2:8000", "10.0.0.3:8000"}
    assert view.present_queues() == {"gpu.10.0.0.1.8000", "q", "gpu.10.0.0.3.8000"}


def test_sends_are_counted_per_gpu_until_a_newer_reading_arrives(view):
    taken = int(time.time() * 1000) - 1000
    view.apply([gpu(8000, updated_at=taken)], "list")
    for _ in range(3):
        view.choose(Request(memory_mb=1000), path="producer")
    assert (view.candidates()[0].sent_since_reading, view.candidates()[0].sent_memory_mb) == (3, 3000.0)

    view.apply([gpu(8000, updated_at=taken)], "list")  # the same reading again: counts stay
    assert view.candidates()[0].sent_since_reading == 3
    view.apply([gpu(8000, updated_at=taken + 500)], "push")  # a newer one includes them
    assert view.candidates()[0].sent_since_reading == 0


def test_a_gpu_that_left_is_no_longer_chosen_but_its_worker_is_remembered(view):
    view.apply([gpu(8000), gpu(8001)], "list")
    view.apply([gpu(8001)], "push")

    assert {view.choose(Request(), path="producer").chosen.state.key for _ in range(20)} == {"10.0.0.1:8001"}
    assert view.last_worker("gpu.10.0.0.1.8000") == "gpu8000@host"


def test_an_empty_service_says_no_gpu_is_registered_and_names_the_service(view):
    view.apply([], "push")
    with pytest.raises(NoEligibleGpu, match="service 'gpu-inference'.*no GPU registered"):
        view.choose(Request(), path="central")


def test_a_service_of_only_malformed_instances_lists_each_reason(view):
    view.apply([Instance("10.0.0.3", 8000, {"weight": "1"})], "push")
    with pytest.raises(NoEligibleGpu, match="10.0.0.3:8000: no `queue` key"):
        view.choose(Request(), path="central")


def test_stale_readings_are_dropped_with_their_age(view):
    view.apply([gpu(8000, updated_at=int(time.time() * 1000) - 60_000)], "list")
    with pytest.raises(NoEligibleGpu, match="reading is 6.\\.. s old; the limit is 15 s"):
        view.choose(Request(), path="central")


def test_the_view_is_trusted_only_while_nacos_is_heard(view):
    assert not view.heard_within(10)
    view.apply([], "list")
    assert view.heard_within(10)
