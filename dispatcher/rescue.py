"""Orphan rescue: work left in the queue of a GPU that has left Nacos goes to a live GPU.

A GPU's queue ``gpu.<ip>.<port>`` has one consumer, that GPU's worker.  When
its instance leaves the service (worker killed, or shut down: a warm shutdown
deregisters first) while messages remain for it, those messages are orphans:

- **queued** — waiting in the queue's Redis list (sent before the dispatcher
  saw the GPU go; or put back by kombu when the worker's channel closed);
- **unacknowledged** — taken by the worker (running or prefetched) and held in
  kombu's ``unacked`` hash until acknowledged.  Kombu itself puts them back in
  the queue only after the visibility timeout (above the longest inference,
  minutes); we do it as soon as the worker is known dead: its instance is
  gone *and* its Celery node does not answer a ping.  A worker that answers
  is finishing its running requests after a warm shutdown: its messages are
  left alone.  One whose result is already ``SUCCESS`` is dropped instead of
  put back, so nothing that succeeded runs twice.

Every :data:`rescue_interval` seconds the dispatcher worker sweeps: a queue
seen orphaned on two sweeps in a row (so a momentary gap in Nacos's list is
not mistaken for a departure) has its unacknowledged messages of a dead
worker put back and then its list drained, oldest first, each message sent to
the GPU the scoring picks for it (same task id, same body) and placed at the
head of that GPU's queue, since it has waited longest.  Every move is one Lua
script that pops the message only if it is still the one read (compare and
move), so two dispatcher workers can sweep at once, a crash between two
moves loses nothing, and a message is never in two queues.  While the view
has not heard from Nacos recently (``GPU_DISPATCH_RECONCILE_INTERVAL`` × 3)
nothing is touched: an unreachable Nacos must not look like every GPU gone.

The same sweep also looks at the ``dispatch`` queue's unacknowledged
messages: one held longer than ``GPU_DISPATCH_DISPATCH_STALL_SECONDS`` past
its ETA by no node that answers is a dead dispatcher worker's, and is put
back — or dropped if its ``run_inference`` was already sent (see
:meth:`OrphanRescue._rescue_stalled_dispatches`).  That part needs no view of
the GPUs and runs whether Nacos answers or not.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import threading
import time
from typing import Any

import redis
from celery import states

from dispatcher import metrics
from dispatcher.request import scoring_request
from dispatcher.view import RegistryView
from gpu_dispatch.contract import DISPATCH_QUEUE, INFERENCE_TASK
from scoring import NoEligibleGpu, Request, ScoringError

log = logging.getLogger(__name__)

#: Keys of per-GPU queues (Redis lists named after the queue).
GPU_QUEUE_PATTERN = "gpu.*"
#: Suffixes of a GPU worker's own lanes (refresh fan-out, control): never rescued.
LANE_SUFFIXES = (".control", ".refresh")
#: kombu's Redis transport: separator of priority sub-queues, and its ack-emulation keys.
PRIORITY_SEPARATOR = "\x06\x16"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: Seconds to wait for a departed worker's node to answer a ping before treating it as dead.
PING_TIMEOUT = 1.0
#: Sweeps a queue must be seen orphaned in a row before it is drained.
CONFIRMING_SWEEPS = 2

#: One of kombu's unacknowledged messages: (delivery tag, raw entry, [payload, exchange, routing key]).
Entry = tuple[bytes, bytes, list]

#: Pop the oldest message of KEYS[1] if it is still ARGV[1], push ARGV[2] as the next out of KEYS[2].
_MOVE = """
if redis.call('LINDEX', KEYS[1], -1) == ARGV[1] then
  redis.call('RPOP', KEYS[1])
  redis.call('RPUSH', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
#: Take unacked entry ARGV[1] if it still holds ARGV[2]; push ARGV[3] (if any) as the next out of KEYS[3].
_RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  if ARGV[3] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[3]) end
  return 1
end
return 0
"""


class OrphanRescue:
    """Sweeps the broker for orphaned GPU queues (see the module docstring) on a thread of its own.

    :param app: the Celery app (broker, result backend, remote control, settings).
    :param view: the dispatcher's registry view: which GPUs are present, and the scoring.
    """

    def __init__(self, app: Any, view: RegistryView) -> None:
        self.app = app
        self.view = view
        self.interval = app.conf.rescue_interval
        self.trust_view_for = 3 * app.conf.reconcile_interval
        self.broker = redis.Redis.from_url(app.conf.broker_url)
        self._move = self.broker.register_script(_MOVE)
        self._restore = self.broker.register_script(_RESTORE)
        self.stall_seconds = app.conf.dispatch_stall_seconds
        self._orphaned_sweeps: dict[str, int] = {}
        self._stuck_logged: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-dispatch-rescue", daemon=True)

    def start(self) -> "OrphanRescue":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + PING_TIMEOUT + 5)
        self.broker.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:  # a broker hiccup must not end the rescue for good
                log.exception("orphan rescue sweep failed; trying again in %g s", self.interval)

    # -- one sweep ----------------------------------------------------------------------

    def sweep(self) -> dict[str, int]:
        """Rescue what is due now; returns the messages moved, by orphaned queue."""
        unacked, stalled = self._unacked_by_queue()
        if stalled:  # needs no view of the GPUs
            self._rescue_stalled_dispatches(stalled)
        if not self.view.heard_within(self.trust_view_for):
            return {}
        present = self.view.present_queues()
        queues = {_base(k.decode()) for k in self.broker.scan_iter(match=GPU_QUEUE_PATTERN, _type="LIST")}
        orphans = {q for q in queues | set(unacked) if q not in present and not q.endswith(LANE_SUFFIXES)}
        self._orphaned_sweeps = {q: self._orphaned_sweeps.get(q, 0) + 1 for q in orphans}
        moved = {}
        for queue in sorted(orphans):
            if self._orphaned_sweeps[queue] < CONFIRMING_SWEEPS:
                continue
            if unacked.get(queue):
                self._restore_unacked(queue, unacked[queue])
            count = self._drain(queue)
            if count:
                moved[queue] = count
        return moved

    def _unacked_by_queue(self) -> tuple[dict[str, list[Entry]], list[Entry]]:
        """kombu's unacknowledged messages: those taken from GPU queues, by queue ([(tag, raw entry, entry)]),
        and those taken from the dispatch queue that have stalled (see :meth:`_rescue_stalled_dispatches`)."""
        by_queue: dict[str, list[tuple[bytes, bytes, list]]] = {}
        dispatch: list[tuple[bytes, bytes, list]] = []
        for tag, raw in self.broker.hgetall(UNACKED_KEY).items():
            try:
                entry = json.loads(raw)
                payload, exchange, routing_key = entry
            except (ValueError, TypeError):
                continue
            queue = routing_key or exchange
            if queue == DISPATCH_QUEUE:
                dispatch.append((tag, raw, entry))
            elif isinstance(queue, str) and queue.startswith("gpu.") and not queue.endswith(LANE_SUFFIXES):
                by_queue.setdefault(queue, []).append((tag, raw, entry))
        stalled = []
        if dispatch:
            now = time.time()
            held_since = self.broker.zmscore(UNACKED_INDEX_KEY, [tag for tag, _raw, _entry in dispatch])
            for (tag, raw, entry), since in zip(dispatch, held_since):
                if since is not None and now - max(since, _eta(entry[0])) > self.stall_seconds:
                    stalled.append((tag, raw, entry))
        return by_queue, stalled

    # -- dispatch messages of a dead dispatcher ----------------------------------------------

    def _rescue_stalled_dispatches(self, stalled: list[Entry]) -> None:
        """Put back the ``dispatch`` messages a dead dispatcher worker held; drop those it already forwarded.

        ``dispatch_inference`` takes milliseconds, so a ``dispatch`` message
        held unacknowledged for more than ``GPU_DISPATCH_DISPATCH_STALL_SECONDS``
        past its ETA (a no-GPU retry waits for its ETA in the worker, unacked) is
        either held by a stuck worker or by a dead one.  Every node is asked
        which of these task ids it holds (one ``query_task`` broadcast); an id
        no answering node holds is its dead dispatcher's:

        - if its ``run_inference`` is already on its way (the dead dispatcher
          published it, then died before its ack: the id sits in a GPU queue,
          in a GPU worker's unacknowledged messages, or has a state in the
          result backend beyond ``PENDING``/``RETRY``), the message is dropped —
          putting it back would run the request twice;
        - otherwise it is put back at the head of ``dispatch``, marked
          redelivered, for any dispatcher to take.

        Each move is the compare-and-take script of the GPU rescue, so two
        dispatchers sweeping at once move a message once.  Not covered: a live
        dispatcher that holds a message this long *and* does not answer the
        broadcast within :data:`PING_TIMEOUT`; if it later runs it, the request
        runs twice with one task id (at-least-once, as after kombu's own
        visibility-timeout restore).
        """
        ids = {tag: _payload_id(entry[0]) for tag, _raw, entry in stalled}
        wanted = sorted({i for i in ids.values() if i})
        replies = (self.app.control.inspect(timeout=PING_TIMEOUT).query_task(*wanted) or {}) if wanted else {}
        held = {task_id for answer in replies.values() for task_id in (answer or {})}
        orphaned = [(tag, raw, entry) for tag, raw, entry in stalled if ids[tag] and ids[tag] not in held]
        if not orphaned:
            return
        forwarded = self._forwarded({ids[tag] for tag, _raw, _entry in orphaned})
        for tag, raw, (payload, _exchange, _routing_key) in orphaned:
            task_id = ids[tag]
            done = task_id in forwarded
            if not done:
                _mark_redelivered(payload)
            if self._restore(keys=[UNACKED_KEY, UNACKED_INDEX_KEY, DISPATCH_QUEUE],
                             args=[tag, raw, "" if done else json.dumps(payload)]):
                metrics.RESCUED.labels("dispatch").inc()
                log.warning("task %s: its dispatcher worker is gone (held for over %g s, no node holds it); %s",
                            task_id, self.stall_seconds, "its run_inference was already sent, dropped" if done
                            else "put back on the dispatch queue")

    def _forwarded(self, task_ids: set[str]) -> set[str]:
        """Those of ``task_ids`` whose ``run_inference`` is already on its way.

        Looked for in the order a message moves — GPU queue lists, then GPU
        workers' unacknowledged messages, then the result backend (STARTED,
        written before the GPU worker runs it, or a final state) — so one
        moving on meanwhile is still seen."""
        found: set[str] = set()
        for key in self.broker.scan_iter(match=GPU_QUEUE_PATTERN, _type="LIST"):
            if key.decode().endswith(LANE_SUFFIXES):
                continue
            for raw in self.broker.lrange(key, 0, -1):
                task_id = _task_id(raw)
                if task_id in task_ids:
                    found.add(task_id)
        for raw in self.broker.hvals(UNACKED_KEY):
            try:
                payload, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if (routing_key or exchange) != DISPATCH_QUEUE and _payload_id(payload) in task_ids:
                found.add(_payload_id(payload))
        for task_id in task_ids - found:
            if self.app.AsyncResult(task_id).state not in (states.PENDING, states.RETRY):
                found.add(task_id)
        return found

    def _restore_unacked(self, queue: str, entries: list[tuple[bytes, bytes, list]]) -> None:
        worker = self.view.last_worker(queue)
        if worker is None:
            if queue not in self._stuck_logged:
                self._stuck_logged.add(queue)
                log.warning("%d unacknowledged messages of orphaned queue %s: its worker is unknown to this "
                            "dispatcher, so they return after the broker's visibility timeout", len(entries), queue)
            return
        if self.app.control.ping([worker], timeout=PING_TIMEOUT):
            log.info("queue %s: worker %s left Nacos but still answers (finishing its requests); "
                     "its %d unacknowledged messages are left to it", queue, worker, len(entries))
            return
        for tag, raw, (payload, _exchange, _routing_key) in entries:
            task_id = _payload_id(payload)
            done = bool(task_id) and self.app.AsyncResult(task_id).state == states.SUCCESS
            if not done:
                _mark_redelivered(payload)
            if self._restore(keys=[UNACKED_KEY, UNACKED_INDEX_KEY, queue],
                             args=[tag, raw, "" if done else json.dumps(payload)]):
                metrics.RESCUED.labels("unacked").inc()
                log.warning("task %s: worker %s of queue %s is dead; %s", task_id, worker, queue,
                            "it had already succeeded, dropped" if done else "put back for re-dispatch")

    def _drain(self, queue: str) -> int:
        moved = 0
        started = time.monotonic()
        while True:
            raw = self.broker.lindex(queue, -1)
            if raw is None:
                break
            payload, request, task_id = _read(raw, self.app.conf.request_memory_mb)
            try:
                decision = self.view.choose(request, task_id, path="rescue")
            except NoEligibleGpu as exc:
                log.warning("orphaned queue %s holds %d messages; none can move yet: %s", queue,
                            self.broker.llen(queue), exc)
                break
            target = decision.chosen.state.queue
            if target == queue:  # the GPU came back between the list and now
                break
            if payload is not None:
                payload.setdefault("properties", {})["delivery_info"] = {"exchange": "", "routing_key": target}
            if self._move(keys=[queue, target], args=[raw, json.dumps(payload) if payload is not None else raw]):
                moved += 1
                metrics.RESCUED.labels("queued").inc()
                log.info("task %s: moved from orphaned queue %s to %s", task_id, queue, target)
        if moved:
            log.warning("orphaned queue %s: %d messages re-dispatched in %.3f s", queue, moved,
                        time.monotonic() - started)
        return moved


def _base(key: str) -> str:
    return key.split(PRIORITY_SEPARATOR, 1)[0]


def _mark_redelivered(payload: dict) -> None:
    # As kombu marks a message it restores, so the worker knows it may have run before.
    (payload.get("headers") or {})["redelivered"] = True
    ((payload.get("properties") or {}).get("delivery_info") or {})["redelivered"] = True


def _eta(payload: dict) -> float:
    """The message's ETA (a no-GPU retry's) as a Unix time; 0 when it has none."""
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


def _payload_id(payload: dict) -> str:
    """The task id in a kombu message's payload; ``""`` when it has none."""
    return str((payload.get("headers") or {}).get("id") or "")


def _task_id(raw: bytes) -> str | None:
    try:
        return _payload_id(json.loads(raw))
    except (ValueError, TypeError, AttributeError):
        return None


def _read(raw: bytes, default_memory_mb: float) -> tuple[dict | None, Request, str]:
    """A kombu message's payload, the scoring request of the run_inference it carries, and its task id.

    A message this code cannot read is still moved, unchanged, to a GPU that
    takes any request: the worker that receives it reports the problem.
    """
    try:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
        task_id = _payload_id(payload) or "?"
        if headers.get("task") != INFERENCE_TASK:
            return payload, Request(), task_id
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return payload, scoring_request(kwargs, default_memory_mb), task_id
    except (ValueError, TypeError, KeyError, ScoringError):
        return None, Request(), "?"
