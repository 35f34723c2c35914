"""The fault matrix's plain topology (``bench/faults.py --short``), each fault under a deadline.

One Redis and one Nacos of this module's own (the faults stop and kill them; the session's servers are
left alone), four simulated GPU workers, a steady 12 requests a second, every request counted:

- Redis stopped (SIGTERM) and killed (kill -9) mid-load, back after 5 s: nothing accepted is lost,
  no worker exits, answers flow again within seconds of Redis answering;
- Nacos down for 60 s mid-load: no NoGpuAvailable (GPUs and Redis are healthy: dispatch goes on from
  the last view), nothing lost;
- a GPU worker killed with kill -9 and started again: what it held is answered, nothing lost;

and in none of them does a process log a failed restart of a step (``Error on restarting …``).

Ports: Redis at GPU_DISPATCH_TEST_FAULTS_REDIS_PORT (default: the test Redis port + 90); Nacos at
GPU_DISPATCH_TEST_FAULTS_NACOS_PORT (default: the test Nacos port - 40, with its gRPC and JRaft ports).
"""

from __future__ import annotations

import os

import pytest

import celeryconfig
from gpu_dispatch_tools.servers import NacosAuth, NacosServer, RedisServer
from tests.conftest import REDIS_PASSWORD, TEST_NACOS_PORT, TEST_REDIS_PORT
from tests.support import LOG_DIR, run_bench_fault

pytestmark = [pytest.mark.timeout(330)]

REDIS_PORT = int(os.environ.get("GPU_DISPATCH_TEST_FAULTS_REDIS_PORT", TEST_REDIS_PORT + 90))
NACOS_PORT = int(os.environ.get("GPU_DISPATCH_TEST_FAULTS_NACOS_PORT", TEST_NACOS_PORT - 40))
#: Seconds one fault's run may take, start of its workers to the last outcome: ~1 min for a Redis
#: fault here, ~2 min for the 60 s Nacos outage.
FAULT_DEADLINE_S = {"nacos-down": 240}.get
#: How soon after Redis answers again the answers must flow (measured: 2–3 s; consumer.py reconnects).
REDIS_RECOVERY_BOUND_S = 10


@pytest.fixture(scope="module")
def servers():
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{REDIS_PORT}"
    redis_server = RedisServer.from_url(url + "/0", celeryconfig.home)
    nacos = NacosServer("127.0.0.1", NACOS_PORT, celeryconfig.home,
                        auth=NacosAuth.from_settings(celeryconfig.nacos_username, celeryconfig.nacos_password))
    started = []
    try:
        for server in (redis_server, nacos):
            server.stop()  # leftovers of an interrupted run are ours (our pid files): start afresh
            print(server.start(timeout=120))
            started.append(server)
        yield {"GPU_DISPATCH_BROKER_URL": url + "/0", "GPU_DISPATCH_RESULT_BACKEND": url + "/1",
               "GPU_DISPATCH_NACOS_SERVER": nacos.address}
    finally:
        for server in reversed(started):
            print(server.stop())


@pytest.fixture(autouse=True)
def clean_broker():
    """Nothing to empty: each fault's run starts its own workers on its own Nacos service."""


def run(servers: dict, fault: str) -> dict:
    env = {**servers, "GPU_DISPATCH_NACOS_SERVICE": f"gpu-inference-test-faults-{fault}"}
    row = run_bench_fault(fault, env, ha=False, deadline_s=FAULT_DEADLINE_S(fault, 170), name=f"faults-{fault}")
    assert not row["skipped"], row["skipped"]
    assert row["sent"] > 100, "the load did not run"
    # Every accepted request is counted once: answered, an error on its AsyncResult, or lost.
    assert row["answered"] + sum(row["errors"].values()) + row["lost"] == row["sent"] - row["refused"]
    assert row["lost"] == 0, f"lost {row['lost']}: {row['details'].get('lost_why')}"
    assert row["exited"] == [], f"workers exited: {row['exited']}"
    assert row["duplicates"] == 0, row
    # Nor did any process fail a restart of its steps quietly (logged, and kept running).
    logs = sorted((LOG_DIR / f"faults-{fault}").glob("*.log"))
    assert logs, "the run left no process logs"
    failed = [f"{path.name}: {line.strip()}" for path in logs for line in path.read_text(errors="replace").splitlines()
              if "Error on restarting" in line or "Unrecoverable error" in line]
    assert not failed, "\n".join(failed[:10])
    return row


@pytest.mark.parametrize("fault", ["redis-term", "redis-kill"])
def test_redis_stopped_or_killed_mid_load_and_back_after_5_s_loses_nothing_and_no_worker_exits(servers, fault):
    row = run(servers, fault)
    assert not row["errors"], row["errors"]
    # The outage itself stalls answers (5 s); they flow again soon after Redis is back.
    assert row["recovery_s"] < REDIS_RECOVERY_BOUND_S, row


def test_nacos_down_60_s_mid_load_gives_no_no_gpu_available_while_gpus_are_healthy(servers):
    row = run(servers, "nacos-down")
    assert not row["errors"].get("NoGpuAvailable"), row["errors"]
    assert not row["errors"], row["errors"]
    assert row["refused"] == 0, "a registry outage refuses nothing at delay()"
    # Dispatch went on from the last view: answers never stopped for the outage.
    assert row["stall_s"] < 5, row


def test_a_gpu_worker_killed_and_started_again_mid_load_loses_nothing(servers):
    row = run(servers, "gpu-restart")
    assert not row["errors"], row["errors"]
