"""One injected message must not kill a worker: each kind of poison, on a GPU queue, a GPU worker's
control lane and the dispatch queue, is set aside in the dead-letter list and the worker keeps serving."""

from __future__ import annotations

import base64
import json
import pickle

import pytest
import redis

from dispatcher import dispatch_inference
from gpu_dispatch.celery import app
from gpu_dispatch.transport import DEAD_LETTER_KEY
from tests.integration.dispatch_support import FAST_GPU, start_dispatcher, start_gpus
from tests.support import wait_until

GPU_QUEUE, CONTROL = "gpu.127.0.0.1.8000", "gpu.127.0.0.1.8000.control"


def template(broker: redis.Redis, task: str, queue: str) -> dict:
    """A real kombu envelope of a Celery task message for ``queue``, to spoil (published to a list of its
    own, so no worker takes it)."""
    app.send_task(task, args=("x",), kwargs={"max_tokens": 1}, queue="template")
    envelope = json.loads(broker.rpop("template"))
    envelope["properties"]["delivery_info"]["routing_key"] = queue
    return envelope


def spoiled(broker: redis.Redis, how: str, task: str = "run_inference", queue: str = GPU_QUEUE) -> bytes:
    envelope = template(broker, task, queue)
    if how == "not json":
        return b"this is {not json"
    if how == "a json list":
        return b"[1,2,3]"
    if how == "envelope without properties":
        envelope.pop("properties")
    elif how == "no task id":
        envelope["headers"].pop("id")
    elif how == "body not a celery body":
        envelope["body"] = base64.b64encode(b'{"not": "a body"}').decode()
    elif how == "pickle":
        envelope["content-type"] = "application/x-python-serialize"
        envelope["body"] = base64.b64encode(pickle.dumps(((), {}, {}))).decode()
    elif how == "no arguments":
        envelope["body"] = base64.b64encode(json.dumps([[], {}, {}]).encode()).decode()
    return json.dumps(envelope).encode()


KINDS = ["not json", "a json list", "envelope without properties", "no task id", "body not a celery body",
         "pickle", "no arguments"]


def dead_letters(broker: redis.Redis) -> list[dict]:
    return [json.loads(raw) for raw in broker.lrange(DEAD_LETTER_KEY, 0, -1)]


@pytest.mark.parametrize("lane", [GPU_QUEUE, CONTROL])
def test_every_kind_of_poison_on_a_gpu_worker_is_set_aside_and_the_worker_keeps_serving(
        service_name, celery_processes, producer_view, lane):
    broker = redis.Redis.from_url(app.conf.broker_url)
    [worker] = start_gpus(service_name, celery_processes, ["idle"], env=FAST_GPU)
    start_dispatcher(service_name, celery_processes)
    wait_until(producer_view.candidates, 30, "the GPU in the view")
    task = "refresh_gpu_metadata" if lane == CONTROL else "run_inference"
    for kind in KINDS:
        broker.lpush(lane, spoiled(broker, kind, task=task, queue=lane))
    # Each one is either set aside, or (a well-formed task with bad arguments) answered with an error.
    wait_until(lambda: broker.llen(lane) == 0, 30, "the worker to take every message")
    answer = dispatch_inference.delay("still serving?", max_tokens=2).get(timeout=60)

    assert worker.alive(), worker.log()
    assert answer["gpu"]["queue"] == GPU_QUEUE
    letters = dead_letters(broker)
    print(f"\n{lane}: {len(letters)} set aside: " + "; ".join(f"{d['reason'][:70]}" for d in letters))
    assert len(letters) >= len(KINDS) - 1
    assert all(d["queue"] == lane and d["reason"] and d["message"] for d in letters), letters
    assert "Unrecoverable error" not in worker.log(lines=2000)


def test_poison_on_the_dispatch_queue_is_set_aside_and_the_dispatcher_keeps_dispatching(
        service_name, celery_processes, central_mode):
    broker = redis.Redis.from_url(app.conf.broker_url)
    start_gpus(service_name, celery_processes, ["idle"], env=FAST_GPU)
    dispatcher = start_dispatcher(service_name, celery_processes)
    for kind in KINDS:
        broker.lpush("dispatch", spoiled(broker, kind, task="dispatch_inference", queue="dispatch"))
    wait_until(lambda: broker.llen("dispatch") == 0, 30, "the dispatcher to take every message")
    answer = dispatch_inference.delay("still dispatching?", max_tokens=2).get(timeout=60)

    assert dispatcher.alive(), dispatcher.log()
    assert answer["text"]
    assert len(dead_letters(broker)) >= len(KINDS) - 1
    assert "Unrecoverable error" not in dispatcher.log(lines=2000)
