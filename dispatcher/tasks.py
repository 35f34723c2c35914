"""``dispatch_inference``: the call apps make, and the dispatcher worker that serves its central path.

One request, from ``dispatch_inference.delay(prompt, **options)`` to the result:

1. :meth:`DispatchTask.apply_async` (``delay`` calls it) checks the prompt and
   options in the caller's process (:mod:`dispatcher.request`); a bad call
   raises :class:`~dispatcher.errors.InvalidRequest` and nothing is queued.
2. **Producer path** (``GPU_DISPATCH_DISPATCH_MODE=producer``, the default):
   the caller's own :class:`~dispatcher.view.RegistryView` picks the GPU and
   ``run_inference`` is published straight to that GPU's queue with the task
   id the caller holds — one hop, as cheap as a plain ``apply_async``.  When
   the caller's view has not heard from Nacos yet, or no GPU is eligible now,
   the request takes the central path instead: waiting for a GPU is the
   dispatcher worker's job, and the request then waits in Redis, not in the
   caller's memory.
3. **Central path** (``GPU_DISPATCH_DISPATCH_MODE=central``, and the
   producer path's hand-over): ``dispatch_inference`` is queued on
   ``dispatch``; a dispatcher worker (``celery -A gpu_dispatch worker -Q
   dispatch -P threads``) picks the GPU and forwards ``run_inference`` there
   under the same task id, storing nothing itself
   (:meth:`DispatchTask.forward`; a request with callbacks, chains or chords
   goes through :meth:`celery.app.task.Task.replace` instead), so the
   caller's ``AsyncResult`` resolves to ``run_inference``'s result.  No eligible GPU: Celery's retry
   with exponential backoff, for at most ``GPU_DISPATCH_NO_GPU_WAIT``
   seconds; then the result fails with
   :class:`~dispatcher.errors.NoGpuAvailable` listing why each GPU was dropped.

Either way the caller's ``AsyncResult.get()`` is the inference result itself.
A dispatcher worker also runs the orphan rescue (:mod:`dispatcher.rescue`:
orphaned GPU queues, and ``dispatch`` messages a dead dispatcher worker held)
and serves the Prometheus metrics (:mod:`dispatcher.metrics`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task
from celery.worker.request import Request
from celery.signals import worker_ready, worker_shutdown
from celery.utils import uuid
from celery.utils.time import get_exponential_backoff_interval
from prometheus_client import start_http_server

from dispatcher import metrics, view as views
from dispatcher.errors import NoGpuAvailable
from dispatcher.request import check, scoring_request
from gpu_dispatch.celery import app
from gpu_dispatch.contract import DISPATCH_QUEUE, DISPATCH_TASK, INFERENCE_TASK
from scoring import NoEligibleGpu

log = logging.getLogger(__name__)

#: apply_async options that mean Celery's own canvas machinery is involved (callbacks, chains,
#: chords, retries): those calls take the central path, where Task.replace carries them over.
_CANVAS_OPTIONS = ("link", "link_error", "chain", "chord", "group_id", "retries")
#: Routing options the dispatcher decides itself.
_ROUTING_OPTIONS = ("queue", "exchange", "routing_key")


def _split(args: tuple | list | None, kwargs: dict | None) -> tuple[str, dict[str, Any]]:
    kwargs = dict(kwargs or {})
    prompt = args[0] if args else kwargs.pop("prompt")
    # Unset options are left out: run_inference applies its own defaults.
    return prompt, {k: v for k, v in kwargs.items() if v is not None}


#: Start of what ``dispatch_inference`` returns when it has forwarded the request (never stored).
FORWARDED = "forwarded to"


class DispatchRequest(Request):
    """The dispatcher worker's request of ``dispatch_inference``: no ``task-succeeded`` event for a forward.

    A forwarded request has not succeeded: ``run_inference``, under the same
    task id, is just starting.  Its events (``task-sent`` from the dispatcher,
    then ``task-received``/``-started``/``-succeeded`` from the GPU worker)
    tell Flower the rest, as after ``Task.replace``.
    """

    def send_event(self, type: str, **fields: Any) -> None:
        if type == "task-succeeded" and FORWARDED in str(fields.get("result", ""))[:len(FORWARDED) + 2]:
            return
        super().send_event(type, **fields)


class DispatchTask(Task):
    """``dispatch_inference``'s class: checks every call, and routes it on the producer path."""

    Request = DispatchRequest

    def apply_async(self, args=None, kwargs=None, task_id=None, producer=None, link=None, link_error=None,
                    shadow=None, **options):
        conf = self.app.conf
        request = check(args, kwargs, conf.max_prompt_bytes, conf.request_memory_mb)
        if link is not None or link_error is not None or any(options.get(o) is not None for o in _CANVAS_OPTIONS):
            return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow, **options)
        if conf.dispatch_mode == "producer":
            result = self._send_to_gpu(args, kwargs, request, task_id, producer, options)
            if result is not None:
                return result
        return super().apply_async(args, kwargs, task_id, producer, link, link_error, shadow,
                                   **{**options, "queue": DISPATCH_QUEUE})

    def _send_to_gpu(self, args, kwargs, request, task_id, producer, options):
        """Publish run_inference to the GPU this process's view picks; ``None`` to hand over to the central path."""
        view = views.current_view(self.app)
        if view is None:
            metrics.HANDED_TO_CENTRAL.labels("no view").inc()
            log.info("no view of the GPUs yet (Nacos has not answered): request goes to the dispatch queue")
            return None
        prompt, inference_options = _split(args, kwargs)
        task_id = task_id or uuid()
        try:
            decision = view.choose(request, task_id, path="producer")
        except NoEligibleGpu as exc:
            metrics.HANDED_TO_CENTRAL.labels("no eligible GPU").inc()
            log.info("task %s: %s; it waits for a GPU on the dispatch queue", task_id, exc)
            return None
        for name in _ROUTING_OPTIONS:
            options.pop(name, None)
        return self.app.send_task(INFERENCE_TASK, args=(prompt,), kwargs=inference_options, task_id=task_id,
                                  producer=producer, queue=decision.chosen.state.queue, **options)

    def forward(self, prompt: str, inference_options: dict[str, Any], queue: str) -> str:
        """Hand the request on to ``queue`` as ``run_inference`` with this task's id.

        What :meth:`~celery.app.task.Task.replace` does underneath, minus its
        canvas bookkeeping and its exception (only requests without callbacks,
        chains or chords come here): publish ``run_inference`` under the
        caller's task id, then end this task *storing nothing* (the request's
        ``ignore_result`` is set), so the caller's ``AsyncResult`` resolves to
        ``run_inference``'s result.  ``Task.replace`` ends with
        :class:`~celery.exceptions.Ignore`, whose two tracebacks Celery formats
        on every call; returning costs nothing.  The ``task-succeeded`` event
        this return would send is dropped by :class:`DispatchRequest` (it would
        tell Flower the request had finished).  The ``dispatch`` message is
        acked (late ack) only after this returns, so after the publish.
        """
        request = self.request
        self.app.send_task(INFERENCE_TASK, args=(prompt,), kwargs=inference_options, task_id=request.id,
                           queue=queue, parent_id=request.parent_id, root_id=request.root_id or request.id)
        request.ignore_result = True  # read when the trace stores the outcome: nothing is stored
        return f"{FORWARDED} {queue}"

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
    ``memory_mb`` (estimated GPU memory, used to filter GPUs it would not fit
    on); others go to the backend unchanged.  See the module docstring for
    the two paths and what happens when no GPU is eligible.
    """
    inference_options = {k: v for k, v in options.items() if v is not None}
    view = views.current_view(self.app)
    request = scoring_request(inference_options, self.app.conf.request_memory_mb)
    try:
        if view is None:
            raise NoEligibleGpu({}, f"{request.describe()}; Nacos at {self.app.conf.nacos_server_addresses} "
                                    "has not answered this dispatcher yet")
        decision = view.choose(request, self.request.id, path="central")
    except NoEligibleGpu as exc:
        return self.wait_for_gpu(exc)
    queue = decision.chosen.state.queue
    if _uses_canvas(self.request):
        return self.replace(self.app.signature(INFERENCE_TASK, args=(prompt,), kwargs=inference_options,
                                               queue=queue))
    return self.forward(prompt, inference_options, queue)


# -- the dispatcher worker: a worker that consumes the dispatch queue ---------------------

_rescue = None


@worker_ready.connect
def _start_dispatcher(sender: Any = None, **_: Any) -> None:
    if DISPATCH_QUEUE not in sender.app.amqp.queues.consume_from:
        return
    global _rescue
    from dispatcher.rescue import OrphanRescue

    conf = sender.app.conf
    view = views.process_view(sender.app)  # started now, not at the first request
    if conf.metrics_port:
        try:
            start_http_server(conf.metrics_port)
            log.info("dispatcher metrics on http://0.0.0.0:%d/metrics", conf.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on port %d (GPU_DISPATCH_METRICS_PORT): %s", conf.metrics_port, exc)
    _rescue = OrphanRescue(sender.app, view).start()
    log.info("dispatcher ready: profile %s, orphan rescue every %g s", conf.dispatch_profile, conf.rescue_interval)


@worker_shutdown.connect
def _stop_dispatcher(**_: Any) -> None:
    global _rescue
    if _rescue is not None:
        _rescue.stop()
        _rescue = None
    views.close_views()
