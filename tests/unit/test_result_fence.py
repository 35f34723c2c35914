"""The result store's fence: a GPU worker that lost its claim on an outcome while cut off stores nothing over
the re-dispatched answer (gpu_dispatch/results.py, workers.runtime.GpuWorker.may_store) — no servers."""

from __future__ import annotations

import threading

import pytest

from gpu_dispatch import ownership, results
from gpu_dispatch.ownership import Ownership
from workers.runtime import GpuWorker


class FakeClient:
    """Just enough of a Redis client for Ownership: every renewal succeeds."""

    def register_script(self, _source):
        return lambda args: [b"ok", b""]


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(ownership.time, "monotonic", lambda: now[0])
    return now


def owner() -> Ownership:
    return Ownership(FakeClient(), incarnation="inc", node="n", queue="q", instance="i:1", ttl_s=3.0)


def test_a_lease_renewed_in_time_never_lapses(clock):
    lease = owner()
    lease.renew()
    for _ in range(10):
        clock[0] += 1.0  # every third of the TTL, as the lease thread renews
        lease.renew()
    assert lease.lapses == 0 and lease.live_since(0)


def test_a_gap_near_the_ttl_counts_as_a_lapse_and_ends_the_certainty(clock):
    lease = owner()
    lease.renew()
    claimed_at = lease.lapses
    clock[0] += 2.8  # 0.93 of the TTL: the lease may have run out before this renewal reached Redis
    assert not lease.live_since(claimed_at), "overdue now: not certain"
    lease.renew()
    assert lease.lapses == claimed_at + 1
    assert not lease.live_since(claimed_at), "renewed again, but it may have run out in between"
    assert lease.live_since(lease.lapses)


class FakeLedger:
    def __init__(self, still_ours: bool) -> None:
        self.still_ours, self.asked = still_ours, []

    def claimed_by(self, task_id, claimant):
        self.asked.append((task_id, claimant))
        return self.still_ours


def worker(lease: Ownership, ledger: FakeLedger) -> GpuWorker:
    gpu = GpuWorker.__new__(GpuWorker)  # only what may_store reads
    gpu.ownership, gpu.ledger, gpu.incarnation = lease, ledger, "inc"
    gpu._settle_lock, gpu._claims = threading.Lock(), {}
    gpu._broker = lambda call, what: call()
    return gpu


def test_an_outcome_claimed_while_the_lease_holds_is_stored_without_asking_the_ledger(clock):
    lease, ledger = owner(), FakeLedger(still_ours=False)
    lease.renew()
    gpu = worker(lease, ledger)
    gpu._claims["t"] = lease.lapses
    assert gpu.may_store("t", "SUCCESS") and ledger.asked == []


def test_an_outcome_claimed_before_a_lapse_is_stored_only_if_the_ledger_says_it_is_still_ours(clock):
    lease = owner()
    lease.renew()
    for still_ours in (False, True):
        ledger = FakeLedger(still_ours)
        gpu = worker(lease, ledger)
        gpu._claims["t"] = lease.lapses
        clock[0] += 10.0  # cut off: no renewal for over the TTL
        assert gpu.may_store("t", "SUCCESS") is still_ours
        assert gpu.may_store("t", "FAILURE") is still_ours
        assert ledger.asked == [("t", "inc")] * 2


def test_what_this_worker_did_not_claim_is_never_fenced(clock):
    lease, ledger = owner(), FakeLedger(still_ours=False)
    gpu = worker(lease, ledger)  # never renewed: not certain of anything
    gpu._claims["t"] = 0
    assert gpu.may_store("t", "STARTED"), "a state that is no outcome"
    assert gpu.may_store("other", "SUCCESS"), "not claimed by this worker (untracked, or not run here)"
    assert ledger.asked == []


def test_the_backends_store_only_what_the_fence_lets_through():
    stored = []

    class Base:
        def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
            stored.append(task_id)
            return result

    class Probe(results._Fenced, Base):
        pass

    try:
        results.install_fence(lambda task_id, state: task_id != "taken")
        assert Probe()._store_result("ours", {"x": 1}, "SUCCESS") == {"x": 1}
        Probe()._store_result("taken", {"x": 2}, "SUCCESS")
        results.install_fence(None)
        Probe()._store_result("taken", {"x": 3}, "SUCCESS")
    finally:
        results.install_fence(None)
    assert stored == ["ours", "taken"]
    assert issubclass(results.SentinelBackend, results._Fenced) and issubclass(results.RedisBackend, results._Fenced)


class ReplayLedger:
    """A ledger whose first settle dies with the primary, and whose new primary has lost the outcome."""

    def __init__(self, claim: str) -> None:
        self.claim, self.calls = claim, []

    def settle_many(self, batch, claimant, replicas=0, timeout_ms=0):
        self.calls.append(("settle_many", [t for t, _ in batch]))
        if len(self.calls) == 1:
            import redis
            raise redis.ConnectionError("the primary died")
        return 1

    def claimed_by(self, task_id, claimant):
        return self.claim == "finishing"

    def finish(self, task_id, claimant):
        self.calls.append(("finish", task_id))
        return "ok" if self.claim == "running" else "answered"

    def settle(self, task_id, claimant, state):
        self.calls.append(("settle", task_id))


class LostBackend:
    def __init__(self) -> None:
        self.stored = []

    def get_task_meta(self, task_id, cache=True):
        return {"status": "PENDING"}

    def store_result(self, task_id, result, state, traceback=None):
        self.stored.append((task_id, result, state))


@pytest.mark.parametrize("claim, stored_again", [("finishing", True), ("running", True), ("answered", False)])
def test_with_replica_wait_an_outcome_a_failover_lost_is_stored_again_unless_answered_elsewhere(claim, stored_again):
    class Conf:
        replica_wait, replica_wait_ms = 1, 100

    ledger, backend = ReplayLedger(claim), LostBackend()
    gpu = worker(owner(), ledger)
    gpu.conf, gpu._unreplicated = Conf(), {"t": ({"text": "hi"}, None)}
    gpu.result_backend = lambda: backend
    gpu._settle_replicated([("t", "SUCCESS")])
    assert backend.stored == ([("t", {"text": "hi"}, "SUCCESS")] if stored_again else [])
    assert (("settle", "t") in ledger.calls) is stored_again
    assert gpu._unreplicated == {}
