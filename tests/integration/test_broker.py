"""Celery over the real Redis broker and result backend."""

from __future__ import annotations

import uuid

import pytest

from gpu_dispatch.celery import app
from tests.support import PYTHON, log_tail, spawn, stop, wait_until

#: A payload that exercises JSON's types, unicode included.
PAYLOAD = {"prompt": "你好, GPU", "max_tokens": 16, "temperature": 0.5, "stop": ["\n"], "stream": False,
           "meta": None}


@pytest.fixture
def echo_worker():
    """A real Celery worker of our app, consuming a queue of its own."""
    queue = f"test.echo.{uuid.uuid4().hex[:6]}"
    name = f"echo-{queue}@localhost"
    proc = spawn([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "worker", "--pool", "threads",
                  "--concurrency", "2", "-Q", queue, "-n", name, "--without-gossip", "--without-mingle",
                  "--loglevel", "info"], "echo_worker")
    try:
        wait_until(lambda: proc.poll() is not None or app.control.ping([name], timeout=0.5), 60,
                   "the worker to answer a ping")
        assert proc.poll() is None, f"worker exited:\n{log_tail('echo_worker')}"
        yield queue
    finally:
        stop(proc)


def test_a_task_round_trips_a_json_payload_through_the_real_broker_and_result_backend(echo_worker):
    # celery.accumulate is Celery's built-in task that returns args[index] unchanged.
    result = app.send_task("celery.accumulate", args=[PAYLOAD], kwargs={"index": 0}, queue=echo_worker)

    assert result.get(timeout=30) == PAYLOAD
    assert result.state == "SUCCESS"


def test_a_worker_refuses_a_pickled_message_and_never_runs_it(echo_worker):
    assert (app.conf.task_serializer, app.conf.result_serializer) == ("json", "json")

    result = app.send_task("celery.accumulate", args=[PAYLOAD], kwargs={"index": 0}, queue=echo_worker,
                           serializer="pickle")

    wait_until(lambda: "Refusing to deserialize untrusted content of type pickle" in log_tail("echo_worker", 200),
               30, "the worker to refuse the pickled message")
    assert result.state == "PENDING"
