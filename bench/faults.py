"""The fault matrix: a steady load over real workers, one fault at a time, every request counted.

    python -m bench.faults             # every fault, full length (docs/reliability.md)
    python -m bench.faults --short     # the CI run: the same faults, shorter load
    python -m bench.faults --only redis-kill nacos-down

Starts its own Redis and Nacos (bench ports, unless the GPU_DISPATCH_* server
settings say otherwise), four simulated GPU workers, beat and a dispatcher
worker; this process dispatches on the producer path.  For each fault, it
sends ``--rate`` requests a second before, during and after the fault, then
waits for every accepted request's outcome and reports, per fault:

- **sent** — ``delay()`` calls; **refused** — raised at ``delay()`` (never
  accepted: the caller knows); **answered**; **errors** by type (a
  ``NoGpuAvailable`` while GPUs are healthy is a failure of ours);
- **lost** — accepted, and no outcome within the deadline;
- **duplicates** — requests whose outcome was stored more than once
  (read from the workers' logs);
- **exited** — worker processes that died without being killed by the fault;
- **stall** — the longest time no request was answered, and **recovery** — how
  long after the fault ended answers flowed again.

Exit status 1 if any row has a lost request, a duplicate, an exited worker or
(for a fault that leaves GPUs healthy) a NoGpuAvailable.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:16699/0")
os.environ.setdefault("GPU_DISPATCH_RESULT_BACKEND", "redis://127.0.0.1:16699/1")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:18868")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVICE", "gpu-inference-faults")

import celeryconfig  # noqa: E402
from gpu_dispatch.processes import Supervisor, beat_argv, dispatcher_argv, gpu_worker_argv  # noqa: E402
from gpu_dispatch.servers import local_servers  # noqa: E402

#: Settings of every process: fast refreshes and sweeps, requests of about half a second.
PROCESS_ENV = {"GPU_DISPATCH_GPU_SOURCE": "simulated", "GPU_DISPATCH_WORKER_IP": "127.0.0.1",
               "GPU_DISPATCH_SIM_MS_PER_TOKEN": "10", "GPU_DISPATCH_REFRESH_INTERVAL": "1",
               "GPU_DISPATCH_RECONCILE_INTERVAL": "2", "GPU_DISPATCH_METRICS_PORT": "0"}
GPUS = 4
#: Seconds without an answer that count as a stall (at 12 requests/s, answers come every ~0.1 s).
STALL_S = 2.0
#: Faults after which every GPU is healthy: a NoGpuAvailable there is a failure of ours.
GPUS_HEALTHY = {"redis-term", "redis-kill", "nacos-down", "gpu-restart"}


@dataclass
class Row:
    fault: str
    sent: int = 0
    refused: int = 0
    answered: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost: int = 0
    duplicates: int = 0
    exited: list[str] = field(default_factory=list)
    stall_s: float = 0.0
    recovery_s: float = 0.0

    @property
    def ok(self) -> bool:
        no_gpu = self.errors.get("NoGpuAvailable", 0) if self.fault in GPUS_HEALTHY else 0
        return not (self.lost or self.duplicates or self.exited or no_gpu)


class Load:
    """Sends ``rate`` requests a second from a thread of its own until stopped."""

    def __init__(self, rate: float) -> None:
        from dispatcher import dispatch_inference

        self.rate = rate
        self.accepted: list[tuple[float, object]] = []
        self.refused: list[tuple[float, str]] = []
        self._send = dispatch_inference.delay
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Load":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        n, begun = 0, time.monotonic()
        while not self._stop.is_set():
            try:
                self.accepted.append((time.time(), self._send(f"fault load {n}", max_tokens=40)))
            except Exception as exc:  # refused at delay(): the caller knows, nothing was accepted
                self.refused.append((time.time(), f"{type(exc).__name__}: {exc}"))
            n += 1
            self._stop.wait(max(0.0, begun + n / self.rate - time.monotonic()))


class Rig:
    """The servers and processes a fault is injected into."""

    def __init__(self, log_dir: Path) -> None:
        self.redis, self.nacos = local_servers(celeryconfig)
        self.started = [s for s in (self.redis, self.nacos) if not s.answering()]
        self.supervisor = Supervisor(log_dir)
        self.log_dir = log_dir
        self.generation = 0

    def up(self) -> None:
        for server in self.started:
            print(server.start(timeout=120))
        self.generation += 1
        for gpu in range(GPUS):
            self.supervisor.start(self.gpu_log(gpu), gpu_worker_argv(gpu, 2, f"faults-gpu{gpu}@%h", "info"),
                                  PROCESS_ENV)
        self.supervisor.start(f"beat-{self.generation}",
                              beat_argv(str(self.log_dir / "beat.schedule"), "warning"), PROCESS_ENV)
        self.supervisor.start(f"dispatcher-{self.generation}", dispatcher_argv(node="faults-dispatcher@%h"),
                              PROCESS_ENV)

    def gpu_log(self, gpu: int, restart: int = 0) -> str:
        return f"gpu{gpu}-{self.generation}" + (f"-restart{restart}" if restart else "")

    def down(self) -> None:
        self.supervisor.stop_all()

    def close(self) -> None:
        self.down()
        for server in reversed(self.started):
            print(server.stop())


def wait_for_gpus(view, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while len(view.candidates()) < count:
        if time.monotonic() > deadline:
            sys.exit(f"the {count} GPUs did not come up; logs in {celeryconfig.home}/faults-logs")
        time.sleep(0.2)


# -- the faults -----------------------------------------------------------------------------------

def redis_term(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.redis.stop()}")
    time.sleep(outage_s)  # the fault itself: Redis away this long
    print(f"  {rig.redis.start(timeout=60)}")


def redis_kill(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.redis.kill()}")
    time.sleep(outage_s)
    print(f"  {rig.redis.start(timeout=60)}")


def nacos_down(rig: Rig, outage_s: float) -> None:
    print(f"  {rig.nacos.stop()}")
    time.sleep(outage_s)
    print(f"  {rig.nacos.start(timeout=120)}")


def gpu_restart(rig: Rig, outage_s: float) -> None:
    name = rig.gpu_log(0)
    for label, proc in rig.supervisor.procs:
        if label == name:
            os.killpg(proc.pid, signal.SIGKILL)
    rig.supervisor.procs = [(label, p) for label, p in rig.supervisor.procs if label != name]
    rig.supervisor.start(rig.gpu_log(0, restart=1), gpu_worker_argv(0, 2, "faults-gpu0@%h", "info"), PROCESS_ENV)


FAULTS = {"redis-term": (redis_term, 5.0), "redis-kill": (redis_kill, 5.0), "nacos-down": (nacos_down, 60.0),
          "gpu-restart": (gpu_restart, 0.0)}


def run_fault(rig: Rig, view, name: str, rate: float, before_s: float, after_s: float) -> Row:
    inject, outage_s = FAULTS[name]
    print(f"fault {name}: {rate:g} requests/s, {before_s:g} s before, then the fault, then {after_s:g} s")
    load = Load(rate).start()
    time.sleep(before_s)  # steady load before the fault
    fault_at = time.time()
    inject(rig, outage_s)
    fault_end = time.time()
    time.sleep(after_s)  # and after it
    load.stop()
    row = Row(name, sent=len(load.accepted) + len(load.refused), refused=len(load.refused))
    finished = []
    for _sent_at, result in load.accepted:
        try:
            answer = result.get(timeout=180)
        except Exception as exc:  # an error on the AsyncResult is an answer, not a loss
            if type(exc).__name__ == "TimeoutError":
                row.lost += 1
            else:
                row.errors[type(exc).__name__] += 1
        else:
            row.answered += 1
            finished.append(answer["timings"]["finished_at"])
    finished.sort()
    gaps = [(b - a, b) for a, b in zip(finished, finished[1:]) if b > fault_at]
    if gaps:
        row.stall_s, resumed_at = max(gaps)
        # A stall no longer than the load's own spacing between answers is no stall: nothing to recover.
        row.recovery_s = max(0.0, resumed_at - fault_end) if row.stall_s > STALL_S else 0.0
    row.duplicates = _duplicates(rig.log_dir)
    row.exited = [n for n in rig.supervisor.dead() if n.startswith(("gpu", "dispatcher", "beat"))]
    print(f"  {row}")
    return row


def _duplicates(log_dir: Path) -> int:
    """Requests whose outcome a worker stored more than once (Celery logs each stored outcome)."""
    stored = collections.Counter()
    for path in log_dir.glob("gpu*.log"):
        stored.update(re.findall(r"Task run_inference\[([0-9a-f-]+)\] (?:succeeded|raised)", path.read_text()))
    return sum(1 for count in stored.values() if count > 1)


def table(rows: list[Row]) -> str:
    lines = ["| fault | sent | refused at delay() | answered | errors | lost | duplicates | workers exited | "
             "longest stall s | recovery s |", "|---|--:|--:|--:|---|--:|--:|---|--:|--:|"]
    for r in rows:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "0"
        lines.append(f"| {r.fault} | {r.sent} | {r.refused} | {r.answered} | {errors} | {r.lost} | {r.duplicates} | "
                     f"{', '.join(r.exited) or 0} | {r.stall_s:.1f} | {r.recovery_s:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="shorter load around each fault (CI)")
    parser.add_argument("--only", nargs="+", choices=sorted(FAULTS), help="run only these faults")
    parser.add_argument("--rate", type=float, default=12.0, help="requests per second (default 12)")
    options = parser.parse_args()
    before_s, after_s = (5.0, 10.0) if options.short else (15.0, 30.0)

    from dispatcher import view as views
    from gpu_dispatch.celery import app

    log_dir = Path(celeryconfig.home) / "faults-logs"
    for old in log_dir.glob("*.log"):
        old.unlink()
    rig = Rig(log_dir)
    rows = []
    try:
        for name in options.only or list(FAULTS):
            rig.up()
            wait_for_gpus(views.current_view(app, wait=60) or views.process_view(app), GPUS)
            rows.append(run_fault(rig, views.process_view(app), name, options.rate, before_s, after_s))
            rig.down()
    finally:
        rig.close()
    print()
    print(table(rows))
    sys.exit(0 if all(r.ok for r in rows) else 1)


if __name__ == "__main__":
    main()
