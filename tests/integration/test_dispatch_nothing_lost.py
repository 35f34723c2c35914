"""Nothing lost: a GPU worker killed under load, a worker shut down with work queued, Nacos restarted."""

from __future__ import annotations

import signal
import threading
import time

import redis

from dispatcher import dispatch_inference
from gpu_dispatch.celery import app
from tests.integration.dispatch_support import (producer_view, served_by, start_dispatcher,  # noqa: F401
                                                start_gpus, wait_for_gpus)
from tests.support import wait_until

#: Slow enough simulated inference that queues build up behind each GPU (ms per token).
SLOW_GPU = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "2"}


def test_sigkill_of_a_gpu_worker_under_load_loses_nothing_and_its_orphans_are_re_dispatched(
        service_name, celery_processes, producer_view, monkeypatch):
    workers = start_gpus(service_name, celery_processes, ["idle", "idle", "idle"], env=SLOW_GPU)
    start_dispatcher(service_name, celery_processes)
    wait_for_gpus(producer_view, 3)
    broker = redis.Redis.from_url(app.conf.broker_url)
    victim = "gpu.127.0.0.1.8000"
    sent_to: dict[str, str] = {}
    choose = producer_view.choose

    def choose_and_note(request, task_id="", **kwargs):
        decision = choose(request, task_id, **kwargs)
        sent_to[task_id] = decision.chosen.state.queue
        return decision

    monkeypatch.setattr(producer_view, "choose", choose_and_note)

    pending = [dispatch_inference.delay(f"load {n}", max_tokens=20) for n in range(150)]
    wait_until(lambda: broker.llen(victim) > 5, 10, "a backlog in the victim's queue")
    killed_at = time.monotonic()
    workers[0].stop(signal.SIGKILL)
    stranded = broker.llen(victim) + _unacked_of(broker, victim)
    wait_until(lambda: broker.llen(victim) == 0 and not _unacked_of(broker, victim), 30,
               "the victim's queued and unacknowledged messages to be re-dispatched")
    redispatched_after = time.monotonic() - killed_at
    results = [r.get(timeout=60) for r in pending]
    all_done_after = time.monotonic() - killed_at

    rescued = [r for r in results if sent_to[r["task_id"]] == victim and r["gpu"]["queue"] != victim]
    print(f"\n{stranded} messages stranded by the SIGKILL (queued + running); re-dispatched "
          f"{redispatched_after:.2f} s after it; all 150 results {all_done_after:.2f} s after it; "
          f"{len(rescued)} served elsewhere")
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert len(rescued) >= stranded
    assert redispatched_after < 15


def test_a_gpu_worker_shut_down_with_work_queued_loses_none_of_it(service_name, celery_processes, producer_view):
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], env=SLOW_GPU, concurrency=1)
    start_dispatcher(service_name, celery_processes)
    wait_for_gpus(producer_view, 2)
    broker = redis.Redis.from_url(app.conf.broker_url)

    pending = [dispatch_inference.delay(f"queued {n}", max_tokens=40) for n in range(60)]
    wait_until(lambda: broker.llen("gpu.127.0.0.1.8000") > 5, 10, "a backlog behind GPU 0")
    workers[0].stop(signal.SIGTERM)  # warm shutdown: deregisters, finishes its running request

    results = [r.get(timeout=60) for r in pending]
    assert [r["task_id"] for r in results] == [p.id for p in pending]


def test_nacos_stopped_and_restarted_under_load_loses_nothing(
        service_name, celery_processes, producer_view, servers):
    _redis_server, nacos_server = servers
    start_gpus(service_name, celery_processes, ["idle", "steady"])
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_NO_GPU_WAIT": "90"})
    wait_for_gpus(producer_view, 2)
    pending, stop = [], threading.Event()

    def send() -> None:
        n = 0
        while not stop.is_set():
            pending.append(dispatch_inference.delay(f"through the outage {n}", max_tokens=4))
            n += 1
            time.sleep(0.02)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        time.sleep(1)
        print(f"\n{nacos_server.stop()}")
        time.sleep(4)  # dispatch goes on from the last view meanwhile
        sent_during_outage = len(pending)
    finally:
        print(nacos_server.start(timeout=120))
    try:
        wait_until(lambda: producer_view.heard_within(1.0) and len(producer_view.candidates()) == 2, 60,
                   "both GPUs back in the dispatcher's view")
        time.sleep(1)
    finally:
        stop.set()
        sender.join()

    results = [r.get(timeout=120) for r in pending]
    print(f"{len(results)} requests across the outage ({sent_during_outage} sent before Nacos returned): "
          f"served by {dict(served_by(results))}")
    assert [r["task_id"] for r in results] == [p.id for p in pending]


def _unacked_of(broker: redis.Redis, queue: str) -> int:
    import json

    return sum(1 for raw in broker.hvals("unacked") if json.loads(raw)[2] == queue)
