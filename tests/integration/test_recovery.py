"""Nothing accepted is lost, and each caller gets one answer: the ledger's recovery under kill -9,
a quick restart, a queue nobody consumes, a hung (SIGSTOPped) worker and a burst of requests."""

from __future__ import annotations

import collections
import json
import random
import signal
import threading
import time

import pytest
import redis
from celery.result import AsyncResult

from dispatcher import dispatch_inference, metrics
from gpu_dispatch import broker
from gpu_dispatch.celery import app
from gpu_dispatch.kombu_redis import KombuRedis
from gpu_dispatch.ledger import Ledger
from tests.integration.dispatch_support import FAST_GPU, send_pinned, start_dispatcher, start_gpus, wait_for_gpus
from tests.support import start_gpu_worker, wait_until

#: A GPU slow enough that a request runs for seconds (400 tokens at 20 ms).
SLOW = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "20"}


@pytest.fixture
def ledger():
    client = broker.client(app.conf.broker_url)
    yield Ledger(client)
    client.close()


def where(ledger: Ledger, kombu: KombuRedis, task_id: str, queue: str) -> str:
    """Where a request is now: in its queue's list, held unacknowledged, started, or nowhere (in transit)."""
    record = ledger.record(task_id)
    if record.state != "queued":
        return record.state
    if task_id in kombu.queued_ids(queue):
        return "in the list"
    if any(u.task_id == task_id for u in kombu.unacked()):
        return "unacknowledged"
    return "in transit"


def test_kill_9_of_a_gpu_worker_as_a_request_reaches_it_loses_nothing_20_times(
        service_name, celery_processes, ledger):
    start_gpus(service_name, celery_processes, ["idle"])
    start_dispatcher(service_name, celery_processes)
    kombu = KombuRedis(app)
    rng = random.Random(20)
    results, seen = [], collections.Counter()
    try:
        for round_ in range(5):
            victims = [start_gpu_worker(app, gpu, service_name, concurrency=1, env=FAST_GPU,
                                        hostname=f"victim{gpu}-{round_}-{service_name}@localhost")
                       for gpu in (1, 2, 3, 4)]
            wait_until(lambda: all(ledger.client.get(f"gpu-dispatch:owner:gpu.127.0.0.1.{8000 + g}")
                                   for g in (1, 2, 3, 4)), 30, "the victims to own their queues")
            for gpu, victim in zip((1, 2, 3, 4), victims):
                queue = f"gpu.127.0.0.1.{8000 + gpu}"
                result = send_pinned(ledger, queue, f"round {round_} victim {gpu}")
                time.sleep(rng.uniform(0, 0.004))  # lands between the worker's BRPOP and its bookkeeping
                victim.stop(signal.SIGKILL)
                seen[where(ledger, kombu, result.id, queue)] += 1
                results.append(result)
        answers = [r.get(timeout=90) for r in results]
    finally:
        kombu.close()
    print(f"\nwhere the 20 requests were at the kill: {dict(seen)}; answered on attempt "
          f"{dict(collections.Counter(a['delivery']['attempt'] for a in answers))}")
    assert [a["task_id"] for a in answers] == [r.id for r in results]
    assert sum(seen.values()) == 20


def test_a_request_taken_by_a_worker_that_died_before_recording_it_is_re_dispatched_after_a_quick_restart(
        service_name, celery_processes, ledger):
    """The exact window kill -9 can hit: the message popped from its queue, in no list, not acknowledged."""
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], env=FAST_GPU)
    start_dispatcher(service_name, celery_processes)
    victim, queue = workers[1], "gpu.127.0.0.1.8001"
    kombu = KombuRedis(app)
    try:
        # A worker with a free slot always has a BRPOP waiting: Redis hands the next message to it even
        # while it is stopped, and the message then sits in its socket, in no list and unacknowledged.
        victim.signal(signal.SIGSTOP)
        result = send_pinned(ledger, queue, "taken and lost")
        wait_until(lambda: where(ledger, kombu, result.id, queue) == "in transit", 10,
                   "the stopped worker's BRPOP to take the message")
        victim.stop(signal.SIGKILL)
        victim.restart()  # same node name, a new incarnation: the queue has a live owner again at once
        answer = result.get(timeout=60)
    finally:
        kombu.close()
    assert answer["delivery"]["attempt"] == 2


def test_a_gpu_worker_killed_and_restarted_within_a_second_has_its_running_requests_answered_in_seconds(
        service_name, celery_processes, ledger):
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], env=FAST_GPU, env_of={1: SLOW})
    start_dispatcher(service_name, celery_processes)
    victim, queue = workers[1], "gpu.127.0.0.1.8001"
    running = [send_pinned(ledger, queue, f"long {n}", max_tokens=400) for n in range(2)]
    wait_until(lambda: all(ledger.record(r.id).state == "running" for r in running), 20, "both requests running")

    killed_at = time.monotonic()
    victim.stop(signal.SIGKILL)
    victim.restart()
    wait_until(lambda: all(ledger.record(r.id).attempt == 2 for r in running), 30,
               "the requests the killed incarnation ran to be re-dispatched")
    redispatched_after = time.monotonic() - killed_at
    answers = [r.get(timeout=60) for r in running]
    print(f"\nrestarted within a second: its 2 running requests re-dispatched {redispatched_after:.2f} s after the "
          f"kill, answered {time.monotonic() - killed_at:.2f} s after it (visibility timeout: "
          f"{app.conf.broker_transport_options['visibility_timeout']} s)")
    assert all(a["delivery"]["attempt"] == 2 for a in answers)
    assert redispatched_after < app.conf.lease_seconds + 15


def test_a_request_sent_to_a_queue_nobody_consumes_is_re_dispatched_and_answered(
        service_name, celery_processes, ledger, make_registry):
    start_gpus(service_name, celery_processes, ["idle"], env=FAST_GPU)
    start_dispatcher(service_name, celery_processes)
    # An instance registered with a GPU's metadata, whose worker never started.
    make_registry().register("127.0.0.1", 8009, {"queue": "gpu.127.0.0.1.8009", "memory_total_mb": "81920"})
    result = send_pinned(ledger, "gpu.127.0.0.1.8009", "nobody home")
    answer = result.get(timeout=60)
    assert answer["gpu"]["queue"] == "gpu.127.0.0.1.8000"
    assert answer["delivery"]["attempt"] == 2


def test_a_sigstopped_worker_resumed_after_its_requests_were_re_dispatched_leaves_one_answer_each(
        service_name, celery_processes, ledger):
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], env=FAST_GPU, env_of={1: SLOW})
    start_dispatcher(service_name, celery_processes)
    victim, queue = workers[1], "gpu.127.0.0.1.8001"
    backend = redis.Redis.from_url(app.conf.result_backend)
    stored = collections.Counter()
    pubsub = backend.pubsub()
    pubsub.psubscribe("celery-task-meta-*")
    stop = threading.Event()

    def count_stores() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                meta = json.loads(message["data"])
                if meta["status"] in ("SUCCESS", "FAILURE"):
                    stored[meta["task_id"]] += 1

    counter = threading.Thread(target=count_stores, daemon=True)
    counter.start()
    try:
        hung = [send_pinned(ledger, queue, f"hung {n}", max_tokens=150) for n in range(2)]
        wait_until(lambda: all(ledger.record(r.id).state == "running" for r in hung), 20, "both running")
        victim.signal(signal.SIGSTOP)
        answers = [r.get(timeout=60) for r in hung]  # re-dispatched once its lease ran out
        assert all(a["gpu"]["queue"] == "gpu.127.0.0.1.8000" for a in answers)
        victim.signal(signal.SIGCONT)
        wait_until(lambda: victim.log(lines=400).count("this outcome is discarded") >= 2, 30,
                   "the resumed worker to finish its two runs and discard their outcomes")
        time.sleep(0.5)  # let the result pubsub deliver anything the resumed worker might have stored
    finally:
        stop.set()
        counter.join()
        pubsub.close()
    assert {r.id: stored[r.id] for r in hung} == {r.id: 1 for r in hung}
    assert [AsyncResult(r.id, app=app).get(timeout=5)["gpu"]["queue"] for r in hung] == ["gpu.127.0.0.1.8000"] * 2


def test_500_pipelined_requests_with_default_settings_on_2_gpus_all_go_straight_to_a_gpu(
        service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle", "idle"], env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "0.01"},
               concurrency=4)
    start_dispatcher(service_name, celery_processes)
    wait_for_gpus(producer_view, 2)
    handed = metrics.HANDED_TO_CENTRAL.labels("no eligible GPU")._value.get()

    pending = [dispatch_inference.delay(f"burst {n}", max_tokens=1) for n in range(500)]
    answers = [r.get(timeout=120) for r in pending]

    assert metrics.HANDED_TO_CENTRAL.labels("no eligible GPU")._value.get() == handed
    assert len({a["task_id"] for a in answers}) == 500
    print(f"\n500 requests with the default {app.conf.request_memory_mb} MB each: served by "
          f"{dict(collections.Counter(a['gpu']['queue'] for a in answers))}, none handed to the central path")
