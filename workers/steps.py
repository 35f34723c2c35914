"""Celery bootsteps that turn a Celery worker into a GPU worker: ``celery -A gpu_dispatch worker --gpu N``.

:class:`GpuWorkerStep` builds the process's :class:`~workers.runtime.GpuWorker`,
consumes its GPU's queue, refuses pools unsafe for CUDA and keeps its lease;
:class:`RefreshLane` runs ``refresh_gpu_metadata`` on a channel and a thread of
its own.  ``docs/architecture.md`` ("Keeping metadata fresh").
"""

from __future__ import annotations

import json
import logging
import os
import signal

from celery import bootsteps
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.exceptions import ImproperlyConfigured
from celery.signals import worker_shutdown
from celery.worker.request import Request
from kombu import Consumer, Exchange, Queue
from kombu.common import ignore_errors

from gpu_dispatch.contract import REFRESH_EXCHANGE, REFRESH_TASK
import workers.control  # noqa: F401  (registers the gpu_set_tenants control command)
from gpu_dispatch.ownership import QueueTaken
from gpu_dispatch.transport import dead_letter
from workers import runtime

log = logging.getLogger(__name__)

class GpuWorkerStep(bootsteps.StartStopStep):
    """Builds the GPU worker of this process when ``--gpu`` is given; otherwise does nothing.

    Starting it claims the GPU's queue in the broker and keeps the worker's
    lease (:meth:`workers.runtime.GpuWorker.start_lease`); the lease is given
    up when the worker has shut down (``worker_shutdown``), so what it runs
    stays its own until then.
    """

    name = "gpu-dispatch GPU worker"

    def __init__(self, worker, gpu: int | None = None, queues: str | None = None, **options) -> None:
        super().__init__(worker, **options)
        self.enabled = gpu is not None
        if not self.enabled:
            return
        pool = worker.pool_cls if isinstance(worker.pool_cls, str) else worker.pool_cls.__module__
        if not any(name in str(pool) for name in ("thread", "solo")):
            raise ImproperlyConfigured(
                f"a GPU worker must run with --pool threads (or solo), not {pool}: a forked pool would copy "
                "the CUDA context and the Nacos connection into its children, which neither survives")
        # Pin the process to its card before any backend can initialise CUDA (NVML's indices are
        # physical, so reading the GPU is unaffected); an operator's own setting wins.
        if not os.environ.get("CUDA_VISIBLE_DEVICES"):
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
        try:
            gpu_worker = runtime.GpuWorker(worker.app.conf, gpu, worker.hostname, worker.concurrency)
        except (ValueError, RuntimeError) as exc:  # a bad --gpu, NVML or backend setting: say which, and stop
            raise ImproperlyConfigured(str(exc)) from None
        runtime.install(gpu_worker)
        if queues:  # the operator named queues with -Q: consume ours as well
            worker.app.amqp.queues.select_add(gpu_worker.queue)
        else:  # only ours, not Celery's default queue
            worker.app.amqp.queues.select([gpu_worker.queue])
        log.info("GPU %s: queue %s, %s GPU, backend %s, %s inference slots, incarnation %s", gpu, gpu_worker.queue,
                 gpu_worker.gpu.source, gpu_worker.backend.name, worker.concurrency, gpu_worker.incarnation)

    def start(self, worker) -> None:
        gpu_worker = runtime.current()
        try:
            gpu_worker.start_lease()
        except QueueTaken as exc:
            raise ImproperlyConfigured(str(exc)) from None
        # A newer incarnation under this node name took the queue (this one was hung or is a
        # duplicate): shut down warm, finishing what runs; the ledger answers each request once.
        gpu_worker.on_fenced = lambda why: os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, worker) -> None:
        pass


@worker_shutdown.connect
def _close_gpu_worker(**_) -> None:
    try:
        gpu_worker = runtime.current()
    except RuntimeError:
        return
    gpu_worker.close()


class RefreshLane(bootsteps.ConsumerStep):
    """Consumes refresh messages on a channel and a one-thread pool of their own (see module doc)."""

    name = "gpu-dispatch refresh lane"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c, gpu: int | None = None, **options) -> None:
        super().__init__(c, **options)
        self.enabled = gpu is not None
        self.pool: ThreadTaskPool | None = None

    def get_consumers(self, channel):
        worker = runtime.current()
        # Bound with the routing key beat publishes with: kombu's Redis transport matches
        # fan-out subscriptions on exchange *and* routing key.
        fanout = Queue(f"{worker.queue}.refresh", Exchange(REFRESH_EXCHANGE, type="fanout", durable=False),
                       routing_key=REFRESH_EXCHANGE, auto_delete=True, durable=False)
        direct = Queue(worker.control_queue, durable=False)
        return [Consumer(channel, queues=[fanout, direct], on_message=self._on_message, accept=["json"],
                         no_ack=True)]

    def start(self, c) -> None:
        # Called again after every broker reconnect, on the same step: one pool for the worker's life.
        self.consumer = c
        if self.pool is None:
            self.pool = ThreadTaskPool(limit=1)
            self.pool.start()
        super().start(c)
        worker = runtime.current()
        try:  # first registration: through the task, so an unreachable Nacos is retried with its backoff
            c.app.tasks[REFRESH_TASK].apply_async(queue=worker.control_queue, expires=None)
        except Exception as exc:  # a broker blip now must not end the worker: beat's next refresh registers it
            log.warning("could not send the first registration (%s); the next refresh from beat registers", exc)

    def stop(self, c) -> None:
        # Also called when the broker connection is lost and the consumer restarts (c.connection is
        # None then): never raises, keeps the pool.  Only a shutdown takes the GPU out of Nacos.
        if c.controller is not None and c.controller.blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE):
            runtime.current().withdraw()  # first, so no new work is sent while running requests finish
        self._close_channels(c, cancel=True)

    def shutdown(self, c) -> None:
        # Once, at worker exit (Celery propagates errors from here: never raise).
        self._close_channels(c, cancel=False)
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.stop()

    def _close_channels(self, c, cancel: bool) -> None:
        consumers, self.consumers = self.consumers or [], None
        for consumer in consumers:
            if cancel:
                ignore_errors(c, consumer.cancel)  # c, not c.connection: None after a connection loss
            try:
                consumer.channel.close()
            except Exception as exc:  # the broker is gone: nothing to close
                log.debug("refresh lane: closing its channel: %r", exc)

    def _on_message(self, message) -> None:
        c = self.consumer
        try:
            task_name = message.headers.get("task", "")
        except Exception:  # not even headers: an injected message
            task_name = None
        task = c.app.tasks.get(task_name or "")
        if task is None or task.name != REFRESH_TASK:
            self._set_aside(message, f"the refresh lane takes only {REFRESH_TASK}, not {task_name!r}")
            return
        try:
            request = Request(message, app=c.app, hostname=c.hostname, eventer=c.event_dispatcher, task=task,
                              connection_errors=c.connection_errors)
        except Exception as exc:  # pickle, a body that is not Celery's, missing fields
            self._set_aside(message, f"cannot be read as a {REFRESH_TASK} request: {type(exc).__name__}: {exc}")
            return
        if request.revoked():  # expired: a refresh that would run late is dropped, the next one is due
            return
        request.execute_using_pool(self.pool)

    def _set_aside(self, message, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key") or runtime.current().control_queue
        try:
            raw = json.dumps({"headers": message.headers, "properties": message.properties,
                              "content-type": message.content_type, "body": _text(message.body)}, default=str)
            dead_letter(runtime.current().redis, queue, raw, reason)
        except Exception as exc:
            log.error("refresh lane: dropped a message it cannot read (%s); could not set it aside: %s", reason, exc)


def _text(body) -> str:
    return body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
