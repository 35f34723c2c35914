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
from dispatcher.recovery import Recovery
from gpu_dispatch.celery import app
from gpu_dispatch.contract import DISPATCH_QUEUE
from gpu_dispatch.ledger import Load
from tests.integration.dispatch_support import (FAST_DISPATCHER, make_view, send_pinned, served_by, start_dispatcher,
                                               start_gpus, wait_for_gpus)
from tests.support import LOG_DIR, PYTHON, CeleryProcess, wait_until

#: Slow enough simulated inference that queues build up behind each GPU (ms per token).
SLOW_GPU = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "2"}
#: About a second per 20-token request: two a second on two slots, far below any sending rate.
VICTIM_GPU = {"GPU_DISPATCH_SIM_MS_PER_TOKEN": "50"}


def test_sigkill_of_a_gpu_worker_under_load_loses_nothing_and_what_it_held_is_re_dispatched(
        service_name, celery_processes, producer_view):
    # The victim is far slower than the others, so its queue has a backlog when it dies.
    start_gpus(service_name, celery_processes, ["idle", "idle"], env=SLOW_GPU)
    victim = start_gpus(service_name, celery_processes, ["idle"], env=VICTIM_GPU, first_gpu=2, beat=False)[0]
    start_dispatcher(service_name, celery_processes)
    wait_for_gpus(producer_view, 3)
    ledger = producer_view.ledger
    queue = "gpu.127.0.0.1.8002"
    # A backlog that does not depend on how fast this process sends (the scoring steers away from a
    # queue as soon as it is deeper than the others): 20 requests recorded and published to it, as the
    # dispatcher does once it has picked it.
    pinned = [send_pinned(ledger, queue, f"pinned {n}", max_tokens=20) for n in range(20)]
    pending = pinned + [dispatch_inference.delay(f"load {n}", max_tokens=20) for n in range(150)]
    wait_until(lambda: ledger.loads([queue])[queue].queued > 5, 10, "a backlog behind the victim")
    killed_at = time.monotonic()
    victim.stop(signal.SIGKILL)
    stranded = {r.id for r in ledger.records(ledger.targeted(queue)) if r.state in ("queued", "started", "running")}

    results = [r.get(timeout=90) for r in pending]
    all_done_after = time.monotonic() - killed_at
    by_id = {r["task_id"]: r for r in results}
    print(f"\nthe SIGKILLed worker left {len(stranded)} requests unfinished; all {len(results)} answered "
          f"{all_done_after:.2f} s after the kill")
    assert [r["task_id"] for r in results] == [p.id for p in pending]
    assert len(stranded) > 5
    assert all(by_id[i]["gpu"]["queue"] != queue and by_id[i]["delivery"]["attempt"] > 1 for i in stranded)
    assert ledger.loads([queue])[queue] == Load()


def test_a_gpu_worker_shut_down_with_work_queued_loses_none_of_it(service_name, celery_processes, producer_view):
    # About 0.2 s a request on one slot each: a backlog forms whenever requests come faster than 10 a second.
    workers = start_gpus(service_name, celery_processes, ["idle", "idle"], concurrency=1,
                         env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "5"})
    start_dispatcher(service_name, celery_processes)
    wait_for_gpus(producer_view, 2)

    pending = [dispatch_inference.delay(f"queued {n}", max_tokens=40) for n in range(60)]
    wait_until(lambda: producer_view.ledger.loads(["gpu.127.0.0.1.8000"])["gpu.127.0.0.1.8000"].queued > 5, 10,
               "a backlog behind GPU 0")
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
    """kombu's unacknowledged messages taken from ``queue``."""
    return sum(routing_key == queue for _payload, _exchange, routing_key in map(json.loads, broker.hvals("unacked")))


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


def test_a_dead_dispatchers_message_is_put_back_unless_it_had_already_handed_it_on(service_name, make_registry):
    """The decision on a stalled dispatch message, on entries written by hand (no worker runs)."""
    broker = redis.Redis.from_url(app.conf.broker_url)
    view = make_view(service_name)
    handed_on, held = uuid(), uuid()
    view.ledger.dispatch(handed_on, "gpu.127.0.0.1.8000", 0, {"args": ["x"], "kwargs": {}}, "central")
    tags = {}
    for task_id in (handed_on, held):
        tag = tags[task_id] = f"test-{task_id}"
        payload = {"body": "", "headers": {"id": task_id, "task": "dispatch_inference", "eta": None},
                   "properties": {"delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": "dispatch"},
                                  "body_encoding": "base64", "priority": 0},
                   "content-type": "application/json", "content-encoding": "utf-8"}
        broker.hset("unacked", tag, json.dumps([payload, "", DISPATCH_QUEUE]))
        broker.zadd("unacked_index", {tag: time.time() - 60})
    recovery = Recovery(app, view)
    try:
        recovery.rescue_dispatch_queue()
        put_back = [json.loads(raw) for raw in broker.lrange(DISPATCH_QUEUE, 0, -1)]
        assert [m["headers"]["id"] for m in put_back if m["headers"]["id"] in (handed_on, held)] == [held]
        assert put_back[-1]["headers"]["redelivered"] is True
        assert not broker.hexists("unacked", tags[handed_on]) and not broker.hexists("unacked", tags[held])
    finally:
        for raw in broker.lrange(DISPATCH_QUEUE, 0, -1):
            if json.loads(raw)["headers"]["id"] in (handed_on, held):
                broker.lrem(DISPATCH_QUEUE, 0, raw)
        broker.hdel("unacked", *tags.values())
        broker.zrem("unacked_index", *tags.values())
        recovery.kombu.close()
        view.close()
