"""The dispatcher worker's role, as a Celery bootstep: a worker that consumes ``dispatch``.

``celery -A gpu_dispatch worker -Q dispatch -P threads`` (``gpu-dispatch dispatcher``)
becomes a dispatcher worker: it starts its registry view at once, the
ledger's recovery sweep (:mod:`dispatcher.recovery`) and, unless
``GPU_DISPATCH_METRICS_PORT`` is 0, the Prometheus endpoint.  Any other
worker (a GPU worker) is left alone: the step is included only where
``dispatch`` is consumed, as Celery's own heart step is only where events are on.
"""

from __future__ import annotations

import logging

from celery import bootsteps
from prometheus_client import start_http_server

from dispatcher import view as views
from gpu_dispatch.contract import DISPATCH_QUEUE

log = logging.getLogger(__name__)


class DispatcherStep(bootsteps.StartStopStep):
    """Starts the view, recovery and metrics of a worker that consumes the dispatch queue."""

    name = "gpu-dispatch dispatcher"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self.recovery = None

    def include_if(self, worker) -> bool:
        return DISPATCH_QUEUE in worker.app.amqp.queues.consume_from

    def start(self, worker) -> None:
        from dispatcher.recovery import Recovery

        conf = worker.app.conf
        view = views.process_view(worker.app)  # started now, not at the first request
        if conf.metrics_port:
            try:
                start_http_server(conf.metrics_port, addr=conf.metrics_address)
                log.info("dispatcher metrics on http://%s:%d/metrics", conf.metrics_address, conf.metrics_port)
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d (GPU_DISPATCH_METRICS_ADDRESS, GPU_DISPATCH_METRICS_PORT): "
                          "%s", conf.metrics_address, conf.metrics_port, exc)
        self.recovery = Recovery(worker.app, view).start()
        log.info("dispatcher ready: profile %s, recovery sweep every %g s", conf.dispatch_profile,
                 conf.rescue_interval)

    def stop(self, worker) -> None:
        if self.recovery is not None:
            self.recovery.stop()
            self.recovery = None
        views.close_views()
