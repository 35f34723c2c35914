"""What an operator runs: `gpu-dispatch status`, Flower, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

from dispatcher import dispatch_inference
from gpu_dispatch_tools.processes import flower_argv, flower_env
from tests.integration.dispatch_support import start_dispatcher, start_gpus
from tests.support import PYTHON, spawn, stop, wait_until

STATUS_FIELDS = {"instance", "incarnation", "gpu", "name", "queue", "free_mb", "total_mb", "util", "running",
                 "queued", "held_mb", "age_s", "source", "score", "probability", "excluded", "verdict", "note"}
#: Port of the Flower the test starts (never Flower's default 5555).
FLOWER_PORT = 15555
#: Port of the dispatcher's Prometheus endpoint in the test (never the default 9808).
METRICS_PORT = 19808
#: Series the dispatcher's /metrics must serve (issue: decisions per GPU, retries, rescues, ages, depth).
METRIC_SERIES = ("gpu_dispatch_decisions_total", "gpu_dispatch_no_gpu_retries_total", "gpu_dispatch_rescued_total",
                 "gpu_dispatch_recovered_total", "gpu_dispatch_recovery_failed_total", "gpu_dispatch_running",
                 "gpu_dispatch_reading_age_seconds", "gpu_dispatch_queue_depth", "gpu_dispatch_view_age_seconds",
                 "gpu_dispatch_registry_outage_seconds", "gpu_dispatch_instances")


def status_json(service: str) -> list[dict]:
    done = subprocess.run([PYTHON, "-m", "gpu_dispatch_tools.cli", "status", "--once", "--json"], capture_output=True,
                          text=True, env={**os.environ, "GPU_DISPATCH_NACOS_SERVICE": service}, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["rows"]


def test_status_json_reports_every_registered_gpu_and_why_one_is_excluded(make_registry, service_name,
                                                                          celery_processes):
    start_gpus(service_name, celery_processes, ["idle", "nearly-full"])
    stranger = make_registry()
    stranger.register("10.7.7.7", 9000, {"gpu_index": "0", "memory_free_mb": "lots"})  # not one of ours

    def ready() -> list[dict] | None:
        rows = status_json(service_name)
        ours = [r for r in rows if r["instance"].startswith("127.0.0.1:")]
        return rows if len(rows) == 3 and all(r["verdict"] == "trusted" for r in ours) else None

    rows = wait_until(ready, 30, "3 rows in status, both GPUs trusted")

    by_instance = {r["instance"]: r for r in rows}
    for row in rows:
        assert set(row) == STATUS_FIELDS
    idle, full = by_instance["127.0.0.1:8000"], by_instance["127.0.0.1:8001"]
    assert idle["excluded"] is None and idle["source"] == "simulated" and idle["queued"] == 0
    assert idle["incarnation"] and idle["incarnation"] != full["incarnation"]
    assert idle["probability"] > full["probability"] > 0
    assert abs(idle["probability"] + full["probability"] - 1) < 1e-9
    stranger_row = by_instance["10.7.7.7:9000"]
    assert stranger_row["probability"] == 0 and stranger_row["verdict"] == "unclaimed"
    assert "no live gpu-dispatch worker claims this instance" in stranger_row["excluded"]


def test_flower_api_shows_a_dispatched_requests_tasks(service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle"])  # with beat: its reading stays fresh while Flower starts
    wait_until(producer_view.candidates, 30, "the GPU in the dispatcher's view")
    flower = spawn(flower_argv(FLOWER_PORT), "flower", flower_env("127.0.0.1"))
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{FLOWER_PORT}/healthcheck") == b"OK", 30, "Flower to answer")
        # Flower answers before its event consumer is subscribed: warm up until it sees a task at all.
        wait_until(lambda: _flower_task(dispatch_inference.delay("warm-up").id, wait=2.0), 30, "Flower's events")
        result = dispatch_inference.delay("hello Flower")
        answer = result.get(timeout=60)

        def seen() -> dict | None:
            task = _flower_task(result.id)
            return task if task and task.get("state") == "SUCCESS" and task.get("name") else None

        task = wait_until(seen, 30, "the request's task, succeeded, in Flower's API")
        # On the producer path the caller's task id is run_inference's, on the GPU the answer names.
        assert task["name"] == "run_inference"
        assert task["worker"] == answer["gpu"]["worker"]
    finally:
        stop(flower)


def test_metrics_endpoint_serves_the_dispatchers_series(service_name, celery_processes, central_mode):
    start_gpus(service_name, celery_processes, ["idle"])
    start_dispatcher(service_name, celery_processes, env={"GPU_DISPATCH_METRICS_PORT": str(METRICS_PORT)})

    answer = dispatch_inference.delay("count me").get(timeout=60)

    def scraped() -> str | None:
        body = _get(f"http://127.0.0.1:{METRICS_PORT}/metrics")
        text = body.decode() if body else ""
        return text if 'gpu_dispatch_queue_depth{gpu="gpu.127.0.0.1.8000"}' in text else None

    text = wait_until(scraped, 30, "the dispatcher's metrics with the GPU's queue depth")
    for series in METRIC_SERIES:  # declared (a counter with no sample yet shows only its # TYPE line)
        assert f"# TYPE {series} " in text, f"{series} missing from /metrics"
    assert f'gpu_dispatch_decisions_total{{gpu="{answer["gpu"]["queue"]}",path="central"}} 1.0' in text
    assert 'gpu_dispatch_instances{verdict="trusted"} 1.0' in text


def _flower_task(task_id: str, wait: float = 0.0) -> dict | None:
    """Flower's record of one task (via its HTTP API), waiting up to ``wait`` seconds for it."""
    deadline = time.monotonic() + wait
    while True:
        task = json.loads(_get(f"http://127.0.0.1:{FLOWER_PORT}/api/tasks") or b"{}").get(task_id)
        if task or time.monotonic() >= deadline:
            return task
        time.sleep(0.1)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.read()
    except OSError:
        return None


def test_the_demo_in_short_mode_loses_nothing_and_leaves_no_process_behind(tmp_path):
    plot = tmp_path / "demo.png"
    done = subprocess.run([PYTHON, "-m", "gpu_dispatch_tools.cli", "demo", "--prompts", "40", "--rate", "40",
                           "--flower-port", str(FLOWER_PORT + 1), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GPU_DISPATCH_NACOS_SERVICE": "gpu-inference-demo-test",
                               "COLUMNS": "120"})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "40 answered, 0 errors, 0 lost of 40 sent" in done.stdout
    assert plot.exists()
    demo_processes = f"demo-gpu|demo-dispatcher|demo/celerybeat-schedule|--port={FLOWER_PORT + 1}"
    leftovers = subprocess.run(["pgrep", "-f", demo_processes], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left behind: {leftovers}"
