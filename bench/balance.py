"""How fast, and how reliably, each dispatch policy serves a shared GPU cluster.

Runs the simulation in :mod:`bench._sim` — whose dispatchers call the real
:func:`scoring.choose` on what a dispatcher really knows — for every policy
on identical traces: three workload families, readings every 1 s and 5 s,
8 and 32 GPUs, 1 and 4 dispatchers, 70/85/95 % load.  It prints a table per
trace, pooled tables, the failures (``NoGpuAvailable``, of which false,
could not fit, hand-backs) and whether the ``default`` profile meets its
targets::

    python -m bench.balance --workers 2     # the full run of docs/bench-balance.md (about 10 minutes on 2 cores)
    python -m bench.balance --quick         # one seed, 85 % load, short traces: a smoke test

p99 is over every counted request, a failed one counting as infinitely late
(so a policy that fails more than 1 % has p99 = inf); the mean is over the
completed requests, and the failures are reported beside it.

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
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench._sim import (FAMILIES, OraclePolicy, Policy, ProfilePolicy, PullPolicy, RandomPolicy, RoundRobinPolicy,
                        RunResult, Trace, make_trace, simulate)

#: Workload families, in the order they are reported (see :data:`bench._sim.FAMILIES`).
FAMILY_NAMES = ("short", "short-tail", "long")
#: Seconds between a GPU's metadata readings.
REFRESHES = (1.0, 5.0)
#: Numbers of GPUs.
GPU_COUNTS = (8, 32)
#: Numbers of independent dispatchers.
DISPATCHERS = (1, 4)
#: Loads, as fractions of the cluster's estimated capacity.
LOADS = (0.70, 0.85, 0.95)
#: Seeds of the full run.  The default profile was tuned on seeds 1–3 only; these are held out.
SEEDS = (101, 102, 103)
#: Seconds of arrivals per trace, by family and GPU count (32 GPUs see 4 × the requests per second).
DURATION_S = {"short": {8: 1000.0, 32: 500.0}, "short-tail": {8: 1000.0, 32: 500.0},
              "long": {8: 4800.0, 32: 2400.0}}
#: ``--quick``: one seed, one load, these durations and warm-ups.
QUICK_LOADS = (0.85,)
QUICK_DURATION_S = {"short": {8: 300.0, 32: 180.0}, "short-tail": {8: 300.0, 32: 180.0},
                    "long": {8: 1200.0, 32: 600.0}}
QUICK_WARMUP_S = {"short": 60.0, "short-tail": 60.0, "long": 300.0}
#: Where the full run draws its plot.
PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "bench-balance.png"
#: The refresh period at which the latency targets against pull and the clairvoyant oracle hold.
TARGET_REFRESH = 5.0
#: Default's p99 may be at most this multiple of the clairvoyant oracle's.
TARGET_VS_CLAIRVOYANT = 1.25

#: Policies in the order they are reported: name → description.
POLICIES = {
    "random": "any GPU, uniformly",
    "round-robin": "each dispatcher takes the GPUs in turn",
    "seed": "the seed article: free MB + idle % × 0.3 − requests × 50, roulette (scoring profile `seed`)",
    "pull4": "one shared queue; each GPU's worker pulls when one of its 4 slots is free (blind to memory)",
    "pull8": "the same with 8 slots (Celery's default: one queue)",
    "clairvoyant": "join the shortest expected delay with true state and true request lengths (a bound)",
    "oracle": "the same, request lengths unknown (expected from the workload)",
    "p2c": "scoring profile `p2c`: the default's filters and scores, power-of-two-choices picker",
    "default": "scoring profile `default`",
}
#: What each policy's result depends on besides the trace: the others give the same run whatever
#: the refresh period and the number of dispatchers, so each is run once per trace and reused.
DEPENDS = {"random": (), "round-robin": ("dispatchers",), "seed": ("refresh", "dispatchers"), "pull4": (),
           "pull8": (), "clairvoyant": (), "oracle": (), "p2c": ("refresh", "dispatchers"),
           "default": ("refresh", "dispatchers")}
#: Short names for narrow columns.
SHORT = {"random": "rand", "round-robin": "rr", "seed": "seed", "pull4": "pull4", "pull8": "pull8",
         "clairvoyant": "clairv", "oracle": "oracle", "p2c": "p2c", "default": "default"}

TraceKey = tuple[str, int, float, int]  # family, GPUs, load, seed
RunKey = tuple[str, int, float, int, float, int, str]  # ... refresh, dispatchers, policy


def _policy(name: str) -> Policy:
    return {"random": RandomPolicy, "round-robin": RoundRobinPolicy, "seed": lambda: ProfilePolicy("seed"),
            "pull4": lambda: PullPolicy(4), "pull8": lambda: PullPolicy(8),
            "clairvoyant": lambda: OraclePolicy(clairvoyant=True), "oracle": OraclePolicy,
            "p2c": lambda: ProfilePolicy("p2c"), "default": lambda: ProfilePolicy("default")}[name]()


def _config(family: str, gpus: int, refresh: float, quick: bool):
    durations = QUICK_DURATION_S if quick else DURATION_S
    more = {"warmup_s": QUICK_WARMUP_S[family]} if quick else {}
    return FAMILIES[family].config(gpus=gpus, refresh_s=refresh, duration_s=durations[family][gpus], **more)


_traces: dict[TraceKey, Trace] = {}


def _run(job: tuple[TraceKey, str, list[tuple[float, int]], bool]) -> list[tuple[RunKey, RunResult]]:
    """One policy on one trace, at each (refresh, dispatchers) given."""
    (family, gpus, load, seed), name, settings, quick = job
    key = (family, gpus, load, seed)
    if key not in _traces:
        _traces.clear()  # jobs come grouped by trace
        _traces[key] = make_trace(_config(family, gpus, REFRESHES[0], quick), load, seed)
    out = []
    for refresh, dispatchers in settings:
        result = simulate(_config(family, gpus, refresh, quick), _traces[key], _policy(name),
                          dispatchers=dispatchers, seed=seed)
        out.append(((family, gpus, load, seed, refresh, dispatchers, name), result))
    return out


def run(seeds: tuple[int, ...], loads: tuple[float, ...], quick: bool, workers: int,
        console: Console) -> dict[RunKey, RunResult]:
    """Every policy × family × GPUs × load × seed × refresh × dispatchers, each (family, …, policy) → result.

    A policy that does not depend on the refresh period or the number of
    dispatchers (:data:`DEPENDS`) is run once per trace; its result is filed
    under every setting.
    """
    jobs = []
    for family in FAMILY_NAMES:
        for gpus in GPU_COUNTS:
            for load in loads:
                for seed in seeds:
                    for name in POLICIES:
                        depends = DEPENDS[name]
                        settings = sorted({(r if "refresh" in depends else REFRESHES[0],
                                            d if "dispatchers" in depends else DISPATCHERS[0])
                                           for r in REFRESHES for d in DISPATCHERS})
                        jobs.append(((family, gpus, load, seed), name, settings, quick))
    results: dict[RunKey, RunResult] = {}
    total = sum(len(j[2]) for j in jobs)
    with Progress(console=console, transient=True) as progress, ProcessPoolExecutor(workers) as pool:
        task = progress.add_task(f"{total} simulations", total=total)
        for batch in pool.map(_run, jobs, chunksize=3):
            for key, result in batch:
                results[key] = result
            progress.advance(task, len(batch))
    for (family, gpus, load, seed, _, _, name) in list(results):
        depends = DEPENDS[name]
        for r in REFRESHES:
            for d in DISPATCHERS:
                source = (family, gpus, load, seed, r if "refresh" in depends else REFRESHES[0],
                          d if "dispatchers" in depends else DISPATCHERS[0], name)
                results.setdefault((family, gpus, load, seed, r, d, name), results[source])
    return results


# -- reporting -----------------------------------------------------------------------------------------------


def _s(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.1f}"


def _pull_best(results: dict, key: tuple, what: str) -> float:
    values = [results[(*key, p)] for p in ("pull4", "pull8")]
    return min(r.percentile(0.99) if what == "p99" else r.mean_s for r in values)


def per_trace_table(results: dict, family: str, seeds: tuple[int, ...], loads: tuple[float, ...]) -> Table:
    """One row per trace and setting: every policy's p99, the means of default and the better pull, failures."""
    out = Table(title=f"{family}: {FAMILIES[family].description} — per trace; p99 latency in s "
                      f"(failures count as infinite), mean over completed requests", title_justify="left")
    for column in ("GPUs", "load", "seed", "R s", "disp"):
        out.add_column(column, justify="right")
    for name in POLICIES:
        out.add_column(f"{SHORT[name]} p99", justify="right")
    out.add_column("default mean", justify="right")
    out.add_column("pull mean", justify="right")
    out.add_column("default no-GPU/false/cnf/hand-backs", justify="right")
    for gpus in GPU_COUNTS:
        for load in loads:
            for seed in seeds:
                for refresh in REFRESHES:
                    for d in DISPATCHERS:
                        key = (family, gpus, load, seed, refresh, d)
                        ours = results[(*key, "default")]
                        out.add_row(str(gpus), f"{load:.0%}", str(seed), f"{refresh:g}", str(d),
                                    *[_s(results[(*key, n)].percentile(0.99)) for n in POLICIES],
                                    f"{ours.mean_s:.2f}", f"{_pull_best(results, key, 'mean'):.2f}",
                                    f"{ours.no_gpu}/{ours.false_no_gpu}/{ours.could_not_fit}/{ours.handbacks}")
    return out


def pooled(results: dict, family: str, gpus: int, load: float, refresh: float, d: int | None, name: str,
           seeds: tuple[int, ...]) -> RunResult:
    """``name``'s results over the seeds (and both dispatcher counts when ``d`` is None), pooled."""
    ds = DISPATCHERS if d is None else (d,)
    return RunResult.pooled([results[(family, gpus, load, s, refresh, x, name)] for s in seeds for x in ds])


def pooled_table(results: dict, family: str, refresh: float, seeds: tuple[int, ...],
                 loads: tuple[float, ...]) -> Table:
    out = Table(title=f"{family}, readings every {refresh:g} s — pooled over seeds and 1 and 4 dispatchers: "
                      "p99 / mean latency, s", title_justify="left")
    out.add_column("policy", no_wrap=True)
    for gpus in GPU_COUNTS:
        for load in loads:
            out.add_column(f"{gpus} GPUs {load:.0%}", justify="right")
    for name in POLICIES:
        cells = []
        for gpus in GPU_COUNTS:
            for load in loads:
                r = pooled(results, family, gpus, load, refresh, None, name, seeds)
                cells.append(f"{_s(r.percentile(0.99))} / {r.mean_s:.1f}")
        out.add_row(name, *cells, style="bold" if name == "default" else None)
    return out


def failures_table(results: dict) -> Table:
    """Every policy's failures, summed over its distinct runs, per family."""
    out = Table(title="failures over all runs (requests after warm-up): NoGpuAvailable / of which false "
                      "(some GPU could hold it) / could not fit / hand-backs; requests counted",
                title_justify="left")
    out.add_column("policy", no_wrap=True)
    for family in FAMILY_NAMES:
        out.add_column(family, justify="right")
    seen: set[int] = set()
    sums: dict = defaultdict(lambda: [0, 0, 0, 0, 0])
    for (family, *_, name), r in results.items():
        if id(r) in seen:  # a result filed under several settings counts once
            continue
        seen.add(id(r))
        s = sums[(family, name)]
        for i, v in enumerate((r.no_gpu, r.false_no_gpu, r.could_not_fit, r.handbacks, r.requests)):
            s[i] += v
    for name in POLICIES:
        out.add_row(name, *["{} / {} / {} / {}; {:,}".format(*sums[(f, name)]) if (f, name) in sums else "–"
                            for f in FAMILY_NAMES], style="bold" if name == "default" else None)
    return out


# -- targets -------------------------------------------------------------------------------------------------

#: The targets: name → wording.
TARGETS = {
    "false-no-gpu": "no NoGpuAvailable while some GPU could hold the request",
    "p99-vs-pull": "p99 ≤ the better of pull4 and pull8 (at readings every 5 s)",
    "p99-vs-clairvoyant": f"p99 ≤ {TARGET_VS_CLAIRVOYANT} × clairvoyant (at readings every 5 s)",
    "mean-vs-pull": "mean latency below the better pull's",
}


def judge(results: dict, seeds: tuple[int, ...], loads: tuple[float, ...]) -> list[dict]:
    """Each target in each cell (family, refresh, GPUs, dispatchers, load), judged on the seeds pooled.

    Also how many of the cell's traces meet it one by one.
    """
    cells = []
    for family in FAMILY_NAMES:
        for refresh in REFRESHES:
            for gpus in GPU_COUNTS:
                for d in DISPATCHERS:
                    for load in loads:
                        get = lambda name, s=None: (pooled(results, family, gpus, load, refresh, d, name, seeds)
                                                    if s is None else results[(family, gpus, load, s, refresh, d, name)])

                        def measures(s=None):
                            ours, p4, p8, cl = (get(n, s) for n in ("default", "pull4", "pull8", "clairvoyant"))
                            pull_p99 = min(p4.percentile(0.99), p8.percentile(0.99))
                            pull_mean = min(p4.mean_s, p8.mean_s)
                            return {
                                "false-no-gpu": (ours.false_no_gpu, ours.false_no_gpu == 0),
                                "p99-vs-pull": (ours.percentile(0.99) / pull_p99,
                                                ours.percentile(0.99) <= pull_p99),
                                "p99-vs-clairvoyant": (ours.percentile(0.99) / cl.percentile(0.99),
                                                       ours.percentile(0.99) <= TARGET_VS_CLAIRVOYANT
                                                       * cl.percentile(0.99)),
                                "mean-vs-pull": (ours.mean_s / pull_mean, ours.mean_s < pull_mean),
                            }

                        whole = measures()
                        each = [measures(s) for s in seeds]
                        for target, (value, ok) in whole.items():
                            applies = target in ("false-no-gpu", "mean-vs-pull") or refresh == TARGET_REFRESH
                            cells.append({"family": family, "refresh": refresh, "gpus": gpus, "dispatchers": d,
                                          "load": load, "target": target, "value": value, "met": ok,
                                          "applies": applies,
                                          "traces_met": sum(e[target][1] for e in each), "traces": len(each)})
    return cells


def _verdict(rows: list[dict], target: str) -> str:
    if target == "false-no-gpu":
        count = sum(r["value"] for r in rows)
        return f"{count} false NoGpuAvailable"
    worst = max(rows, key=lambda r: r["value"])
    met = sum(r["met"] for r in rows)
    traces = sum(r["traces_met"] for r in rows), sum(r["traces"] for r in rows)
    return (f"met in {met} of {len(rows)} cells (pooled seeds), on {traces[0]} of {traces[1]} traces; "
            f"worst ratio {worst['value']:.2f} ({worst['family']}, {worst['gpus']} GPUs, "
            f"{worst['dispatchers']}d, {worst['load']:.0%}, R {worst['refresh']:g} s)")


def target_lines(cells: list[dict]) -> list[tuple[str, bool]]:
    """met/MISSED per family, per refresh, per GPU count and per dispatcher count, for each target."""
    lines = []
    slices = ([("family", f) for f in FAMILY_NAMES] + [("refresh", r) for r in REFRESHES]
              + [("gpus", g) for g in GPU_COUNTS] + [("dispatchers", d) for d in DISPATCHERS])
    for target, wording in TARGETS.items():
        lines.append((f"[bold]{wording}[/]", None))
        for axis, value in slices:
            rows = [c for c in cells if c["target"] == target and c[axis] == value and c["applies"]]
            label = (f"family {value}" if axis == "family" else f"readings every {value:g} s" if axis == "refresh"
                     else f"{value} GPUs" if axis == "gpus" else f"{value} dispatcher{'s' if value > 1 else ''}")
            if not rows:
                lines.append((f"  {label}: not a target here", None))
                continue
            lines.append((f"  {label}: {_verdict(rows, target)}", all(r["met"] for r in rows)))
    return lines


def plot(results: dict, seeds: tuple[int, ...], loads: tuple[float, ...], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(GPU_COUNTS), len(FAMILY_NAMES), figsize=(15, 8.5))
    for row, gpus in enumerate(GPU_COUNTS):
        for col, family in enumerate(FAMILY_NAMES):
            ax = axes[row][col]
            for name in POLICIES:
                if name in ("random", "round-robin"):
                    continue  # orders of magnitude above the rest
                style = {"linewidth": 3.0, "color": "black"} if name == "default" else {"linewidth": 1.4}
                if name in ("oracle", "clairvoyant"):
                    style["linestyle"] = "--"
                values = [pooled(results, family, gpus, load, TARGET_REFRESH, 4, name, seeds).percentile(0.99)
                          for load in loads]
                ax.plot([100 * load for load in loads], [v if v != math.inf else float("nan") for v in values],
                        marker="o", label=name, **style)
            ax.set_yscale("log")
            ax.set_xticks([100 * load for load in loads])
            ax.set_title(f"{family}, {gpus} GPUs", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if row == len(GPU_COUNTS) - 1:
                ax.set_xlabel("load, % of estimated capacity")
            if col == 0:
                ax.set_ylabel("p99 latency, s (log)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=7, fontsize=9)
    fig.suptitle("p99 latency by dispatch policy — 80 GB GPUs shared with other tenants, readings every 5 s, "
                 "4 dispatchers (random and round-robin off the scale)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"seed {SEEDS[0]} only, {QUICK_LOADS[0]:.0%} load, short traces; no plot")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="simulations run in parallel (default: one per CPU)")
    parser.add_argument("--plot", type=Path, default=None,
                        help=f"where to draw the plot (full run default: {PLOT})")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1")

    console = Console(width=max(Console().width, 200))
    seeds = SEEDS[:1] if args.quick else SEEDS
    loads = QUICK_LOADS if args.quick else LOADS
    durations = QUICK_DURATION_S if args.quick else DURATION_S
    console.print(f"families {', '.join(FAMILY_NAMES)}; readings every {' and '.join(f'{r:g}' for r in REFRESHES)} s; "
                  f"{' and '.join(map(str, GPU_COUNTS))} GPUs × 80 GB; {' and '.join(map(str, DISPATCHERS))} "
                  f"dispatchers; loads {', '.join(f'{x:.0%}' for x in loads)}; seeds {', '.join(map(str, seeds))}; "
                  "arrivals for " + ", ".join(f"{f} {d[8]:g}/{d[32]:g} s" for f, d in durations.items())
                  + f" (8/32 GPUs); Python {platform.python_version()} on {os.cpu_count()} CPUs "
                  f"({platform.machine()}), {args.workers} workers")
    started = time.perf_counter()
    results = run(seeds, loads, args.quick, args.workers, console)
    for family in FAMILY_NAMES:
        console.print(per_trace_table(results, family, seeds, loads))
    for family in FAMILY_NAMES:
        for refresh in REFRESHES:
            console.print(pooled_table(results, family, refresh, seeds, loads))
    console.print(failures_table(results))
    console.print("[bold]Targets for `default`[/] (p99 counts failures as infinite; judged per cell — family, "
                  "refresh, GPUs, dispatchers, load — on the seeds pooled, with how many traces meet it alone)")
    for line, ok in target_lines(judge(results, seeds, loads)):
        mark = "" if ok is None else ("[green]met   [/] " if ok else "[red]MISSED[/] ")
        console.print(f"{mark}{line}")
    path = args.plot or (None if args.quick else PLOT)
    if path is not None:
        plot(results, seeds, loads, path)
        console.print(f"plot: {path}")
    console.print(f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
