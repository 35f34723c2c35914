"""Celery bootsteps that turn a Celery worker into a GPU worker: ``celery -A gpu_dispatch worker --gpu N``.

:class:`GpuWorkerStep` (worker blueprint) builds this process's
:class:`~workers.runtime.GpuWorker`, makes the worker consume its GPU's queue
and refuses pools that are unsafe for CUDA.

:class:`RefreshLane` (consumer blueprint) is how ``refresh_gpu_metadata``
reaches every GPU worker and runs there even while every inference slot is
busy (see ``docs/architecture.md``, "Keeping metadata fresh"):

- beat publishes the task to the fan-out exchange ``gpu.refresh``, declaring
  the exchange itself (a producer that has not declared it loses the message
  on Redis); each GPU worker binds its own queue to it;
- the lane consumes that queue and the worker's own direct control queue on
  a channel of its own, so refresh messages are not held back by the
  inference queue's prefetch limit, and runs them through Celery's request
  machinery in a one-thread pool of their own — never in an inference slot;
- a retry goes to the worker's direct control queue, not back to the
  fan-out (where it would reach every worker, or nobody);
- the first registration is such a control message too, so a Nacos that is
  not up yet is retried with the task's own backoff.
"""

from __future__ import annotations

import logging
import os

from celery import bootsteps
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.exceptions import ImproperlyConfigured
from celery.worker.request import Request
from click import Option
from kombu import Consumer, Exchange, Queue

from gpu_dispatch.contract import REFRESH_EXCHANGE, REFRESH_TASK
import workers.control  # noqa: F401  (registers the gpu_set_tenants control command)
from workers import runtime

log = logging.getLogger(__name__)

GPU_OPTION = Option(("--gpu",), type=int, default=None, metavar="INDEX",
                    help="Serve this GPU: register it in Nacos and consume its queue (gpu-dispatch).")


class GpuWorkerStep(bootsteps.Step):
    """Builds the GPU worker of this process when ``--gpu`` is given; otherwise does nothing."""

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
        gpu_worker = runtime.GpuWorker(worker.app.conf, gpu, worker.hostname, worker.concurrency)
        runtime.install(gpu_worker)
        if queues:  # the operator named queues with -Q: consume ours as well
            worker.app.amqp.queues.select_add(gpu_worker.queue)
        else:  # only ours, not Celery's default queue
            worker.app.amqp.queues.select([gpu_worker.queue])
        log.info("GPU %s: queue %s, %s GPU, backend %s, %s inference slots", gpu, gpu_worker.queue,
                 gpu_worker.gpu.source, gpu_worker.backend.name, worker.concurrency)


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
        self.consumer = c
        self.pool = ThreadTaskPool(limit=1)
        self.pool.start()
        super().start(c)
        worker = runtime.current()
        # First registration: through the task, so an unreachable Nacos is retried with its backoff.
        c.app.tasks[REFRESH_TASK].apply_async(queue=worker.control_queue, expires=None)

    def stop(self, c) -> None:
        # Also called when the broker connection is lost and the consumer restarts; only a
        # shutdown (the worker's blueprint closing) takes the GPU out of Nacos.
        if c.controller is not None and c.controller.blueprint.state in (bootsteps.CLOSE, bootsteps.TERMINATE):
            runtime.current().withdraw()  # first, so no new work is sent while running requests finish
        super().stop(c)
        if self.pool is not None:
            self.pool.stop()
            self.pool = None

    def _on_message(self, message) -> None:
        c = self.consumer
        task = c.app.tasks.get(message.headers.get("task", ""))
        if task is None or task.name != REFRESH_TASK:
            log.warning("refresh lane got a message for %r; only %s is accepted here, dropped",
                        message.headers.get("task"), REFRESH_TASK)
            return
        request = Request(message, app=c.app, hostname=c.hostname, eventer=c.event_dispatcher, task=task,
                          connection_errors=c.connection_errors)
        if request.revoked():  # expired: a refresh that would run late is dropped, the next one is due
            return
        request.execute_using_pool(self.pool)


def install(app) -> None:
    """Add the ``--gpu`` option and the steps to ``app`` (done once, by ``gpu_dispatch.celery``)."""
    app.user_options["worker"].add(GPU_OPTION)
    app.steps["worker"].add(GpuWorkerStep)
    app.steps["consumer"].add(RefreshLane)
