"""The tasks a GPU worker runs: ``run_inference`` and ``refresh_gpu_metadata``."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from celery import Task
from celery.exceptions import Ignore
from celery.utils.time import maybe_iso8601

from gpu_dispatch.celery import app
from gpu_dispatch.contract import ATTEMPT_HEADER, INFERENCE_TASK, REFRESH_TASK
from gpu_dispatch.registry import RegistryError
from workers import runtime
from workers.backends import DEFAULT_MAX_TOKENS

log = logging.getLogger(__name__)


class ModelMismatch(ValueError):
    """The request names a model this GPU worker does not serve."""


class RefreshTask(Task):
    """Retries go to this worker's own control queue: a retry sent back to the fan-out
    exchange would refresh every GPU worker — or, with none subscribed, be lost.  A retry
    that would run after the refresh expires is not sent: the next scheduled refresh is due."""

    def retry(self, *args: Any, **kwargs: Any):
        expires = self.request.expires
        expires = maybe_iso8601(expires) if isinstance(expires, str) else expires
        if expires is not None and self.app.now() + timedelta(seconds=kwargs.get("countdown") or 0) >= expires:
            log.info("refresh %s dropped: a retry would run after it expires (%s); the next refresh is due",
                     self.request.id, kwargs.get("exc"))
            raise Ignore()
        kwargs.setdefault("queue", runtime.current().control_queue)
        return super().retry(*args, **kwargs)


@app.task(name=REFRESH_TASK, base=RefreshTask, bind=True, ignore_result=True, acks_late=False,
          autoretry_for=(RegistryError,), retry_backoff=0.5, retry_backoff_max=app.conf.refresh_interval,
          retry_jitter=True, max_retries=8)
def refresh_gpu_metadata(self: Task) -> None:
    """Read this worker's GPU and put the reading into its Nacos instance (registering it if needed).

    Runs on every GPU worker (fan-out), in the worker's refresh lane, never in
    an inference slot.  Nacos errors are retried with exponential backoff and
    jitter (at most ``max_retries`` times, each wait at most one refresh
    interval); a refresh that would run after its ``expires`` is dropped.
    """
    runtime.current().publish()


class InferenceTask(Task):
    """``run_inference``'s class: settles the request's ledger record once its outcome is stored."""

    def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        runtime.current().settled(task_id, status, retval, einfo.traceback if einfo is not None else None)


@app.task(name=INFERENCE_TASK, base=InferenceTask, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_inference(self: Task, prompt: str, **options: Any) -> dict:
    """Run one inference on this worker's GPU and return the text, the GPU that served it and timings.

    Recognised options: ``max_tokens`` (default 32), ``memory_mb`` (memory the
    request holds while running; default ``GPU_DISPATCH_REQUEST_MEMORY_MB``),
    ``model`` (must be the model this worker serves).  Other options go to
    the backend unchanged.

    The ledger decides whether this delivery runs and which outcome is the
    request's (:meth:`workers.runtime.GpuWorker.serve`); acknowledged late,
    so a message is never lost while its worker lives.
    """
    worker = runtime.current()
    model = options.pop("model", None)
    max_tokens = int(options.pop("max_tokens", None) or DEFAULT_MAX_TOKENS)
    memory_mb = options.pop("memory_mb", None)
    memory_mb = worker.conf.request_memory_mb if memory_mb is None else memory_mb
    attempt = int(getattr(self.request, ATTEMPT_HEADER, None) or 1)
    with worker.serve(self.request.id, attempt, memory_mb):
        if model and model != worker.conf.model_name:
            raise ModelMismatch(f"this GPU worker ({worker.queue}) serves {worker.conf.model_name!r}, "
                                f"not {model!r}")
        started = time.time()
        text, usage = worker.backend.complete(prompt, max_tokens=max_tokens, **options)
        finished = time.time()
    return {
        "text": text,
        "model": worker.conf.model_name,
        "usage": usage,
        "gpu": {"ip": worker.ip, "port": worker.port, "gpu_index": worker.gpu_index, "queue": worker.queue,
                "worker": worker.hostname, "source": worker.gpu.source, "incarnation": worker.incarnation},
        "timings": {"started_at": started, "finished_at": finished,
                    "run_ms": round((finished - started) * 1000, 3)},
        "task_id": self.request.id,
        "delivery": {"attempt": attempt,
                     "redelivered": bool((self.request.delivery_info or {}).get("redelivered"))},
    }
