"""Dispatch overhead against plain Celery, same machine, same run.

    python -m bench.dispatch_overhead [--requests 1000] [--rounds 3]

Starts its own Redis and Nacos (on bench ports, unless the GPU_DISPATCH_*
server settings are set), two simulated GPU workers whose inference takes no
time (so only the messaging is measured), beat, and a central dispatcher
worker; then measures, for the same ``run_inference`` work:

- **plain** — ``app.send_task("run_inference", queue=<fixed GPU queue>)``,
  the two GPU queues in turn: plain Celery, no choice at all;
- **producer** — ``dispatch_inference.delay()`` on the producer path (this
  process's registry view picks the GPU, one hop);
- **central** — ``dispatch_inference.delay()`` on the central path (queued on
  ``dispatch``; the dispatcher worker picks and forwards ``run_inference``
  under the same task id: two hops).  ``--dispatcher-pool solo`` runs that
  worker with the solo pool instead of threads.

Round trip: one request at a time, ``.get()`` before the next (median and
p99 over ``--requests``).  Throughput: ``--requests`` sent at once, then every
result collected (tasks/s).  Each measurement is repeated ``--rounds`` times,
the modes interleaved, and the best round kept for each (least disturbed by
the rest of the machine).  Results go to docs/dispatcher.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Servers of our own, away from a developer's (6379/8848) and the tests' (16399/18848).
os.environ.setdefault("GPU_DISPATCH_BROKER_URL", "redis://127.0.0.1:16499/0")
os.environ.setdefault("GPU_DISPATCH_RESULT_BACKEND", "redis://127.0.0.1:16499/1")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVER", "127.0.0.1:18858")
os.environ.setdefault("GPU_DISPATCH_NACOS_SERVICE", "gpu-inference-bench")

import celeryconfig  # noqa: E402
from gpu_dispatch_tools.processes import DISPATCHER_ENV, Supervisor, beat_argv, celery, gpu_worker_argv  # noqa: E402
from gpu_dispatch_tools.servers import local_servers  # noqa: E402

#: Settings of every process the benchmark starts: instant simulated inference, quiet logs.
PROCESS_ENV = {"GPU_DISPATCH_GPU_SOURCE": "simulated", "GPU_DISPATCH_WORKER_IP": "127.0.0.1",
               "GPU_DISPATCH_SIM_MS_PER_TOKEN": "0.001", "GPU_DISPATCH_REFRESH_INTERVAL": "2",
               "GPU_DISPATCH_METRICS_PORT": "0"}
QUEUES = ("gpu.127.0.0.1.8000", "gpu.127.0.0.1.8001")
MODES = ("plain", "producer", "central")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per measurement (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the best kept (default 3)")
    parser.add_argument("--concurrency", type=int, default=4, help="inference slots per GPU worker (default 4)")
    parser.add_argument("--dispatcher-pool", choices=("threads", "solo"), default="threads",
                        help="pool of the dispatcher worker: threads (-c CONCURRENCY --prefetch-multiplier 8, "
                             "as deployed by default) or solo (--prefetch-multiplier 32)")
    parser.add_argument("--dispatcher-events", choices=("on", "off"), default=DISPATCHER_ENV["GPU_DISPATCH_TASK_EVENTS"],
                        help="task events of the dispatcher worker (default: off, as `gpu-dispatch dispatcher` runs it)")
    options = parser.parse_args()

    servers = local_servers(celeryconfig)
    started = [s for s in servers if not s.answering()]
    for server in started:
        print(server.start(timeout=120))
    supervisor = Supervisor(Path(celeryconfig.home) / "bench-logs")
    try:
        run(supervisor, options)
    finally:
        supervisor.stop_all()
        for server in reversed(started):
            print(server.stop())


def run(supervisor: Supervisor, options: argparse.Namespace) -> None:
    from dispatcher import dispatch_inference, view as views
    from gpu_dispatch.celery import app

    for gpu in (0, 1):
        supervisor.start(f"gpu{gpu}", gpu_worker_argv(gpu, options.concurrency, f"bench-gpu{gpu}@%h", "warning"),
                         PROCESS_ENV)
    supervisor.start("beat", beat_argv(str(Path(celeryconfig.home) / "bench-logs" / "beat.schedule"), "warning"),
                     PROCESS_ENV)
    pool = (["--pool", "threads", "--concurrency", str(options.concurrency), "--prefetch-multiplier", "8"]
            if options.dispatcher_pool == "threads" else ["--pool", "solo", "--prefetch-multiplier", "32"])
    events = {"GPU_DISPATCH_TASK_EVENTS": options.dispatcher_events}
    supervisor.start("dispatcher", celery("worker", "-Q", "dispatch", *pool, "-n", "bench-dispatcher@%h",
                                          "--loglevel", "warning"), {**PROCESS_ENV, **events})
    deadline = time.monotonic() + 60
    while True:
        view = views.current_view(app)
        if view is not None and len(view.candidates()) == 2 and len(app.control.ping(timeout=0.5)) >= 3:
            break
        if time.monotonic() > deadline or supervisor.dead():
            sys.exit(f"bench processes did not come up (dead: {supervisor.dead()}); logs in "
                     f"{supervisor.log_dir}")
        time.sleep(0.2)

    turn = [0]

    def plain():
        turn[0] += 1
        return app.send_task("run_inference", args=("bench",), kwargs={"max_tokens": 1},
                             queue=QUEUES[turn[0] % 2])

    def dispatched():
        return dispatch_inference.delay("bench", max_tokens=1)

    senders = {"plain": plain, "producer": dispatched, "central": dispatched}
    best: dict[str, dict[str, float]] = {}
    for mode in MODES:  # warm up every path (connections, the view, the dispatcher's view)
        measure(app, mode, senders[mode], 50)
    for _ in range(options.rounds):
        for mode in MODES:
            figures = measure(app, mode, senders[mode], options.requests)
            kept = best.setdefault(mode, figures)
            for name, better in (("median_ms", min), ("p99_ms", min), ("tasks_per_s", max)):
                kept[name] = better(kept[name], figures[name])
    report(best, options)


def measure(app, mode: str, send, requests: int) -> dict[str, float]:
    app.conf.dispatch_mode = "central" if mode == "central" else "producer"
    times = []
    for _ in range(requests):
        begun = time.perf_counter()
        send().get(timeout=30)
        times.append((time.perf_counter() - begun) * 1000)
    begun = time.perf_counter()
    pending = [send() for _ in range(requests)]
    for result in pending:
        result.get(timeout=60)
    elapsed = time.perf_counter() - begun
    times.sort()
    return {"median_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))],
            "tasks_per_s": requests / elapsed}


def report(best: dict[str, dict[str, float]], options: argparse.Namespace) -> None:
    plain = best["plain"]
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{options.requests} requests × {options.rounds} rounds, best round each; "
          f"2 simulated GPU workers × {options.concurrency} slots; dispatcher pool {options.dispatcher_pool}, "
          f"its task events {options.dispatcher_events}")
    print(f"{'path':<10}{'median ms':>11}{'p99 ms':>9}{'tasks/s':>9}{'median ×plain':>15}{'tasks/s ÷plain':>16}")
    for mode in MODES:
        f = best[mode]
        print(f"{mode:<10}{f['median_ms']:>11.2f}{f['p99_ms']:>9.2f}{f['tasks_per_s']:>9.0f}"
              f"{f['median_ms'] / plain['median_ms']:>15.2f}{f['tasks_per_s'] / plain['tasks_per_s']:>16.0%}")


if __name__ == "__main__":
    main()
