"""How long one selection takes over 256 candidates, on one core.

The target is at most 50 µs per decision for 256 candidates with the ``default``
profile.  A dispatcher decides with a :class:`scoring.Selector`: built over the
candidates at each pass over the broker (four times a second), then, between
two decisions, told the one candidate that changed (the GPU it just sent to).
So "per decision" is one :meth:`Selector.replace` plus one
:meth:`Selector.choose`; a full :func:`scoring.choose` (what a build costs) is
printed beside it, and the explanation and fallbacks, computed only when asked
for, on their own::

    python -m bench.selection_speed
    python -m bench.selection_speed --candidates 8 64 256 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import timeit

from scoring import PROFILES, Candidate, Request, Selector, choose, parse_instance

#: The target: microseconds per selection of 256 candidates with the default profile.
TARGET_US = 50.0
#: Candidate counts timed by default.
SIZES = (8, 64, 256)
#: Timing rounds; the median and the best are reported.
REPEAT = 7
#: Unix ms of the simulated "now".
NOW_MS = 1_700_000_000_000


def candidates(n: int, rng: random.Random) -> list[Candidate]:
    """``n`` fresh, healthy GPUs serving one model, with varied load and dispatcher counts."""
    out = []
    for i in range(n):
        used = rng.randint(2_000, 70_000)
        metadata = {
            "gpu_index": str(i % 8), "memory_total_mb": "81920", "memory_used_mb": str(used),
            "memory_free_mb": str(81920 - used), "gpu_util": str(rng.randint(0, 100)),
            "concurrent_requests": str(rng.randint(0, 8)), "model_name": "llama-7b",
            "queue": f"gpu.10.{i // 256}.{i % 256}.{8000 + i % 8}", "updated_at": str(NOW_MS - rng.randint(0, 5000)),
            "max_concurrency": "8", "source": "simulated",
        }
        state = parse_instance(f"10.{i // 256}.{i % 256}.1", 8000 + i % 8, metadata, now_ms=NOW_MS)
        out.append(Candidate(state, rng.randint(0, 3), rng.random() * 4096, rng.randint(0, 4)))
    return out


def per_call_us(call, number: int) -> tuple[float, float]:
    """(median, best) microseconds per call over :data:`REPEAT` rounds of ``number`` calls."""
    rounds = [t / number * 1e6 for t in timeit.repeat(call, number=number, repeat=REPEAT)]
    return statistics.median(rounds), min(rounds)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.selection_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, nargs="+", default=list(SIZES), help="candidate counts to time")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the target says
    print(f"Python {platform.python_version()} on {_cpu()}, pinned to one core; "
          f"median (best) of {REPEAT} rounds, µs per call")
    request = Request(model="llama-7b", memory_mb=2048)
    rng = random.Random(1)
    print(f"{'profile':<10}{'candidates':>11}{'per decision':>18}{'full choose':>18}"
          f"{'+ explanation & fallbacks':>28}")
    verdict = True
    for profile in PROFILES:
        for n in args.candidates:
            pool = candidates(n, rng)
            number = max(200, 200_000 // max(n, 1))
            selector = Selector(pool, request, profile=profile, now_ms=NOW_MS)
            turn = [0]

            def decide() -> None:  # the GPU sent to last has one more request waiting; then decide again
                i = turn[0] = (turn[0] + 7) % n
                c = pool[i]
                selector.replace(i, Candidate(c.state, c.queued + 1, c.queued_mb + 2048, c.running, c.running_mb))
                selector.choose(rng)

            median, best = per_call_us(decide, number)
            choose_median, choose_best = per_call_us(
                lambda: choose(pool, request, profile=profile, rng=rng, now_ms=NOW_MS), max(50, number // 5))

            def full() -> None:
                decision = choose(pool, request, profile=profile, rng=rng, now_ms=NOW_MS)
                decision.explanation, decision.fallbacks  # noqa: B018 - computing them is what is timed

            full_median, full_best = per_call_us(full, max(50, number // 5))
            print(f"{profile:<10}{n:>11}{median:>11.1f} ({best:.1f}){choose_median:>11.1f} ({choose_best:.1f})"
                  f"{full_median:>18.1f} ({full_best:.1f})")
            if profile == "default" and n == 256:
                verdict = median <= TARGET_US
    if 256 in args.candidates:
        print(f"target: default profile, 256 candidates, at most {TARGET_US:g} µs per decision — "
              f"{'met' if verdict else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
