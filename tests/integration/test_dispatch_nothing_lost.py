"""Nothing lost: a GPU worker killed under load, a worker shut down with work queued, Nacos restarted,
a dispatcher worker killed mid-dispatch."""

from __future__ import annotations

import collections
import json
import re
import signal
import threading
import time

import redis
from celery.utils import uuid

from dispatcher import dispatch_inference
from dispatcher.rescue import OrphanRescue
from gpu_dispatch.celery import app
from gpu_dispatch.contract import DISPATCH_QUEUE
from tests.integration.dispatch_support import (FAST_DISPATCHER, make_view, served_by, start_dispatcher, start_gpus,
                                               wait_for_gpus)
from tests.support import LOG_DIR, PYTHON, CeleryProcess, wait_until

#: Slow enough simulated inference that queues build up behind each GPU (ms per token).
SLOW_GPU = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "2"}
#: About a second per 20-token request: two a second on two slots, far below any sending rate.
VICTIM_GPU = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "50"}


def test_sigkill_of_a_gpu_worker_under_load_loses_nothing_and_its_orphans_are_re_dispatched(
        service_name, celery_processes, producer_view, monkeypatch):
    # The victim is far slower than the others.
    workers = start_gpus(service_name, celery_processes, ["idle", "idle", "idle"], env=SLOW_GPU,
                         env_of={0: VICTIM_GPU})
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

    # A backlog in the victim's queue that does not depend on how fast this process sends: the scoring
    # steers away from a queue as soon as it is counted deeper than the others (CI once saw no backlog
    # form within 10 s), so 20 requests are published to it directly, as an app pinned to it would.
    pending = [app.send_task("run_inference", args=(f"pinned {n}",), kwargs={"max_tokens": 20, "memory_mb": 0},
                             queue=victim) for n in range(20)]
    sent_to.update((p.id, victim) for p in pending)
    # Light requests (memory_mb=0): at the default estimate, 150 at once would not all fit in the GPUs'
    # free memory before their next reading, and the rest would wait for it on the central path.
    pending += [dispatch_inference.delay(f"load {n}", max_tokens=20, memory_mb=0) for n in range(150)]
    try:
        wait_until(lambda: broker.llen(victim) > 5, 10, "a backlog in the victim's queue")
    except AssertionError as exc:
        depths = {q: broker.llen(q) for q in sorted(set(sent_to.values()))}
        raise AssertionError(f"{exc}; sent by the producer path: {collections.Counter(sent_to.values())}; "
                             f"queued now: {depths}") from None
    killed_at = time.monotonic()
    workers[0].stop(signal.SIGKILL)
    # Queued, or taken and not finished (one killed after storing its result, before its ack, is done).
    stranded = broker.llen(victim) + sum(app.AsyncResult(task_id).state != "SUCCESS"
                                         for task_id in _unacked_ids_of(broker, victim))
    # "Within seconds of the instance disappearing" (kombu alone would restore the unacknowledged ones
    # after its visibility timeout, minutes): the deadline is loose so that a busy machine does not fail it.
    wait_until(lambda: broker.llen(victim) == 0 and not _unacked_of(broker, victim), 30,
               "the victim's queued and unacknowledged messages to be re-dispatched")
    redispatched_after = time.monotonic() - killed_at
    results = [r.get(timeout=60) for r in pending]
    all_done_after = time.monotonic() - killed_at

    rescued = [r for r in results if sent_to[r["task_id"]] == victim and r["gpu"]["queue"] != victim]
    print(f"\n{stranded} messages stranded by the SIGKILL (queued + running); re-dispatched "
          f"{redispatched_after:.2f} s after it; all {len(results)} results {all_done_after:.2f} s after it; "
          f"{len(rescued)} served elsewhere")
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert len(rescued) >= stranded


def test_a_gpu_worker_shut_down_with_work_queued_loses_none_of_it(service_name, celery_processes, producer_view):
    # About 0.2 s a request on one slot each: a backlog forms whenever requests come faster than 10 a second.
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], concurrency=1,
                         env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "5"})
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
        wait_until(lambda: len(pending) >= 20, 10, "requests flowing before the outage")
        print(f"\n{nacos_server.stop()}")
        try:
            wait_until(lambda: not producer_view.heard_within(2.0), 15, "the dispatcher's view to miss Nacos")
            mark = len(pending)
            wait_until(lambda: len(pending) >= mark + 50, 15, "dispatch to go on from the last view without Nacos")
            sent_during_outage = len(pending)
        finally:
            print(nacos_server.start(timeout=120))
        wait_until(lambda: producer_view.heard_within(1.0) and len(producer_view.candidates()) == 2, 60,
                   "both GPUs back in the dispatcher's view")
        mark = len(pending)
        wait_until(lambda: len(pending) >= mark + 20, 15, "dispatch to go on after Nacos returned")
    finally:
        stop.set()
        sender.join()

    results = [r.get(timeout=120) for r in pending]
    print(f"{len(results)} requests across the outage ({sent_during_outage} sent before Nacos returned): "
          f"served by {dict(served_by(results))}")
    assert [r["task_id"] for r in results] == [p.id for p in pending]


def _unacked_of(broker: redis.Redis, queue: str) -> int:
    return len(_unacked_ids_of(broker, queue))


def _unacked_ids_of(broker: redis.Redis, queue: str) -> list[str]:
    """Task ids of kombu's unacknowledged messages taken from ``queue``."""
    entries = [json.loads(raw) for raw in broker.hvals("unacked")]
    return [payload["headers"]["id"] for payload, _exchange, routing_key in entries if routing_key == queue]


#: A dispatcher whose requests wait (no GPU) in short no-GPU retries and whose stalled dispatches are quickly seen.
WAITING_DISPATCHER = {"GPU_DISPATCH_NO_GPU_WAIT": "120", "GPU_DISPATCH_NO_GPU_BACKOFF": "1",
                      "GPU_DISPATCH_NO_GPU_BACKOFF_MAX": "2", "GPU_DISPATCH_DISPATCH_STALL_SECONDS": "2"}


def test_sigkill_of_the_dispatcher_mid_dispatch_loses_nothing_and_runs_nothing_twice(
        service_name, celery_processes, central_mode):
    broker = redis.Redis.from_url(app.conf.broker_url)
    first = start_dispatcher(service_name, celery_processes, WAITING_DISPATCHER)
    # No GPU yet: every request waits inside the first dispatcher, as a retry message it holds
    # unacknowledged until its ETA.
    pending = [dispatch_inference.delay(f"held by the dispatcher {n}", max_tokens=4) for n in range(20)]
    wait_until(lambda: broker.llen(DISPATCH_QUEUE) == 0 and _unacked_of(broker, DISPATCH_QUEUE) == 20, 20,
               "the first dispatcher to hold every request")
    second = CeleryProcess([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "worker", "-Q", DISPATCH_QUEUE,
                            "--pool", "threads", "--concurrency", "4", "-n", f"second-{first.node}",
                            "--without-gossip", "--without-mingle", "--loglevel", "info"],
                           f"second-dispatcher-{service_name}",
                           {"GPU_DISPATCH_NACOS_SERVICE": service_name, **FAST_DISPATCHER, **WAITING_DISPATCHER})
    celery_processes.append(second)
    wait_until(lambda: app.control.ping([f"second-{first.node}"], timeout=0.5), 60, "the second dispatcher")

    def put_back() -> set[str]:
        # The second dispatcher takes each message again the moment it is put back, so the broker's lists
        # show the rescue only for an instant; the rescue's log line says it for good.
        return set(re.findall(r"task ([0-9a-f-]+): its dispatcher worker is gone .*; put back",
                              second.log(lines=100_000)))

    killed_at = time.monotonic()
    first.stop(signal.SIGKILL)
    # Between its start and the kill, the second dispatcher took some requests over as their no-GPU retries
    # were re-queued; the rest, held by the first, must be put back.  A loose deadline (a busy machine must
    # not fail it), still far below kombu's own restore (its visibility timeout).
    wait_until(put_back, 60, "the second dispatcher to put back the messages the dead one held")
    back_after = time.monotonic() - killed_at
    start_gpus(service_name, celery_processes, ["idle"])
    results = [r.get(timeout=60) for r in pending]
    all_done_after = time.monotonic() - killed_at

    print(f"\nSIGKILL of a dispatcher that held requests: the first put back {back_after:.2f} s after it "
          f"(GPU_DISPATCH_DISPATCH_STALL_SECONDS=2, no-GPU retries of ≤ 2 s; kombu alone: "
          f"{app.conf.broker_transport_options['visibility_timeout']} s); all 20 results "
          f"{all_done_after:.2f} s after it (a GPU worker started meanwhile)")
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert all(dispatch_inference.AsyncResult(p.id).state == "SUCCESS" for p in pending)
    received = collections.Counter(re.findall(r"Task run_inference\[([0-9a-f-]+)\] received",
                                              (LOG_DIR / f"gpu0-{service_name}.log").read_text()))
    assert set(received) == {p.id for p in pending} and set(received.values()) == {1}, received
    print(f"{len(put_back())} of the 20 put back by the second dispatcher; it had taken the rest over before")


def test_a_dead_dispatchers_message_is_put_back_unless_its_run_inference_was_already_sent(
        service_name, make_registry):
    """The rescue's decision on a stalled dispatch message, on entries written by hand (no worker runs)."""
    broker = redis.Redis.from_url(app.conf.broker_url)
    gpu_queue = f"gpu.{service_name}.8000"
    # The GPU of that queue is registered, so the GPU-queue part of the sweep must leave its message alone.
    make_registry().register("127.0.0.1", 8000, {"queue": gpu_queue})
    view = make_view(service_name)
    sent, held = uuid(), uuid()
    app.send_task("run_inference", args=("sent",), task_id=sent, queue=gpu_queue)  # published, then died
    tags = {}
    for task_id in (sent, held):
        tag = tags[task_id] = f"test-{task_id}"
        payload = {"body": "", "headers": {"id": task_id, "task": "dispatch_inference", "eta": None},
                   "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": "dispatch"}},
                   "content-type": "application/json", "content-encoding": "utf-8"}
        broker.hset("unacked", tag, json.dumps([payload, "", DISPATCH_QUEUE]))
        broker.zadd("unacked_index", {tag: time.time() - 60})
    rescue = OrphanRescue(app, view)
    try:
        wait_until(lambda: gpu_queue in view.present_queues(), 10, "the GPU's queue in the dispatcher's view")
        rescue.sweep()
        put_back = [json.loads(raw) for raw in broker.lrange(DISPATCH_QUEUE, 0, -1)]
        assert [m["headers"]["id"] for m in put_back if m["headers"]["id"] in (sent, held)] == [held]
        assert put_back[-1]["headers"]["redelivered"] is True
        assert not broker.hexists("unacked", tags[sent]) and not broker.hexists("unacked", tags[held])
        assert broker.llen(gpu_queue) == 1  # the run_inference already sent is left to run, once
    finally:
        for raw in broker.lrange(DISPATCH_QUEUE, 0, -1):
            if json.loads(raw)["headers"]["id"] in (sent, held):
                broker.lrem(DISPATCH_QUEUE, 0, raw)
        broker.delete(gpu_queue)
        broker.hdel("unacked", *tags.values())
        broker.zrem("unacked_index", *tags.values())
        rescue.broker.close()
        view.close()
