"""What ``GPU_DISPATCH_REPLICA_WAIT`` costs: the accept path's ledger write with and without ``WAIT``.

    python -m bench.replica_wait [--requests 2000] [--rounds 3] [--threads 8]

Starts Redis with Sentinel (:class:`gpu_dispatch_tools.servers.RedisSentinelSet`; sentinels at
``GPU_DISPATCH_BENCH_SENTINEL_PORT``, default 16903, and the two after it; data nodes 100 below)
unless it answers, and times what ``dispatcher.tasks.hand_on`` sends before a request counts as
accepted: the ledger's dispatch script in one pipelined round trip, followed by ``WAIT 1`` when
the setting asks for it — through the same Sentinel-following client the dispatchers use.

- **latency** — one write at a time (median and p99 over ``--requests``);
- **throughput** — ``--threads`` threads writing at once (writes/s).

Each is repeated ``--rounds`` times, the two modes interleaved, the best round kept.  Results go
to docs/reliability.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
import uuid

from gpu_dispatch import broker
from gpu_dispatch.ledger import Ledger
from gpu_dispatch_tools.servers import RedisSentinelSet

MASTER = "gpu-dispatch-bench"


def record(ledger: Ledger, replicas: int) -> int:
    with ledger.client.pipeline(transaction=False) as pipe:
        ledger.dispatch(uuid.uuid4().hex, "gpu.127.0.0.1.8000", 2048, {"args": ["bench"], "kwargs": {}},
                        "producer", pipe=pipe)
        if replicas:
            ledger.replicate(pipe, replicas, 200)
        return pipe.execute()[-1]


def latency(ledger: Ledger, replicas: int, n: int) -> tuple[float, float]:
    times = []
    for _ in range(n):
        begun = time.perf_counter()
        got = record(ledger, replicas)
        times.append((time.perf_counter() - begun) * 1000)
        assert not replicas or got >= replicas, f"WAIT reached {got} replicas"
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def throughput(ledger: Ledger, replicas: int, n: int, threads: int) -> float:
    per = n // threads

    def run() -> None:
        for _ in range(per):
            record(ledger, replicas)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    begun = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return per * threads / (time.perf_counter() - begun)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    options = parser.parse_args()
    first = int(os.environ.get("GPU_DISPATCH_BENCH_SENTINEL_PORT", 16903))
    url = ";".join(f"sentinel://127.0.0.1:{first + n}" for n in range(3)) + "/0"
    home = os.environ.get("GPU_DISPATCH_HOME", os.path.join(os.path.dirname(__file__), "..", ".local"))
    redis_set = RedisSentinelSet.from_url(url, MASTER, home)
    started = not redis_set.healthy()
    if started:
        print(redis_set.start(timeout=60))
    client = broker.client(url, {"master_name": MASTER})
    ledger = Ledger(client)
    best: dict[int, dict[str, float]] = {0: {}, 1: {}}
    try:
        record(ledger, 0)
        for _ in range(options.rounds):
            for replicas in (0, 1):
                median, p99 = latency(ledger, replicas, options.requests)
                rate = throughput(ledger, replicas, options.requests, options.threads)
                got = best[replicas]
                if not got or median < got["median"]:
                    got.update(median=median, p99=p99)
                got["rate"] = max(got.get("rate", 0.0), rate)
    finally:
        client.close()
        if started:
            print(redis_set.stop())
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, {options.requests} writes, best of {options.rounds} rounds, "
          f"{options.threads} threads for throughput")
    print("| accept path's ledger write | median ms | p99 ms | writes/s |\n|---|--:|--:|--:|")
    for replicas, label in ((0, "GPU_DISPATCH_REPLICA_WAIT=0 (default)"), (1, "GPU_DISPATCH_REPLICA_WAIT=1")):
        got = best[replicas]
        print(f"| {label} | {got['median']:.3f} | {got['p99']:.3f} | {got['rate']:.0f} |")


if __name__ == "__main__":
    main()
