"""The request ledger's transitions, on the real Redis: who may run a request, which outcome counts,
and that every GPU's load always equals the records counted in it."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from gpu_dispatch import broker
from gpu_dispatch.celery import app
from gpu_dispatch.ledger import PREFIX, Ledger, Load
from gpu_dispatch.ownership import Ownership, QueueTaken, alive

A, B = "gpu.10.9.0.1.8000", "gpu.10.9.0.2.8000"
MESSAGE = {"args": ["p"], "kwargs": {}, "parent_id": None, "root_id": None}


@pytest.fixture
def client() -> redis.Redis:
    c = broker.client(app.conf.broker_url)
    yield c
    c.close()


@pytest.fixture
def ledger(client) -> Ledger:
    return Ledger(client, keep_s=60)


def lease(client, incarnation: str, queue: str, node: str = "gpu0@h", ttl_s: float = 30) -> Ownership:
    owner = Ownership(client, incarnation=incarnation, node=node, queue=queue, instance=queue, ttl_s=ttl_s)
    owner.renew()
    return owner


def loads(ledger: Ledger) -> dict[str, Load]:
    return ledger.loads([A, B])


def test_a_request_moves_queued_started_running_and_settles_with_its_memory_counted_once(ledger, client):
    lease(client, "inc-a", A)
    assert ledger.dispatch("t1", A, 2048.4, MESSAGE, "producer")
    assert loads(ledger)[A] == Load(queued=1, queued_mb=2049)

    assert ledger.start("t1", A, 1, "inc-a", admit=False) == ("ok", "2049")
    assert loads(ledger)[A] == Load(queued=1, queued_mb=2049)  # started, waiting for memory: still in line
    assert ledger.admit("t1", "inc-a")
    assert loads(ledger)[A] == Load(running=1, running_mb=2049)
    assert ledger.held_by("inc-a") == ["t1"]

    assert ledger.finish("t1", "inc-a") == "ok"
    assert loads(ledger)[A] == Load()
    assert ledger.settle("t1", "inc-a", "SUCCESS")
    record = ledger.record("t1")
    assert record.state == "done" and record.message is None
    assert client.ttl(PREFIX + "req:t1") > 0
    assert ledger.open_count() == 0 and ledger.queues_with_work() == [] and ledger.holding_incarnations() == []


def test_a_request_of_no_memory_moves_through_every_state(ledger, client):
    lease(client, "inc-a", A)
    ledger.dispatch("t0", A, 0, MESSAGE, "producer")
    assert ledger.start("t0", A, 1, "inc-a", admit=False)[0] == "ok"
    assert ledger.admit("t0", "inc-a") and ledger.finish("t0", "inc-a") == "ok"
    assert ledger.settle("t0", "inc-a", "SUCCESS")
    assert loads(ledger)[A] == Load()


def test_the_same_task_id_is_recorded_once(ledger):
    assert ledger.dispatch("t1", A, 1, MESSAGE, "producer")
    assert not ledger.dispatch("t1", B, 1, MESSAGE, "central")
    assert ledger.record("t1").queue == A


def test_a_delivery_of_an_older_attempt_or_to_another_queue_is_not_run(ledger, client):
    lease(client, "inc-a", A)
    lease(client, "inc-b", B)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    record = ledger.record("t1")
    assert ledger.redispatch(record, B) == 2

    assert ledger.start("t1", A, 1, "inc-a", admit=True) == ("moved", f"{B} 2")
    assert ledger.start("t1", B, 2, "inc-b", admit=True)[0] == "ok"
    assert loads(ledger) == {A: Load(), B: Load(running=1, running_mb=10)}


def test_a_newer_attempt_whose_record_has_not_moved_yet_is_adopted_where_it_arrives(ledger, client):
    lease(client, "inc-b", B)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    # Recovery published attempt 2 to B and has not moved the record yet (or died doing it).
    assert ledger.start("t1", B, 2, "inc-b", admit=True)[0] == "ok"
    record = ledger.record("t1")
    assert (record.queue, record.attempt, record.state) == (B, 2, "running")
    assert loads(ledger) == {A: Load(), B: Load(running=1, running_mb=10)}
    as_recovery_read_it = dataclasses.replace(record, attempt=1, queue=A, state="queued", holder=None)
    assert ledger.redispatch(as_recovery_read_it, B) == 0  # its move comes too late and changes nothing


def test_a_request_held_by_a_live_incarnation_is_not_taken_by_another_but_a_dead_ones_is(ledger, client):
    lease(client, "inc-a", A)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    assert ledger.start("t1", A, 1, "inc-a", admit=True)[0] == "ok"
    assert ledger.start("t1", A, 1, "inc-a2", admit=True) == ("held", "inc-a")
    assert ledger.start("t1", A, 1, "inc-a", admit=True) == ("again", "")

    client.delete(PREFIX + "worker:inc-a")  # its lease is gone
    assert ledger.start("t1", A, 1, "inc-a2", admit=True)[0] == "ok"
    assert ledger.record("t1").holder == "inc-a2"
    assert loads(ledger)[A] == Load(running=1, running_mb=10)


def test_the_first_outcome_wins_and_a_later_one_is_refused(ledger, client):
    lease(client, "inc-a", A)
    lease(client, "inc-b", B)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    ledger.start("t1", A, 1, "inc-a", admit=True)
    ledger.redispatch(ledger.record("t1"), B)  # its worker hung: recovery moved it
    ledger.start("t1", B, 2, "inc-b", admit=True)

    assert ledger.finish("t1", "inc-a") == "ok"  # the hung one finished first: its outcome counts
    assert loads(ledger) == {A: Load(), B: Load()}
    assert ledger.finish("t1", "inc-b") == "answered"
    assert ledger.start("t1", B, 2, "inc-b2", admit=True) == ("answered", "finishing")
    assert not ledger.settle("t1", "inc-b", "SUCCESS")
    assert ledger.settle("t1", "inc-a", "SUCCESS")


def test_a_started_request_put_back_waits_in_its_queue_again(ledger, client):
    lease(client, "inc-a", A)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    ledger.start("t1", A, 1, "inc-a", admit=False)
    assert ledger.unstart("t1", "inc-a")
    record = ledger.record("t1")
    assert record.state == "queued" and record.holder is None
    assert loads(ledger)[A] == Load(queued=1, queued_mb=10)
    assert ledger.held_by("inc-a") == []


def test_a_redispatch_of_a_record_that_changed_since_it_was_read_does_nothing(ledger, client):
    lease(client, "inc-a", A)
    ledger.dispatch("t1", A, 10, MESSAGE, "producer")
    stale = ledger.record("t1")
    ledger.start("t1", A, 1, "inc-a", admit=True)
    assert ledger.redispatch(stale, B) == 0
    assert ledger.record("t1").queue == A


def test_running_and_finishing_requests_are_indexed_by_time(ledger, client):
    lease(client, "inc-a", A)
    for task_id in ("t1", "t2"):
        ledger.dispatch(task_id, A, 1, MESSAGE, "producer")
        ledger.start(task_id, A, 1, "inc-a", admit=True)
    ledger.finish("t2", "inc-a")
    far = 2 ** 50
    assert ledger.running_since_before(far) == ["t1"]
    assert ledger.finishing_since_before(far) == ["t2"]
    assert ledger.settle_stored("t2", "SUCCESS")
    assert ledger.finishing_since_before(far) == []


def test_a_restarted_worker_supersedes_its_predecessor_but_not_another_node(client):
    old = lease(client, "inc-old", A, node="gpu0@h")
    new = Ownership(client, incarnation="inc-new", node="gpu0@h", queue=A, instance=A, ttl_s=30)
    new.started_ms = old.started_ms + 1
    assert new.renew() == "inc-old"
    assert alive(client, ["inc-old", "inc-new"]) == {"inc-old": False, "inc-new": True}
    with pytest.raises(QueueTaken, match="another live gpu-dispatch worker"):
        old.renew()  # the old one, resumed, finds its queue taken by a newer incarnation
    other = Ownership(client, incarnation="inc-other", node="gpu9@elsewhere", queue=A, instance=A, ttl_s=30)
    with pytest.raises(QueueTaken):
        other.renew()


def test_a_worker_leaving_keeps_its_lease_but_gives_up_its_queue(client):
    owner = lease(client, "inc-a", A)
    owner.leave()
    assert client.get(PREFIX + "owner:" + A) is None and client.get(PREFIX + "instance:" + A) is None
    owner.renew()
    assert alive(client, ["inc-a"]) == {"inc-a": True}
    assert client.get(PREFIX + "owner:" + A) is None  # still not taking work
    owner.release()
    assert alive(client, ["inc-a"]) == {"inc-a": False}


def test_outcomes_settle_in_batches(ledger, client):
    lease(client, "inc-a", A)
    for task_id in ("t1", "t2", "t3"):
        ledger.dispatch(task_id, A, 1, MESSAGE, "producer")
        ledger.start(task_id, A, 1, "inc-a", admit=True)
        ledger.finish(task_id, "inc-a")
    ledger.settle_many([("t1", "SUCCESS"), ("t2", "FAILURE"), ("t3", "SUCCESS")], "inc-a")
    assert [r.state for r in ledger.records(["t1", "t2", "t3"])] == ["done"] * 3
    assert ledger.open_count() == 0
