"""Secrets stay secret and nothing listens beyond loopback unless told to: the Redis and Nacos passwords
(the test servers want them) never show in `gpu-dispatch config`, `celery inspect conf`, `celery report`, Flower's
worker pages, worker logs or instance metadata."""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request

from gpu_dispatch.celery import app
from gpu_dispatch_tools.processes import flower_argv, flower_env
from tests.conftest import REDIS_PASSWORD
from tests.integration.dispatch_support import start_dispatcher, start_gpus
from tests.support import LOG_DIR, PYTHON, spawn, stop, wait_until

FLOWER_PORT = 15556
METRICS_PORT = 19809


def run(*argv: str) -> str:
    done = subprocess.run([PYTHON, "-m", *argv], capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


def test_the_redis_password_is_in_no_output_an_operator_reads(service_name, celery_processes, make_registry):
    assert REDIS_PASSWORD in app.conf.broker_url  # the test is about something real
    [worker] = start_gpus(service_name, celery_processes, ["idle"])
    outputs = {
        "gpu-dispatch config": run("gpu_dispatch_tools.cli", "config"),
        "celery inspect conf": run("celery", "-A", "gpu_dispatch", "inspect", "conf", "-d", worker.node, "-t", "5"),
        "celery report": run("celery", "-A", "gpu_dispatch", "report"),
    }
    assert "broker_url" in outputs["celery inspect conf"]  # it did answer
    flower = spawn(flower_argv(FLOWER_PORT), "flower-security", flower_env("127.0.0.1"))
    try:
        def workers_page() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{FLOWER_PORT}/api/workers?refresh=1", timeout=10) as r:
                    body = r.read().decode()
            except OSError:
                return None
            return body if worker.node in body else None

        outputs["Flower /api/workers"] = wait_until(workers_page, 60, "Flower to list the worker")
    finally:
        stop(flower)
    metadata = [json.dumps(dict(i.metadata)) for i in make_registry().list_instances()]
    outputs["instance metadata"] = "\n".join(metadata)
    outputs["worker and Flower logs"] = "\n".join(p.read_text(errors="replace") for p in LOG_DIR.glob("*.log"))

    nacos_password = app.conf.nacos_password
    assert nacos_password  # the test Nacos has auth on
    leaks = [(where, secret) for where, text in outputs.items()
             for secret, value in (("Redis", REDIS_PASSWORD), ("Nacos", nacos_password)) if value in text]
    assert leaks == []
    assert metadata


def test_the_dispatchers_metrics_listen_on_loopback_only_by_default(service_name, celery_processes):
    start_dispatcher(service_name, celery_processes, env={"GPU_DISPATCH_METRICS_PORT": str(METRICS_PORT)})

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", METRICS_PORT), timeout=1):
                return True
        except OSError:
            return False

    wait_until(listening, 30, "the metrics endpoint on loopback")
    others = [a for a in _host_addresses() if not a.startswith("127.")]
    for address in others:
        try:
            socket.create_connection((address, METRICS_PORT), timeout=1).close()
        except OSError:
            continue
        raise AssertionError(f"metrics answer on {address}:{METRICS_PORT}; they should listen on loopback only")
    print(f"\nmetrics refused on {others or 'no other address (none here)'}")


def _host_addresses() -> list[str]:
    done = subprocess.run(["hostname", "-I"], capture_output=True, text=True)
    return done.stdout.split() if done.returncode == 0 else []
