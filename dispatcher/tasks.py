"""``dispatch_inference``: the call apps make, its two paths to a GPU, and the dispatcher worker's task.

:func:`hand_on` is the one way a request reaches a GPU the first time: pick,
record in the ledger, publish.  ``docs/dispatcher.md`` ("The two paths").
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Any

import redis
from celery import Task
from celery.utils import uuid
from celery.utils.time import get_exponential_backoff_interval
from celery.worker.request import Request as WorkerRequest

from dispatcher import metrics, view as views
from dispatcher.errors import InvalidRequest, NoGpuAvailable
from dispatcher.request import check, scoring_request
from gpu_dispatch.celery import app
from gpu_dispatch.contract import ATTEMPT_HEADER, DISPATCH_QUEUE, DISPATCH_TASK, INFERENCE_TASK
from gpu_dispatch.ledger import PREFIX
from scoring import NoEligibleGpu, Request

log = logging.getLogger(__name__)

#: Broker keys of prefix affinity: hash of the prefix or affinity_key → the GPU queue that served it last.
AFFINITY_PREFIX = PREFIX + "affinity:"
#: apply_async options that mean Celery's own canvas machinery is involved (callbacks, chains,
#: chords, retries): those calls take the central path, where Task.replace carries them over.
_CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id", "retries")


def hand_on(view: views.RegistryView, task_id: str, prompt: str, options: dict[str, Any], request: Request, *,
            path: str, parent_id: str | None = None, root_id: str | None = None) -> str | None:
    """Pick the GPU for a request, record it in the ledger, publish ``run_inference`` there.

    The one way a request reaches a GPU the first time (producer and central
    path).  Returns the queue, or ``None`` when the ledger already holds this
    task id (a second ``dispatch`` delivery of a request a dead dispatcher had
    already handed on: it is not sent again).  A request with prefix affinity
    prefers the GPU that served its prefix last (``docs/dispatcher.md``).

    :raises NoEligibleGpu: no GPU can take it now.
    """
    affinity = affinity_of(prompt, options, app.conf.affinity_prefix_chars)
    prefer = _wait_out_outage(lambda: view.ledger.client.get(affinity)) if affinity else None
    decision = view.choose(request, task_id, path=path, prefer=prefer.decode() if prefer else None)
    queue = decision.chosen.state.queue
    message = {"args": [prompt], "kwargs": options, "parent_id": parent_id, "root_id": root_id}

    remember = (affinity, app.conf.affinity_ttl) if affinity else None
    replicas = app.conf.replica_wait

    def record() -> bool:
        if not replicas:
            return view.ledger.dispatch(task_id, queue, request.memory_mb, message, path, affinity=remember)
        recorded, reached = view.ledger.dispatch_replicated(task_id, queue, request.memory_mb, message, path,
                                                            remember, replicas, app.conf.replica_wait_ms)
        if reached < replicas:  # the record on a replica before the request counts as accepted
            log.warning("task %s: its ledger record reached %d of %d replicas within %d ms "
                        "(GPU_DISPATCH_REPLICA_WAIT); accepted anyway: a failover now could lose it",
                        task_id, reached, replicas, app.conf.replica_wait_ms)
        return recorded

    if not _wait_out_outage(record):
        log.warning("task %s is already in the ledger: handed on before (by a dispatcher that died before "
                    "acknowledging); not sent again", task_id)
        return None
    view.sent(queue, request.memory_mb)
    app.send_task(INFERENCE_TASK, args=(prompt,), kwargs=options, task_id=task_id, queue=queue,
                  parent_id=parent_id, root_id=root_id or task_id, headers={ATTEMPT_HEADER: 1})
    return queue


def affinity_of(prompt: str, options: dict[str, Any], prefix_chars: int) -> str | None:
    """The broker key remembering the GPU of this request's prefix, or ``None`` without affinity.

    ``affinity_key=`` (a session, a conversation, a system prompt's name) when given; else, with
    ``GPU_DISPATCH_AFFINITY_PREFIX_CHARS`` above 0, the first that many characters of the system
    message (chat) or of the prompt.
    """
    key = options.get("affinity_key")
    if key is None and prefix_chars:
        messages = options.get("messages")
        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            system = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"), messages[0])
            key = "messages:" + str(system.get("content", ""))[:prefix_chars]
        else:
            key = "prompt:" + prompt[:prefix_chars]
    if key is None:
        return None
    return AFFINITY_PREFIX + hashlib.sha256(str(key).encode("utf-8", "surrogatepass")).hexdigest()[:24]


#: Seconds a caller's delay() waits for an unreachable broker before it raises (as Celery's own
#: publish does with celeryconfig.task_publish_retry_policy).
PUBLISH_OUTAGE_S = 10.0


def _wait_out_outage(call):
    """``call()``, retried while the broker's Redis does not answer, for :data:`PUBLISH_OUTAGE_S`."""
    deadline = time.monotonic() + PUBLISH_OUTAGE_S
    wait = 0.1
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + wait > deadline:
                raise
            time.sleep(wait)
            wait = min(wait * 2, 1.0)


def _split(args: tuple | list | None, kwargs: dict | None) -> tuple[str, dict[str, Any]]:
    kwargs = dict(kwargs or {})
    prompt = args[0] if args else kwargs.pop("prompt")
    # Unset options are left out: run_inference applies its own defaults.
    return prompt, {k: v for k, v in kwargs.items() if v is not None}


#: Task ids this dispatcher worker has handed on and whose ``task-succeeded`` event it drops.
_handed_on: set[str] = set()
_handed_on_lock = threading.Lock()


class DispatchRequest(WorkerRequest):
    """The dispatcher worker's request of ``dispatch_inference``: no ``task-succeeded`` event for a hand-on.

    A request handed on has not succeeded: ``run_inference``, under the same
    task id, is just starting; its own events tell Flower the rest.
    """

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded":
            with _handed_on_lock:
                if self.id in _handed_on:
                    _handed_on.discard(self.id)
                    return
        super().send_event(type, **fields)


class DispatchTask(Task):
    """``dispatch_inference``'s class: checks every call, and routes it on the producer path."""

    Request = DispatchRequest

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:  # dispatch_inference(...) in an app: what delay().get() does
            return self.apply_async(args, kwargs).get(timeout=self.app.conf.max_inference_seconds
                                                      + self.app.conf.no_gpu_wait)
        return super().__call__(*args, **kwargs)

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None, link_error=None,
                    shadow=None, **options):
        conf = self.app.conf
        request = check(args, kwargs, options, conf)
        if link is not None or link_error is not None or any(options.get(o) is not None for o in _CANVAS_OPTIONS):
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                       **{**options, "queue": DISPATCH_QUEUE})
        if conf.dispatch_mode == "producer":
            task_id = task_id or uuid()
            if self._send_to_gpu(args, kwargs, request, task_id):
                return self.AsyncResult(task_id)
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                   **{**options, "queue": DISPATCH_QUEUE})

    def _send_to_gpu(self, args, kwargs, request: Request, task_id: str) -> bool:
        """Hand the request on from this process's view; ``False`` to hand over to the central path."""
        view = views.current_view(self.app)
        if view is None:
            metrics.HANDED_TO_CENTRAL.labels("no view").inc()
            log.info("no view of the GPUs yet (Nacos has not answered): request goes to the dispatch queue")
            return False
        prompt, inference_options = _split(args, kwargs)
        try:
            return hand_on(view, task_id, prompt, inference_options, request, path="producer") is not None \
                or _already_known(task_id)
        except NoEligibleGpu as exc:
            metrics.HANDED_TO_CENTRAL.labels("no eligible GPU").inc()
            log.info("task %s: %s; it waits for a GPU on the dispatch queue", task_id, exc)
            return False

    def wait_for_gpu(self, exc: NoEligibleGpu) -> None:
        """Retry later with exponential backoff, or fail with :class:`NoGpuAvailable` once the wait is spent."""
        conf = self.app.conf
        retries = self.request.retries
        # The last wait is cut short to end the bound exactly, so the sum never exceeds it.
        waited = min(waited_after(retries, conf.no_gpu_backoff, conf.no_gpu_backoff_max), conf.no_gpu_wait)
        if waited >= conf.no_gpu_wait:
            metrics.NO_GPU_FAILURES.inc()
            log.warning("task %s: no GPU for %.1f s (%d retries), failing: %s", self.request.id, waited,
                        retries, exc)
            raise NoGpuAvailable(f"{exc} (waited {waited:.1f} s over {retries} retries; "
                                 "GPU_DISPATCH_NO_GPU_WAIT)", exc.reasons)
        countdown = min(backoff(retries, conf.no_gpu_backoff, conf.no_gpu_backoff_max), conf.no_gpu_wait - waited)
        metrics.RETRIES.inc()
        log.info("task %s: %s; retry %d in %.2f s", self.request.id, exc, retries + 1, countdown)
        raise self.retry(countdown=countdown)


def _already_known(task_id: str) -> bool:
    raise InvalidRequest(f"task id {task_id!r} is already in use by another request; pass a new task_id "
                         "(or none: one is made for you)")


def _uses_canvas(request: Any) -> bool:
    """Whether the running request carries Celery canvas bookkeeping that only Task.replace carries over."""
    return bool(request.is_eager or request.callbacks or request.errbacks or request.chain or request.chord
                or request.group)


def backoff(retries: int, first: float, longest: float) -> float:
    """Seconds before retry number ``retries + 1``: ``first`` doubled per retry, at most ``longest``."""
    return get_exponential_backoff_interval(first, min(retries, 32), longest)


def waited_after(retries: int, first: float, longest: float) -> float:
    """Seconds a request has waited after ``retries`` retries (the sum of their backoffs)."""
    return sum(backoff(n, first, longest) for n in range(retries))


@app.task(name=DISPATCH_TASK, base=DispatchTask, bind=True, acks_late=True, reject_on_worker_lost=True,
          max_retries=None, track_started=False)  # retries bounded by time (GPU_DISPATCH_NO_GPU_WAIT)
def dispatch_inference(self: DispatchTask, prompt: str, **options: Any) -> Any:
    """Run ``prompt`` on the GPU the scoring picks; the result is ``run_inference``'s.

    Options: ``model`` (the model needed; ``None``: any), ``max_tokens``,
    ``memory_mb`` (estimated GPU memory); others go to the backend unchanged.
    See the module docstring for the two paths and what happens when no GPU
    is eligible.
    """
    inference_options = {k: v for k, v in options.items() if v is not None}
    view = views.current_view(self.app)
    request = scoring_request(inference_options, self.app.conf.request_memory_mb)
    context = self.request
    try:
        if view is None:
            raise NoEligibleGpu({}, f"{request.describe()}; Nacos at {self.app.conf.nacos_server_addresses} "
                                    "has not answered this dispatcher yet")
        if _uses_canvas(context):
            decision = view.choose(request, context.id, path="central")
            queue = decision.chosen.state.queue
            message = {"args": [prompt], "kwargs": inference_options, "parent_id": context.parent_id,
                       "root_id": context.root_id}
            if view.ledger.dispatch(context.id, queue, request.memory_mb, message, "central"):
                view.sent(queue, request.memory_mb)
            return self.replace(self.app.signature(INFERENCE_TASK, args=(prompt,), kwargs=inference_options,
                                                   queue=queue, headers={ATTEMPT_HEADER: 1}))
        hand_on(view, context.id, prompt, inference_options, request, path="central",
                parent_id=context.parent_id, root_id=context.root_id)
    except NoEligibleGpu as exc:
        return self.wait_for_gpu(exc)
    # Handed on: store nothing under this task id (run_inference's result will be stored there) and
    # send no task-succeeded event (it has not succeeded: DispatchRequest).
    context.ignore_result = True
    with _handed_on_lock:
        _handed_on.add(context.id)
    return None
