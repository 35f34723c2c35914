"""Bad configuration fails at start-up, naming the setting or argument to change (no servers needed:
each process stops before it would connect)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def start(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "GPU_DISPATCH_GPU_SOURCE": "simulated", **env})


@pytest.mark.parametrize("env, message", [
    ({"GPU_DISPATCH_BROKER_URL": "http://127.0.0.1:6379/0"}, "GPU_DISPATCH_BROKER_URL='http://127.0.0.1:6379/0' is not valid"),
    ({"GPU_DISPATCH_BROKER_URL": "redis://:hunter2@127.0.0.1:99999/0"}, "GPU_DISPATCH_BROKER_URL='redis://:**@127.0.0.1:99999/0'"),
    ({"GPU_DISPATCH_RESULT_BACKEND": "redis://127.0.0.1:6379/zero"}, "GPU_DISPATCH_RESULT_BACKEND"),
    ({"GPU_DISPATCH_BROKER_URL": "sentinel://127.0.0.1:26379"}, "set GPU_DISPATCH_SENTINEL_MASTER"),
    ({"GPU_DISPATCH_WORKER_IP": "10.0.0.999"}, "GPU_DISPATCH_WORKER_IP='10.0.0.999' is not valid"),
    ({"GPU_DISPATCH_NACOS_SERVER": "nacos-without-port"}, "GPU_DISPATCH_NACOS_SERVER"),
    ({"GPU_DISPATCH_REFRESH_INTERVAL": "nan"}, "must be a finite number"),
    ({"GPU_DISPATCH_NO_GPU_WAIT": "inf"}, "GPU_DISPATCH_NO_GPU_WAIT='inf' is not valid"),
    ({"GPU_DISPATCH_MAX_CONCURRENCY": "0"}, "must be greater than 0"),
])
def test_a_bad_setting_stops_every_process_at_start_naming_it(env, message):
    done = start(["-c", "import celeryconfig"], **env)
    assert done.returncode != 0
    assert message in done.stderr
    assert "hunter2" not in done.stderr


def test_a_gpu_index_beyond_the_hosts_gpus_stops_the_worker_naming_the_setting():
    done = start(["-m", "celery", "-A", "gpu_dispatch", "worker", "--gpu", "9", "--pool", "threads"],
                 GPU_DISPATCH_BROKER_URL="redis://127.0.0.1:1/0")
    assert "--gpu 9: this host has 8 simulated GPUs" in done.stderr and "GPU_DISPATCH_SIM_GPUS" in done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--gpu", "0", "-c", "0"], "'--concurrency' / '-c': 0 is not in the range x>=1"),
    (["--gpu", "-1"], "'--gpu': -1 is not in the range x>=0"),
])
def test_bad_worker_arguments_are_refused_naming_them(argv, message):
    done = start(["-m", "gpu_dispatch_tools.cli", "worker", *argv])
    assert done.returncode == 2 and message in done.stderr
