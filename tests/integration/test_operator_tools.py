"""What an operator runs: `gpu-dispatch status`, Flower, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

from gpu_dispatch.celery import app
from tests.support import PYTHON, spawn, start_beat, start_gpu_worker, stop, wait_until

STATUS_FIELDS = {"host", "gpu", "name", "queue", "free_mb", "total_mb", "util", "in_flight", "queue_depth",
                 "age_s", "source", "score", "probability", "excluded"}
#: Port of the Flower the test starts (never Flower's default 5555).
FLOWER_PORT = 15555


def status_json(service: str) -> list[dict]:
    done = subprocess.run([PYTHON, "-m", "gpu_dispatch.cli", "status", "--once", "--json"], capture_output=True,
                          text=True, env={**os.environ, "GPU_DISPATCH_NACOS_SERVICE": service}, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_status_json_reports_every_registered_gpu_and_why_one_is_excluded(make_registry, service_name,
                                                                          celery_processes):
    fast = {"GPU_DISPATCH_REFRESH_INTERVAL": "1"}
    celery_processes += [start_gpu_worker(app, 0, service_name, env={**fast, "GPU_DISPATCH_SIM_TENANTS": "idle"}),
                         start_gpu_worker(app, 1, service_name, env={**fast,
                                                                      "GPU_DISPATCH_SIM_TENANTS": "nearly-full"}),
                         start_beat(service_name, fast)]
    stranger = make_registry()
    stranger.register("10.7.7.7", 9000, {"gpu_index": "0", "memory_free_mb": "lots"})  # not one of ours

    rows = wait_until(lambda: len(rows := status_json(service_name)) == 3 and rows, 30, "3 rows in status")

    by_host = {(r["host"], r["gpu"]): r for r in rows}
    for row in rows:
        assert set(row) >= STATUS_FIELDS
    idle, full = by_host[("127.0.0.1", "0")], by_host[("127.0.0.1", "1")]
    assert idle["excluded"] is None and idle["source"] == "simulated" and idle["queue_depth"] == 0
    assert idle["probability"] > full["probability"] > 0
    assert abs(idle["probability"] + full["probability"] - 1) < 1e-9
    stranger_row = by_host[("10.7.7.7", "0")]
    assert stranger_row["probability"] == 0 and "queue" in stranger_row["excluded"]


def test_flower_api_shows_a_dispatched_requests_tasks(service_name, celery_processes):
    from dispatcher import dispatch_inference

    celery_processes.append(start_gpu_worker(app, 0, service_name))
    flower = spawn([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "flower", f"--port={FLOWER_PORT}",
                    "--address=127.0.0.1"], "flower")
    try:
        wait_until(lambda: _get(f"http://127.0.0.1:{FLOWER_PORT}/healthcheck") == b"OK", 30, "Flower to answer")
        result = dispatch_inference.delay("hello Flower")
        answer = result.get(timeout=60)

        def seen() -> dict:
            tasks = json.loads(_get(f"http://127.0.0.1:{FLOWER_PORT}/api/tasks") or b"{}")
            return tasks.get(result.id)

        task = wait_until(seen, 30, "the request's task in Flower's API")
        assert task["state"] == "SUCCESS"
        assert task["name"] in {"run_inference", "dispatch_inference"}
        assert answer["gpu"]["queue"] in (task.get("routing_key"), answer["gpu"]["queue"])
    finally:
        stop(flower)


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.read()
    except OSError:
        return None


def test_the_demo_in_short_mode_loses_nothing_and_leaves_no_process_behind(tmp_path):
    plot = tmp_path / "demo.png"
    done = subprocess.run([PYTHON, "-m", "gpu_dispatch.cli", "demo", "--prompts", "40", "--rate", "40",
                           "--flower-port", str(FLOWER_PORT + 1), "--plot", str(plot)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "GPU_DISPATCH_NACOS_SERVICE": "gpu-inference-demo-test",
                               "COLUMNS": "120"})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "40 answered, 0 errors, 0 lost of 40 sent" in done.stdout
    assert plot.exists()
    leftovers = subprocess.run(["pgrep", "-f", "demo-gpu|demo-dispatcher|celery -A gpu_dispatch (beat|flower)"],
                               capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left behind: {leftovers}"
