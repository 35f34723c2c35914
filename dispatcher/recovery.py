"""Recovery: every request the ledger holds ends in an answer, whatever happens to the worker it was sent to.

:func:`due` decides (pure) what a sweep re-dispatches and why; :class:`Recovery`
sweeps, re-dispatches, answers what ran over its time limit or found no GPU, and
puts back a dead dispatcher worker's ``dispatch`` messages.  ``docs/dispatcher.md``
("Recovery") gives the rules and the bound.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable, Mapping

import redis
from celery import states

from dispatcher import metrics
from dispatcher.errors import InferenceTimeLimitExceeded, InvalidRequest, NoGpuAvailable
from dispatcher.request import scoring_request
from dispatcher.view import RegistryView
from gpu_dispatch import ownership
from gpu_dispatch.contract import ATTEMPT_HEADER, DISPATCH_QUEUE, INFERENCE_TASK
from gpu_dispatch.kombu_redis import KombuRedis
from gpu_dispatch.ledger import QUEUED, RUNNING, STARTED, Record, now_ms
from scoring import NoEligibleGpu

log = logging.getLogger(__name__)

#: Sweeps in a row a queue must be seen without a live owner before its waiting requests move.
OWNERLESS_SWEEPS = 2
#: A waiting request younger than this (ms) is never suspected lost: its message may not be published yet.
TRANSIT_GRACE_MS = 2000
#: Seconds between audits of every queue's lists against the ledger (besides those after an owner change).
SAFETY_AUDIT_S = 30.0
#: Seconds an outcome may stay claimed and unsettled before the result backend is asked.
SETTLE_GRACE_S = 10.0
#: Seconds to wait for nodes to say which dispatch messages they hold.
PING_TIMEOUT = 1.0


def due(records: Iterable[Record], alive: Mapping[str, bool], owners: Mapping[str, str | None],
        ownerless_sweeps: Mapping[str, int], missing: Mapping[str, set[str]], suspected: set[str],
        now: int) -> dict[str, str]:
    """Which records to re-dispatch now, and why (pure: the sweep reads, this decides).

    :param records: open records, as read this sweep.
    :param alive: incarnation → whether its lease is live.
    :param owners: queue → its live owner (``None``: none).
    :param ownerless_sweeps: queue → sweeps in a row it has been seen without an owner.
    :param missing: queue → ids of its waiting requests found in none of its lists this sweep (audited queues).
    :param suspected: ids found missing on the previous sweep too.
    :param now: Unix ms.
    :returns: id → reason (``holder``, ``ownerless``, ``lost``).
    """
    out: dict[str, str] = {}
    for r in records:
        if r.state in (STARTED, RUNNING):
            if r.holder and not alive.get(r.holder, False):
                out[r.id] = "holder"
        elif r.state == QUEUED:
            if owners.get(r.queue) is None and ownerless_sweeps.get(r.queue, 0) >= OWNERLESS_SWEEPS:
                out[r.id] = "ownerless"
            elif r.id in missing.get(r.queue, ()) and r.id in suspected and now - r.sent_ms > TRANSIT_GRACE_MS:
                out[r.id] = "lost"
    return out


class Recovery:
    """The dispatcher worker's recovery sweep (see the module docstring), on a thread of its own.

    :param app: the Celery app (broker, result backend, remote control, settings).
    :param view: the dispatcher's view: the ledger, the broker client and the scoring.
    """

    def __init__(self, app: Any, view: RegistryView) -> None:
        self.app = app
        self.view = view
        self.ledger = view.ledger
        self.client = view.broker
        self.kombu = KombuRedis(app)
        self.interval = app.conf.rescue_interval
        self.stall_seconds = app.conf.dispatch_stall_seconds
        self._owners: dict[str, str | None] = {}
        self._ownerless: dict[str, int] = {}
        self._audit_sweeps: dict[str, int] = {}  # queue -> audits still due (owner changed)
        self._suspected: set[str] = set()
        self._suspect_queues: set[str] = set()
        self._last_safety_audit = 0.0
        self._no_gpu_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-dispatch-recovery", daemon=True)

    def start(self) -> "Recovery":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + PING_TIMEOUT + 5)
        self.kombu.close()

    def _run(self) -> None:
        # Leases are judged only once every worker has had a lease period to renew its own: after
        # recovery starts, and after the broker comes back (Redis expired every lease while away).
        judge_after = time.monotonic() + self.app.conf.lease_seconds
        failing = False
        while not self._stop.wait(self.interval):
            try:
                if time.monotonic() >= judge_after:
                    self.sweep()
                else:
                    self.ledger.open_count()  # only: is the broker there?
                if failing:
                    log.warning("broker answers again: recovery judges leases again in %g s",
                                self.app.conf.lease_seconds)
                    judge_after = time.monotonic() + self.app.conf.lease_seconds
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    log.warning("recovery cannot reach the broker (%s); waiting for it", exc)
                failing = True
            except Exception:  # a bug must not end recovery for good
                log.exception("recovery sweep failed; trying again in %g s", self.interval)

    # -- one sweep ----------------------------------------------------------------------

    def sweep(self) -> dict[str, str]:
        """Do what is due now; returns the requests re-dispatched, with why."""
        now = now_ms()
        queues = self.ledger.queues_with_work()
        owners = ownership.owners(self.client, queues)
        self._track_owners(owners)
        incs = self.ledger.holding_incarnations()
        alive = ownership.alive(self.client, incs)
        ids: set[str] = set()
        for inc, live in alive.items():
            if not live:
                ids.update(self.ledger.held_by(inc))
        for queue in queues:
            if owners[queue] is None and self._ownerless.get(queue, 0) >= OWNERLESS_SWEEPS:
                ids.update(self.ledger.targeted(queue))
        missing = self._audit(queues, now)
        for found in missing.values():
            ids.update(found)
        records = self.ledger.records(sorted(ids))
        decided = due(records, alive, owners, self._ownerless, missing, self._suspected, now)
        self._suspected = {i for found in missing.values() for i in found}
        moved = {}
        for record in records:
            reason = decided.get(record.id)
            if reason and self._redispatch(record, reason):
                moved[record.id] = reason
        self._settle_or_retry_claimed(now)
        self._enforce_time_limit(now)
        self.rescue_dispatch_queue()
        return moved

    def _track_owners(self, owners: Mapping[str, str | None]) -> None:
        for queue, owner in owners.items():
            before = self._owners.get(queue, "unseen")
            if owner is None:
                self._ownerless[queue] = self._ownerless.get(queue, 0) + 1
            else:
                self._ownerless.pop(queue, None)
            if before != owner and owner is not None:
                # A new owner (a restart, or recovery itself just started): what the old one took
                # from the queue and never ran is in none of its lists; look twice.
                self._audit_sweeps[queue] = 2
        self._owners = dict(owners)
        for queue in list(self._ownerless):
            if queue not in owners:
                del self._ownerless[queue]

    def _audit(self, queues: list[str], now: int) -> dict[str, set[str]]:
        """Queue → ids of its waiting requests in none of its lists, for the queues audited this sweep.

        Audited: queues whose owner changed (twice), queues with suspects from
        the last sweep (to confirm them), and every queue each :data:`SAFETY_AUDIT_S`.
        """
        safety = time.monotonic() - self._last_safety_audit >= SAFETY_AUDIT_S
        if safety:
            self._last_safety_audit = time.monotonic()
        suspect_queues = set(self._suspect_queues)
        missing: dict[str, set[str]] = {}
        for queue in queues:
            if not (safety or self._audit_sweeps.get(queue, 0) > 0 or queue in suspect_queues):
                continue
            if self._audit_sweeps.get(queue, 0) > 0:
                self._audit_sweeps[queue] -= 1
            waiting = [r for r in self.ledger.records(self.ledger.targeted(queue))
                       if r.state == QUEUED and now - r.sent_ms > TRANSIT_GRACE_MS]
            if not waiting:
                continue
            present = self.kombu.queued_ids(queue)
            gone = {r.id for r in waiting if present.get(r.id, 0) < r.attempt}
            if gone:
                missing[queue] = gone
        self._suspect_queues = set(missing)
        return missing

    # -- actions --------------------------------------------------------------------------

    def _redispatch(self, record: Record, reason: str) -> bool:
        """Send ``record`` as its next attempt to the GPU the scoring picks; ``False`` if it stays."""
        message = record.message or {}
        args, kwargs = list(message.get("args") or []), dict(message.get("kwargs") or {})
        try:
            request = scoring_request(kwargs, self.app.conf.request_memory_mb)
            decision = self.view.choose(request, record.id, path="recovery")
        except InvalidRequest as exc:  # cannot happen for what delay() accepted; never loop on it
            self._fail(record, InvalidRequest(str(exc)), "invalid")
            return False
        except NoEligibleGpu as exc:
            first = self._no_gpu_since.setdefault(record.id, time.time())
            waited = time.time() - first
            if waited >= self.app.conf.no_gpu_wait:
                self._fail(record, NoGpuAvailable(f"{exc} (re-dispatch after its worker was lost; waited "
                                                  f"{waited:.1f} s; GPU_DISPATCH_NO_GPU_WAIT)"), "no_gpu")
            elif waited == 0:
                log.warning("task %s (%s): no GPU to re-dispatch it to yet: %s", record.id, reason, exc)
            return False
        self._no_gpu_since.pop(record.id, None)
        queue = decision.chosen.state.queue
        attempt = record.attempt + 1
        # Publish first, then move the record: a worker that receives the new attempt before the
        # record moves adopts it (the ledger's start), and a crash in between leaves the old attempt,
        # which the next sweep moves again.
        self.app.send_task(INFERENCE_TASK, args=args, kwargs=kwargs, task_id=record.id, queue=queue,
                           headers={ATTEMPT_HEADER: attempt}, parent_id=message.get("parent_id"),
                           root_id=message.get("root_id") or record.id)
        if not self.ledger.redispatch(record, queue):
            log.info("task %s: changed while being re-dispatched (another recoverer, or its worker adopted "
                     "attempt %d); left as it is", record.id, attempt)
            return False
        self.view.sent(queue, record.memory_mb)
        metrics.RECOVERED.labels(reason).inc()
        log.warning("task %s: %s; re-dispatched to %s as attempt %d", record.id, _REASONS[reason](record), queue,
                    attempt)
        return True

    def _fail(self, record: Record, error: Exception, reason: str) -> None:
        """Answer ``record`` with ``error`` (unless an outcome is claimed already)."""
        if self.ledger.finish(record.id, "recovery") != "ok":
            return
        self.app.backend.mark_as_failure(record.id, error)
        self.ledger.settle(record.id, "recovery", states.FAILURE)
        self._no_gpu_since.pop(record.id, None)
        metrics.ENDED.labels(reason).inc()
        log.warning("task %s: answered with %s: %s", record.id, type(error).__name__, error)

    def _settle_or_retry_claimed(self, now: int) -> None:
        """Outcomes claimed long ago and never settled: their claimant died between claim and store."""
        ids = self.ledger.finishing_since_before(now - int(SETTLE_GRACE_S * 1000))
        for record in self.ledger.records(ids):
            claimant_alive = ownership.alive(self.client, [record.claimant]).get(record.claimant, False) \
                if record.claimant and record.claimant != "recovery" else False
            if claimant_alive:
                continue
            state = self.app.AsyncResult(record.id).state
            if state in states.READY_STATES:
                self.ledger.settle_stored(record.id, state)
            else:
                self._redispatch(record, "unsettled")

    def _enforce_time_limit(self, now: int) -> None:
        limit = self.app.conf.max_inference_seconds
        for record in self.ledger.records(self.ledger.running_since_before(now - int(limit * 1000))):
            if record.state == RUNNING:
                self._fail(record, InferenceTimeLimitExceeded(
                    f"the inference ran for more than {limit:g} s (GPU_DISPATCH_MAX_INFERENCE_SECONDS) on "
                    f"{record.queue}; whatever it returns later is discarded"), "time_limit")

    # -- dispatch messages of a dead dispatcher ----------------------------------------------

    def rescue_dispatch_queue(self) -> None:
        """Put back the ``dispatch`` messages a dead dispatcher worker held; drop those it handed on.

        A ``dispatch`` message held unacknowledged for more than
        ``GPU_DISPATCH_DISPATCH_STALL_SECONDS`` past its ETA is held by a
        stuck dispatcher or by a dead one; every node is asked which of these
        ids it holds (one ``query_task`` broadcast).  One that no node holds
        belongs to a dead dispatcher: if the ledger knows its id, it was
        handed on before the dispatcher died and is dropped; otherwise it is
        put back at the head of ``dispatch`` (kombu's own restore, marked
        redelivered) for any dispatcher to take.
        """
        now = time.time()
        stalled = [u for u in self.kombu.unacked() if u.queue == DISPATCH_QUEUE and u.task_id
                   and u.since is not None and now - max(u.since, _eta(u.payload)) > self.stall_seconds]
        if not stalled:
            return
        wanted = sorted({u.task_id for u in stalled})
        replies = self.app.control.inspect(timeout=PING_TIMEOUT).query_task(*wanted) or {}
        held = {task_id for answer in replies.values() for task_id in (answer or {})}
        for entry in stalled:
            if entry.task_id in held:
                continue
            if self.ledger.record(entry.task_id) is not None:
                self.kombu.drop(entry.tag)
                metrics.RESCUED.labels("dropped").inc()
                log.warning("task %s: its dispatcher worker died after handing it on; its dispatch message is "
                            "dropped", entry.task_id)
            else:
                self.kombu.restore(entry.tag)
                metrics.RESCUED.labels("put back").inc()
                log.warning("task %s: its dispatcher worker is gone (held for over %g s, no node holds it); put "
                            "back on the dispatch queue", entry.task_id, self.stall_seconds)


_REASONS = {
    "holder": lambda r: f"incarnation {r.holder}, which held it ({r.state}), is gone",
    "ownerless": lambda r: f"queue {r.queue} has had no live worker for {OWNERLESS_SWEEPS} sweeps",
    "lost": lambda r: f"it is in none of {r.queue}'s lists and was never started (taken by a worker that died)",
    "unsettled": lambda r: f"its outcome was claimed by {r.claimant}, which died before storing it",
}


def _eta(payload: dict) -> float:
    """The message's ETA (a no-GPU retry's) as a Unix time; 0 when it has none."""
    import datetime

    eta = (payload.get("headers") or {}).get("eta")
    if not eta:
        return 0.0
    try:
        when = datetime.datetime.fromisoformat(eta)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()
