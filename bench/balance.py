"""How evenly, and how fast, each dispatch policy serves a shared GPU cluster.

Runs the simulation in :mod:`bench._sim` — which calls the real
:func:`scoring.choose` — for every policy on identical traces, at several
loads and with 1 and 4 independent dispatchers, and prints latency (mean,
p50, p99) and the share of requests that could not fit::

    python -m bench.balance            # the full run of docs/bench-balance.md (a few minutes on 2 cores)
    python -m bench.balance --quick    # one short seed, for a smoke test

Seeds are fixed, so a run reproduces exactly; the full run also draws the
plot in ``docs/img/bench-balance.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench._sim import (P2C_QUEUE, ClusterConfig, RunResult, make_trace, most_free_policy, oracle_policy,
                        profile_policy, random_policy, round_robin_policy, simulate)

#: Loads, as fractions of the cluster's estimated capacity.
LOADS = (0.5, 0.8, 0.9)
#: Numbers of independent dispatchers.
DISPATCHERS = (1, 4)
#: Seeds of the full run, each one trace per load; none was used to tune the default profile.
SEEDS = tuple(range(101, 111))
#: Seconds of arrivals per trace in the full run (``--quick``: :data:`QUICK_DURATION_S`, one seed).
DURATION_S = 7200.0
#: Seconds of arrivals per trace with ``--quick``.
QUICK_DURATION_S = 1800.0
#: Where the full run draws its plot.
PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "bench-balance.png"
#: Targets for the default profile at these loads (docs/bench-balance.md).
TARGET_LOADS = (0.8, 0.9)
#: Default's p99 may be at most this multiple of the oracle's.
TARGET_VS_ORACLE = 1.25
#: Seed profile's p99 must be at least this multiple of the default's.
TARGET_VS_SEED = 3.0

#: Policies in the order they are reported: name → description.
POLICIES = {
    "random": "any GPU, uniformly",
    "round-robin": "each dispatcher takes the GPUs in turn",
    "seed": "the seed article: free MB + idle % × 0.3 − requests × 50, roulette (scoring profile `seed`)",
    "most-free": "the GPU whose last reading showed most free memory",
    "p2c-queue": "power of two choices on the broker queue depth (counted every 0.25 s)",
    "shared-queue": "one queue every GPU worker pulls from when it has a free slot (Celery's default)",
    "oracle": "perfect fresh knowledge of every GPU; request lengths unknown (expected from the workload)",
    "clairvoyant": "the oracle, also knowing every request's length (a bound, not a policy)",
    "p2c": "scoring profile `p2c`: the default's filters and scores, power-of-two-choices picker",
    "default": "scoring profile `default`",
}


def _policy(name: str):
    return {
        "random": random_policy, "round-robin": round_robin_policy, "seed": profile_policy("seed"),
        "most-free": most_free_policy, "p2c-queue": profile_policy(P2C_QUEUE), "shared-queue": None,
        "oracle": oracle_policy(), "clairvoyant": oracle_policy(clairvoyant=True),
        "p2c": profile_policy("p2c"), "default": profile_policy("default"),
    }[name]


def _run(job: tuple[ClusterConfig, float, int, int, str]) -> tuple[tuple[float, int, str], RunResult]:
    config, load, seed, dispatchers, name = job
    result = simulate(config, make_trace(config, load, seed), _policy(name), dispatchers=dispatchers, seed=seed)
    return (load, dispatchers, name), result


def _pool(results: list[RunResult]) -> RunResult:
    latencies = sorted(x for r in results for x in r.latencies_s)
    return RunResult(latencies, sum(r.not_fit for r in results), sum(r.requests for r in results))


def run(config: ClusterConfig, seeds: tuple[int, ...], workers: int,
        console: Console) -> dict[tuple[float, int, str], list[RunResult]]:
    """Every policy × load × dispatchers × seed: each combination's results, in seed order."""
    jobs = [(config, load, seed, d, name) for load in LOADS for d in DISPATCHERS for name in POLICIES
            for seed in seeds]
    collected: dict[tuple[float, int, str], list[RunResult]] = {}
    with Progress(console=console, transient=True) as progress, ProcessPoolExecutor(workers) as pool:
        task = progress.add_task(f"{len(jobs)} simulations", total=len(jobs))
        for key, result in pool.map(_run, jobs, chunksize=2):
            collected.setdefault(key, []).append(result)
            progress.advance(task)
    return collected


def table(results: dict, load: float) -> Table:
    """One load: a row per policy, latency and not-fit share for each number of dispatchers."""
    out = Table(title=f"load {load:.0%} of capacity — latency in seconds, share of requests that could not fit",
                title_justify="left")
    out.add_column("policy", no_wrap=True)
    for d in DISPATCHERS:
        for column in ("mean", "p50", "p99", "not fit"):
            out.add_column(f"{d}d {column}", justify="right")
    for name in POLICIES:
        cells = []
        for d in DISPATCHERS:
            r = results[(load, d, name)]
            share = r.not_fit / r.requests if r.requests else math.nan
            cells += [f"{r.mean_s:.1f}", f"{r.percentile(0.5):.1f}", f"{r.percentile(0.99):.1f}", f"{share:.2%}"]
        out.add_row(name, *cells, style="bold" if name == "default" else None)
    return out


def targets(results: dict, per_seed: dict) -> list[tuple[str, bool]]:
    """Each target for the default profile, worded with its figures, and whether it was met.

    Targets are judged on the latencies pooled over all seeds; how often the
    default's p99 also beat the shared queue's seed by seed is said beside it.
    """
    lines = []
    for load in TARGET_LOADS:
        for d in DISPATCHERS:
            p99 = {name: results[(load, d, name)].percentile(0.99) for name in POLICIES}
            ours = p99["default"]
            where = f"{load:.0%} load, {d} dispatcher{'s' if d > 1 else ''}"
            pairs = list(zip(per_seed[(load, d, "default")], per_seed[(load, d, "shared-queue")]))
            wins = sum(a.percentile(0.99) <= b.percentile(0.99) for a, b in pairs)
            worst = max(a.percentile(0.99) / b.percentile(0.99) for a, b in pairs)
            lines.append((f"{where}: default p99 {ours:.1f} s ≤ shared-queue {p99['shared-queue']:.1f} s "
                          f"(seed by seed: ≤ on {wins} of {len(pairs)}, worst ratio {worst:.2f})",
                          ours <= p99["shared-queue"]))
            lines.append((f"{where}: default p99 {ours:.1f} s ≤ {TARGET_VS_ORACLE} × oracle {p99['oracle']:.1f} s "
                          f"(ratio {ours / p99['oracle']:.2f}; vs clairvoyant {ours / p99['clairvoyant']:.2f})",
                          ours <= TARGET_VS_ORACLE * p99["oracle"]))
            lines.append((f"{where}: seed p99 {p99['seed']:.1f} s ≥ {TARGET_VS_SEED:g} × default "
                          f"(ratio {p99['seed'] / ours:.1f})", p99["seed"] >= TARGET_VS_SEED * ours))
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DISPATCHERS), figsize=(12, 4.8), sharey=True)
    for ax, d in zip(axes, DISPATCHERS):
        for name in POLICIES:
            style = {"linewidth": 3.0, "color": "black"} if name == "default" else {"linewidth": 1.4}
            if name in ("oracle", "clairvoyant"):
                style["linestyle"] = "--"
            ax.plot([100 * load for load in LOADS], [results[(load, d, name)].percentile(0.99) for load in LOADS],
                    marker="o", label=name, **style)
        ax.set_yscale("log")
        ax.set_xticks([100 * load for load in LOADS])
        ax.set_xlabel("load, % of estimated capacity")
        ax.set_title(f"{d} dispatcher{'s' if d > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("p99 latency, s (log scale)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(POLICIES), fontsize=8)
    fig.suptitle("p99 latency by dispatch policy — 8 × 80 GB GPUs shared with other tenants, readings every 5 s")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"one seed of {QUICK_DURATION_S:g} s instead of {len(SEEDS)} of {DURATION_S:g} s; no plot")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="simulations run in parallel (default: one per CPU)")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"where to draw the plot (full run default: {PLOT})")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1")

    console = Console(width=max(Console().width, 110))
    seeds = SEEDS[:1] if args.quick else SEEDS
    config = replace(ClusterConfig(), duration_s=QUICK_DURATION_S if args.quick else DURATION_S,
                     warmup_s=300.0 if args.quick else ClusterConfig().warmup_s)
    console.print(f"{config.gpus} GPUs × {config.memory_total_mb // 1024} GB, readings every {config.refresh_s:g} s; "
                  f"seeds {', '.join(map(str, seeds))}; {config.duration_s:g} s of arrivals each; "
                  f"Python {platform.python_version()} on {os.cpu_count()} CPUs ({platform.machine()})")
    started = time.perf_counter()
    per_seed = run(config, seeds, args.workers, console)
    results = {key: _pool(runs) for key, runs in per_seed.items()}
    for load in LOADS:
        console.print(table(results, load))
    met = targets(results, per_seed)
    for line, ok in met:
        console.print(f"[{'green' if ok else 'red'}]{'met   ' if ok else 'MISSED'}[/] {line}")
    path = args.plot or (None if args.quick else PLOT)
    if path is not None:
        plot(results, path)
        console.print(f"plot: {path}")
    console.print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
