"""Fixtures and helpers of the dispatcher's integration tests (imported by tests/integration/test_dispatch*.py)."""

from __future__ import annotations

import collections
import random

import pytest
from celery.result import AsyncResult
from celery.utils import uuid

from dispatcher import view as views
from dispatcher.view import RegistryView
from gpu_dispatch.celery import app
from gpu_dispatch.contract import ATTEMPT_HEADER
from tests.support import PYTHON, CeleryProcess, start_beat, start_gpu_worker, wait_until

#: Refresh period of the GPU workers' metadata in these tests, seconds.
REFRESH = 1.0
#: Fast simulated inference: (prompt tokens / 8 + max_tokens) × this many ms.
FAST_GPU = {"GPU_DISPATCH_REFRESH_INTERVAL": str(REFRESH), "GPU_DISPATCH_SIM_MS_PER_TOKEN": "0.2"}
#: The dispatcher worker's settings in these tests: quick sweeps and lists, no metrics port.
FAST_DISPATCHER = {"GPU_DISPATCH_RESCUE_INTERVAL": "0.5", "GPU_DISPATCH_RECONCILE_INTERVAL": "1",
                   "GPU_DISPATCH_METRICS_PORT": "0", "GPU_DISPATCH_REFRESH_INTERVAL": str(REFRESH)}


def make_view(service: str, **overrides) -> RegistryView:
    """A registry view of ``service`` for this test process, with quick lists and counts."""
    settings = {"nacos_service": service, "reconcile_interval": 1.0, "queue_depth_interval": 0.1, **overrides}
    return RegistryView.from_config(app.conf, **settings).start()


@pytest.fixture
def producer_view(service_name):
    """This test process dispatches on the producer path from a view of the test's own service."""
    view = make_view(service_name, rng=random.Random(7))
    views.install(view)
    previous = app.conf.dispatch_mode
    app.conf.dispatch_mode = "producer"
    yield view
    app.conf.dispatch_mode = previous
    views.install(None)
    view.close()


@pytest.fixture
def central_mode():
    """This test process queues every request for the dispatcher worker (the central path)."""
    previous = app.conf.dispatch_mode
    app.conf.dispatch_mode = "central"
    yield
    app.conf.dispatch_mode = previous


def start_dispatcher(service: str, processes: list, env: dict[str, str] | None = None,
                     concurrency: int = 4) -> CeleryProcess:
    """Start a dispatcher worker (``-Q dispatch``) on ``service`` and wait for its ping."""
    node = f"dispatcher-{service}@localhost"
    process = CeleryProcess([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "worker", "-Q", "dispatch",
                             "--pool", "threads", "--concurrency", str(concurrency), "-n", node,
                             "--without-gossip", "--without-mingle", "--loglevel", "info"],
                            f"dispatcher-{service}",
                            {"GPU_DISPATCH_NACOS_SERVICE": service, **FAST_DISPATCHER, **(env or {})})
    process.node = node
    processes.append(process)
    wait_until(lambda: not process.alive() or app.control.ping([node], timeout=0.5), 60,
               f"dispatcher worker {node} to answer a ping")
    assert process.alive(), f"dispatcher worker exited:\n{process.log()}"
    return process


def start_gpus(service: str, processes: list, tenants: list[str], *, concurrency: int = 2,
               env: dict[str, str] | None = None, env_of: dict[int, dict[str, str]] | None = None,
               beat: bool = True, first_gpu: int = 0) -> list[CeleryProcess]:
    """One simulated GPU worker per entry of ``tenants`` (GPU ``first_gpu``, then +1 ...), and beat.

    :param env: settings of every GPU worker; ``env_of`` adds to them for the GPUs it names.
    """
    workers = []
    for gpu, load in enumerate(tenants, start=first_gpu):
        worker = start_gpu_worker(app, gpu, service, concurrency=concurrency,
                                  env={**FAST_GPU, "GPU_DISPATCH_SIM_TENANTS": load, **(env or {}),
                                       **(env_of or {}).get(gpu, {})})
        processes.append(worker)
        workers.append(worker)
    if beat:
        processes.append(start_beat(service, FAST_GPU))
    return workers


def send_pinned(ledger, queue: str, prompt: str, max_tokens: int = 4) -> AsyncResult:
    """What the dispatcher does once it has picked ``queue``: record the request, then publish it there."""
    task_id = uuid()
    kwargs = {"max_tokens": max_tokens, "memory_mb": 0}
    ledger.dispatch(task_id, queue, 0, {"args": [prompt], "kwargs": kwargs}, "test")
    app.send_task("run_inference", args=(prompt,), kwargs=kwargs, task_id=task_id, queue=queue,
                  headers={ATTEMPT_HEADER: 1})
    return AsyncResult(task_id, app=app)


def wait_for_gpus(view: RegistryView, count: int, timeout: float = 30) -> None:
    wait_until(lambda: len(view.candidates()) >= count, timeout, f"{count} GPUs in the dispatcher's view")


def served_by(results: list[dict]) -> collections.Counter:
    return collections.Counter(r["gpu"]["queue"] for r in results)
