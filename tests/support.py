"""Small helpers shared by the tests: waiting on conditions with a deadline, running processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import celeryconfig
from gpu_dispatch_tools import processes

T = TypeVar("T")

#: Where test processes write their logs (ignored by git).
LOG_DIR = Path(celeryconfig.home) / "test-logs"


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Return the first truthy value of ``condition()``; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def spawn(argv: list[str], name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a process in its own session with its output in ``LOG_DIR/<name>.log``."""
    return processes.spawn(argv, LOG_DIR / f"{name}.log", env)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal a spawned process's group, wait for it, and SIGKILL it if it will not go."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def log_tail(name: str, lines: int = 40) -> str:
    path = LOG_DIR / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


PYTHON = sys.executable


class CeleryProcess:
    """A real ``celery -A gpu_dispatch`` process (worker or beat) started by a test."""

    def __init__(self, argv: list[str], name: str, env: dict[str, str]) -> None:
        self.argv, self.name, self.env = argv, name, env
        self.proc = spawn(argv, name, env)

    def restart(self) -> None:
        self.proc = spawn(self.argv, f"{self.name}.restarted", self.env)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return stop(self.proc, sig, timeout)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group and return at once (SIGSTOP, SIGCONT)."""
        os.killpg(self.proc.pid, sig)

    def log(self, lines: int = 60) -> str:
        return log_tail(self.name, lines)


def start_gpu_worker(app, gpu: int, service: str, *, concurrency: int = 2, env: dict[str, str] | None = None,
                     hostname: str | None = None, wait: bool = True) -> CeleryProcess:
    """Start ``celery -A gpu_dispatch worker --gpu N`` on the test's Nacos service; wait for its ping."""
    node = hostname or f"gpu{gpu}-{service}@localhost"
    worker_env = {"GPU_DISPATCH_NACOS_SERVICE": service, "GPU_DISPATCH_WORKER_IP": "127.0.0.1",
                  "GPU_DISPATCH_GPU_SOURCE": "simulated", **(env or {})}
    worker = CeleryProcess([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "worker", "--gpu", str(gpu),
                            "--pool", "threads", "--concurrency", str(concurrency), "-n", node,
                            "--without-gossip", "--without-mingle", "--loglevel", "info"],
                           f"gpu{gpu}-{service}", worker_env)
    worker.node = node
    if wait:
        wait_until(lambda: not worker.alive() or app.control.ping([node], timeout=0.5), 60,
                   f"GPU worker {node} to answer a ping")
        assert worker.alive(), f"GPU worker {node} exited:\n{worker.log()}"
    return worker


def start_beat(service: str, env: dict[str, str] | None = None) -> CeleryProcess:
    """Start ``celery -A gpu_dispatch beat`` with its schedule file in the test log directory."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    schedule = LOG_DIR / f"beat-{service}.schedule"
    return CeleryProcess([PYTHON, "-m", "celery", "-A", "gpu_dispatch", "beat", "--schedule", str(schedule),
                          "--loglevel", "info"], f"beat-{service}",
                         {"GPU_DISPATCH_NACOS_SERVICE": service, **(env or {})})


#: The repository's root: where ``python -m bench.…`` runs.
ROOT = Path(__file__).resolve().parents[1]


def run_bench_fault(fault: str, env: dict[str, str], *, ha: bool, deadline_s: float, name: str | None = None) -> dict:
    """``python -m bench.faults [--ha] --short --only FAULT`` with ``env`` over this process's; its row.

    Fails the test, with the log's tail, when it does not finish within ``deadline_s`` (it is then
    stopped with SIGTERM, on which it stops its workers) or writes no row.
    """
    import pytest

    name = name or fault
    out, log = LOG_DIR / f"{name}.json", LOG_DIR / f"{name}.log"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    env = {**os.environ, "GPU_DISPATCH_FAULTS_LOGS": str(LOG_DIR / name), "PYTHONUNBUFFERED": "1", **env}
    argv = [PYTHON, "-m", "bench.faults", *(["--ha"] if ha else []), "--short", "--only", fault, "--json", str(out)]
    begun = time.monotonic()
    with open(log, "wb") as output:
        bench = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            bench.wait(deadline_s)
        except subprocess.TimeoutExpired:
            bench.terminate()
            try:
                bench.wait(60)
            except subprocess.TimeoutExpired:
                bench.kill()
                bench.wait()
            pytest.fail(f"{fault} did not finish within {deadline_s:g} s:\n{log_tail(name)}")
    took = time.monotonic() - begun
    assert out.exists(), f"{fault} wrote no row (exit status {bench.returncode}):\n{log_tail(name)}"
    (row,) = json.loads(out.read_text())
    print(f"\n{fault} in {took:.0f} s: {row}")
    return row

