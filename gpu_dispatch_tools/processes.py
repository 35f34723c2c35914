"""Start the long-running Celery processes of gpu-dispatch, and stop every one of them.

The CLI's ``worker``/``beat``/``flower`` sub-commands and the demo build
their command lines here, so the documented ``celery -A gpu_dispatch ...``
line and what the tool runs are one and the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_dispatch.contract import DISPATCH_QUEUE

#: Seconds a process gets to finish after SIGTERM before SIGKILL.
STOP_TIMEOUT = 30.0


def celery(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "gpu_dispatch", *args]


def gpu_worker_argv(gpu: int, concurrency: int, node: str | None = None, loglevel: str = "info") -> list[str]:
    """``celery -A gpu_dispatch worker --gpu N --pool threads --concurrency C -n gpuN@%h``."""
    return celery("worker", "--gpu", str(gpu), "--pool", "threads", "--concurrency", str(concurrency),
                  "-n", node or f"gpu{gpu}@%h", "--loglevel", loglevel)


def dispatcher_argv(concurrency: int = 4, node: str = "dispatcher@%h", loglevel: str = "info") -> list[str]:
    """``celery -A gpu_dispatch worker -Q dispatch --pool threads ...``: the central dispatcher worker."""
    return celery("worker", "-Q", DISPATCH_QUEUE, "--pool", "threads", "--concurrency", str(concurrency),
                  "--prefetch-multiplier", "8", "-n", node, "--loglevel", loglevel)


#: The dispatcher worker's own settings: no task events of its own (celeryconfig, GPU_DISPATCH_TASK_EVENTS).
DISPATCHER_ENV = {"GPU_DISPATCH_TASK_EVENTS": "off"}


def beat_argv(schedule: str, loglevel: str = "info") -> list[str]:
    return celery("beat", "--schedule", schedule, "--loglevel", loglevel)


def flower_argv(port: int, address: str = "127.0.0.1") -> list[str]:
    return celery("flower", f"--port={port}", f"--address={address}")


def flower_env(address: str) -> dict[str, str]:
    """Flower's HTTP API is open without auth only on loopback; elsewhere pass --basic-auth or --auth."""
    return {"FLOWER_UNAUTHENTICATED_API": "true"} if address in {"127.0.0.1", "localhost", "::1"} else {}


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None, *, append: bool = False,
          cwd: Path | None = None, umask: int = -1) -> subprocess.Popen:
    """Start ``argv`` in a session of its own (so its whole group can be signalled), output to ``log``.

    The one way gpu-dispatch's tooling and tests start a process: Celery workers, beat, Flower, servers.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                start_new_session=True, umask=umask)


class Supervisor:
    """Processes started in their own sessions, logging to files; :meth:`stop_all` leaves none behind."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = spawn(argv, self.log_dir / f"{name}.log", env)
        self.procs.append((name, proc))
        return proc

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM every process group (warm shutdown), wait, then SIGKILL what is left."""
        for _, proc in self.procs:
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        for _, proc in self.procs:  # children of a group leader that exited first
            _signal(proc, signal.SIGKILL)
        self.procs.clear()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
