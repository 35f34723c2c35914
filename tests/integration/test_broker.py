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


# -- kombu's Redis transport across a Redis crash (gpu_dispatch/transport.py) -------------------------

def _crash_sequence(server, transport: str, back: bool) -> tuple[Exception | None, int, int]:
    """What Celery's consumer does when Redis dies under a worker with one unacknowledged message and a
    BRPOP in flight on two channels (celery/worker/consumer/consumer.py, on_connection_error_after_connected):
    collect() the connection, then close() it.  Returns what close() raised, and (Redis back first) how
    many messages are left unacknowledged and in the queue."""
    from celery.utils.threads import bound_open_broker_sockets
    from kombu import Connection, Consumer, Exchange, Producer, Queue
    from kombu.common import ignore_errors
    import redis

    url = server.url
    tasks = Queue("crash.tasks", Exchange("crash.tasks"), routing_key="crash.tasks")
    lane = Queue("crash.lane", Exchange("crash.lane"), routing_key="crash.lane")
    with Connection(url, transport=transport) as publisher:
        Producer(publisher).publish({"n": 1}, exchange=tasks.exchange, routing_key="crash.tasks", declare=[tasks])
    connection = Connection(url, transport=transport)
    connection.connect()
    channel = connection.default_channel
    channel.basic_qos(0, 2, False)
    Consumer(channel, queues=[tasks], callbacks=[lambda body, message: None]).consume()
    Consumer(connection.channel(), queues=[lane], callbacks=[lambda body, message: None], no_ack=True).consume()
    connection.drain_events(timeout=5)  # the message is delivered, unacknowledged
    try:
        connection.drain_events(timeout=0.2)  # BRPOPs in flight on both channels
    except Exception:
        pass
    server.kill()
    bound_open_broker_sockets(connection, 5.0)
    try:
        connection.collect(socket_timeout=5.0)
    except Exception:
        pass  # Celery swallows it too
    if back:
        server.start(timeout=30)
    raised = None
    try:
        ignore_errors(connection, connection.close)
    except Exception as exc:
        raised = exc
    client = redis.Redis.from_url(url)
    left = (client.hlen("unacked"), client.llen("crash.tasks")) if back else (0, 0)
    client.close()
    return raised, *left


@pytest.fixture
def crash_redis(tmp_path):
    from gpu_dispatch_tools.servers import RedisServer
    from tests.conftest import TEST_REDIS_PORT

    server = RedisServer.from_url(f"redis://127.0.0.1:{TEST_REDIS_PORT + 1}/0", tmp_path)
    server.start(timeout=30)
    yield server
    server.stop()


def test_kombus_own_transport_still_dies_on_the_crash_sequence_so_our_workaround_is_still_needed(crash_redis):
    raised, _, _ = _crash_sequence(crash_redis, "kombu.transport.redis:Transport", back=False)
    assert isinstance(raised, AttributeError) and "hostname" in str(raised), \
        f"kombu no longer fails this way ({raised!r}): gpu_dispatch/transport.py's _connparams may go"


def test_our_transport_survives_the_crash_sequence_and_puts_the_message_back(crash_redis):
    raised, unacked, queued = _crash_sequence(crash_redis, "gpu_dispatch.transport:Transport", back=True)
    assert raised is None
    assert (unacked, queued) == (0, 1)


def test_redis_urls_get_our_transport():
    assert app.connection_for_write().transport_cls in ("redis", "gpu_dispatch.transport:Transport")
    assert type(app.connection_for_write().transport).__module__ == "gpu_dispatch.transport"
