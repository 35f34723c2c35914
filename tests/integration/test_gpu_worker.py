"""GPU workers against a real Redis and a real Nacos: registration, freshness, liveness, shutdown."""

from __future__ import annotations

import signal
import time

import redis

import celeryconfig
from gpu_dispatch.celery import app
from gpu_dispatch.registry import RegistryError
from tests.support import start_beat, start_gpu_worker, wait_until
from gpu_dispatch.contract import METADATA_KEYS, METADATA_LIMIT, SEED_KEYS

#: Refresh interval the tests run beat with, seconds.
INTERVAL = 1.0
FAST = {"GPU_DISPATCH_REFRESH_INTERVAL": str(INTERVAL)}

#: The seed article's keys, which never change (DESIGN.md): written out, so a change of the contract fails here.
ARTICLE_KEYS = {"gpu_index", "memory_total_mb", "memory_used_mb", "memory_free_mb", "gpu_util",
                "concurrent_requests", "model_name"}


def instances_by_port(registry) -> dict[int, dict[str, str]]:
    return {i.port: dict(i.metadata) for i in registry.list_instances()}


def reading_age_s(metadata: dict[str, str]) -> float:
    return time.time() - int(metadata["updated_at"]) / 1000


def send_inference(queue: str, prompt: str = "hello", **options):
    return app.send_task("run_inference", args=[prompt], kwargs=options, queue=queue)


def start_registered(make_registry, service: str, processes: list, *, concurrency: int = 2,
                     env: dict[str, str] | None = None, beat: bool = True):
    """Start one GPU worker (GPU 0), and beat; wait for its instance. Returns (worker, watcher, queue)."""
    worker = start_gpu_worker(app, 0, service, concurrency=concurrency, env={**FAST, **(env or {})})
    processes.append(worker)
    if beat:
        processes.append(start_beat(service, FAST))
    watcher = make_registry()
    queue = wait_until(lambda: instances_by_port(watcher).get(8000), 30, "the worker in Nacos")["queue"]
    return worker, watcher, queue


def test_two_workers_register_complete_metadata_under_the_size_limit_even_with_a_long_host_name(
        make_registry, service_name, celery_processes):
    long_node = "gpu0-" + "a-very-long-host-name-" * 6 + "@" + "rack-42.datacenter-west.example.internal"
    celery_processes.append(start_gpu_worker(app, 0, service_name, hostname=long_node))
    celery_processes.append(start_gpu_worker(app, 1, service_name))
    watcher = make_registry()

    found = wait_until(lambda: len(instances_by_port(watcher)) == 2 and instances_by_port(watcher), 30,
                       "both workers in Nacos")

    for port, metadata in found.items():
        assert set(metadata) == set(METADATA_KEYS) and ARTICLE_KEYS == set(SEED_KEYS) <= set(metadata)
        assert metadata["gpu_index"] == str(port - 8000)
        assert metadata["queue"] == f"gpu.127.0.0.1.{port}"
        assert metadata["source"] == "simulated"
        assert metadata["max_concurrency"] == "2"
        used, free = int(metadata["memory_used_mb"]), int(metadata["memory_free_mb"])
        assert used + free == int(metadata["memory_total_mb"])
        assert sum(len(k) + len(v) for k, v in metadata.items()) <= METADATA_LIMIT < 1024
    assert found[8000]["worker"] == long_node


def test_a_gpu_worker_pins_itself_to_its_gpu_with_cuda_visible_devices(service_name, celery_processes):
    backend = {"GPU_DISPATCH_BACKEND": "python", "CUDA_VISIBLE_DEVICES": "",
               "GPU_DISPATCH_PYTHON_CALLABLE": "tests.unit.sample_model:visible_devices"}
    celery_processes.append(start_gpu_worker(app, 3, service_name, env=backend))

    answer = send_inference("gpu.127.0.0.1.8003", "which devices?").get(timeout=30)

    assert answer["text"] == "3"


def test_a_change_of_the_simulated_tenants_load_shows_in_nacos_within_two_refresh_intervals(
        make_registry, service_name, celery_processes):
    worker = start_gpu_worker(app, 0, service_name, env={**FAST, "GPU_DISPATCH_SIM_TENANTS": "idle"})
    beat = start_beat(service_name, FAST)
    celery_processes += [worker, beat]
    watcher = make_registry()
    wait_until(lambda: instances_by_port(watcher).get(8000), 30, "the worker in Nacos")
    assert int(instances_by_port(watcher)[8000]["memory_used_mb"]) < 81920 * 0.2
    # The clock starts once beat ticks: on a busy machine its start-up alone can take longer than the window.
    wait_until(lambda: "Sending due task refresh-gpu-metadata" in beat.log(), 30, "beat's first refresh",
               interval=0.2)

    changed_ms = int(time.time() * 1000)
    reply = app.control.broadcast("gpu_set_tenants", arguments={"tenants": "nearly-full"},
                                  destination=[worker.node], reply=True, timeout=5)
    assert reply and "ok" in list(reply[0].values())[0], reply

    # Every reading taken after the change shows it (its own time, not how fast this machine runs beat
    # and Nacos's push: speed is for benchmarks).  Watched until one such reading has arrived.
    readings = {}

    def after_change() -> bool:
        try:
            metadata = instances_by_port(watcher).get(8000, {})
        except RegistryError:  # a moment when the watcher's client reconnects: look again
            return False
        if metadata:
            readings[int(metadata["updated_at"])] = int(metadata["memory_used_mb"])
        return any(taken > changed_ms + 200 for taken in readings)

    wait_until(after_change, 30, "a reading taken after the change")
    later = {taken: used for taken, used in readings.items() if taken > changed_ms + 200}
    print(f"\nreadings after the change: {sorted(later.items())}")
    assert all(used > 81920 * 0.8 for used in later.values()), later


def test_metadata_stays_fresh_while_every_inference_slot_is_busy(make_registry, service_name,
                                                                 celery_processes):
    _, watcher, queue = start_registered(make_registry, service_name, celery_processes,
                                         env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "10"})

    # 2 slots, 2 requests of at least 15 s each (1500 tokens at 10 ms, slower under load): both slots
    # stay busy for the whole check, with no hand-over between requests where a slot could read idle.
    results = [send_inference(queue, max_tokens=1500) for _ in range(2)]
    wait_until(lambda: instances_by_port(watcher).get(8000, {}).get("concurrent_requests") == "2", 10, "both slots busy")

    ages = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        metadata = instances_by_port(watcher)[8000]
        assert metadata["concurrent_requests"] == "2", "a slot fell idle during the check"
        ages.append(reading_age_s(metadata))
        time.sleep(0.2)
    print(f"\nreading age while all slots busy: max {max(ages):.2f} s over {len(ages)} looks")
    assert max(ages) <= 2 * INTERVAL
    for result in results:
        result.get(timeout=90)


def test_concurrent_requests_matches_the_requests_really_in_flight(make_registry, service_name,
                                                                   celery_processes):
    _, watcher, queue = start_registered(make_registry, service_name, celery_processes, concurrency=3,
                                         env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "10"})
    assert instances_by_port(watcher).get(8000, {}).get("concurrent_requests") == "0"

    # 10 s or more each: long enough to be seen in flight even when refreshes run late on a busy machine.
    results = [send_inference(queue, max_tokens=1000) for _ in range(2)]
    wait_until(lambda: instances_by_port(watcher).get(8000, {}).get("concurrent_requests") == "2", 10,
               "2 requests in flight")
    for result in results:
        result.get(timeout=60)
    wait_until(lambda: instances_by_port(watcher).get(8000, {}).get("concurrent_requests") == "0", 10,
               "0 requests in flight after they finished")


def test_refresh_retries_with_backoff_while_nacos_is_down_and_recovers_when_it_returns(
        servers, make_registry, service_name, celery_processes):
    _, nacos = servers
    worker, watcher, _ = start_registered(make_registry, service_name, celery_processes)
    watcher.close()

    nacos.stop()
    try:
        wait_until(lambda: "Retry in" in worker.log(200), 30, "a refresh to be retried")
    finally:
        nacos.start(timeout=120)
    watcher = make_registry()
    # The SDK re-registers the last metadata it was given as soon as it reconnects; that one may be older.
    def fresh_reading() -> dict[str, str] | None:
        metadata = instances_by_port(watcher).get(8000)
        return metadata if metadata and reading_age_s(metadata) <= 2 * INTERVAL + 1 else None

    wait_until(fresh_reading, 45, "the worker back in Nacos with a fresh reading")
    log = worker.log(400)
    retries = [line for line in log.splitlines() if "Retry in" in line]
    print(f"\n{len(retries)} retries while Nacos was down; first: {retries[0].strip()[-80:]}")
    # A retry that would run after its refresh expires is dropped, not sent to be discarded on arrival.
    assert "has an expiration date in the past" not in log


def test_sigkill_removes_the_instance_and_the_running_request_is_delivered_again_after_restart(
        make_registry, service_name, celery_processes):
    # A short visibility timeout, so the broker hands the unacknowledged request back quickly.
    worker, watcher, queue = start_registered(
        make_registry, service_name, celery_processes, concurrency=1,
        env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "10", "GPU_DISPATCH_MAX_INFERENCE_SECONDS": "3"})
    result = send_inference(queue, "survive me", max_tokens=300)  # ~4.4 s: killed while it runs
    wait_until(lambda: result.state == "STARTED", 10, "the request running")

    killed_at = time.monotonic()
    worker.stop(signal.SIGKILL)
    wait_until(lambda: 8000 not in instances_by_port(watcher), 30, "the killed worker's instance to go")
    print(f"\nSIGKILLed worker's instance gone after {time.monotonic() - killed_at:.2f} s")
    assert not result.ready()

    worker.restart()
    answer = result.get(timeout=90)
    assert answer["task_id"] == result.id
    assert answer["delivery"]["redelivered"] is True, "the answer must come from the broker's redelivery"
    print(f"request delivered again and answered {time.monotonic() - killed_at:.2f} s after the kill")


def test_warm_shutdown_deregisters_before_the_running_request_ends_and_hands_back_the_waiting_ones(
        make_registry, service_name, celery_processes):
    worker, watcher, queue = start_registered(make_registry, service_name, celery_processes, concurrency=1,
                                              env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "10"})
    running = send_inference(queue, max_tokens=1500)  # 15 s or more: it outlasts the deregistration
    waiting = [send_inference(queue, max_tokens=1) for _ in range(3)]
    wait_until(lambda: instances_by_port(watcher).get(8000, {}).get("concurrent_requests") == "1", 10, "the request running")

    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: 8000 not in instances_by_port(watcher), 10, "the instance to be deregistered")
    assert not running.ready(), "deregistration must come before the running request ends"

    assert running.get(timeout=90)["gpu"]["queue"] == queue
    assert worker.proc.wait(30) == 0
    broker = redis.Redis.from_url(celeryconfig.broker_url)
    assert broker.llen(queue) == len(waiting), "the waiting requests must be back in the GPU's queue"
    assert not any(r.ready() for r in waiting)
