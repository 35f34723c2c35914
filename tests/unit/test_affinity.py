"""Prefix affinity with bounded loads (scoring.choose(prefer=...)): the preferred GPU takes the request
while it is not overloaded, and only then (no servers)."""

from __future__ import annotations

import random

from dispatcher.tasks import affinity_of
from scoring import Candidate, Request, choose, parse_instance
from scoring.decision import within_bounded_load

NOW_MS = 1_700_000_000_000


def gpu(port: int, in_flight: int = 0, free: int = 60000, util: float = 10) -> Candidate:
    metadata = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": str(81920 - free),
                "memory_free_mb": str(free), "gpu_util": str(util), "concurrent_requests": "0", "model_name": "m",
                "queue": f"gpu.10.0.0.1.{port}", "updated_at": str(NOW_MS - 500)}
    return Candidate(parse_instance("10.0.0.1", port, metadata, now_ms=NOW_MS), running=in_flight, running_mb=0)


def test_the_bound_is_the_ceiling_of_one_plus_slack_times_the_average_plus_headroom():
    assert within_bounded_load([3, 3, 3, 3], 0, 0.25, headroom=0)  # 13 / 4 × 1.25 = 4.06 → 5; 3 + 1 ≤ 5
    assert within_bounded_load([4, 3, 3, 3], 0, 0.25, headroom=0)  # 14 / 4 × 1.25 = 4.375 → 5; 4 + 1 ≤ 5
    assert not within_bounded_load([5, 3, 3, 3], 0, 0.25, headroom=0)  # 15 / 4 × 1.25 = 4.69 → 5; 6 > 5
    assert within_bounded_load([6, 3, 3, 3], 0, 0.25, headroom=2)  # 16 / 4 × 1.25 = 5 → 5 + 2; 7 ≤ 7
    assert not within_bounded_load([8, 3, 3, 3], 0, 0.25, headroom=2)  # 18 / 4 × 1.25 = 5.6 → 6 + 2; 9 > 8
    assert within_bounded_load([0], 0, 0.0)  # a single GPU always takes it


def test_the_preferred_gpu_wins_over_a_better_score_while_within_the_bound():
    busy_but_cached, idle = gpu(8000, in_flight=2, util=90), gpu(8001, in_flight=1, util=0)
    picks = {choose([busy_but_cached, idle], Request(), rng=random.Random(n), now_ms=NOW_MS,
                    prefer="gpu.10.0.0.1.8000").chosen.state.queue for n in range(50)}
    assert picks == {"gpu.10.0.0.1.8000"}


def test_an_overloaded_preferred_gpu_is_passed_over():
    swamped, idle = gpu(8000, in_flight=9), gpu(8001, in_flight=1)
    decision = choose([swamped, idle], Request(), rng=random.Random(1), now_ms=NOW_MS, prefer="gpu.10.0.0.1.8000")
    assert decision.chosen.state.queue == "gpu.10.0.0.1.8001"


def test_a_preferred_gpu_that_is_not_eligible_is_passed_over():
    crowded = gpu(8000, free=100)  # other tenants leave 100 MB: the memory filter drops it for 4096 MB
    decision = choose([crowded, gpu(8001)], Request(memory_mb=4096), rng=random.Random(1), now_ms=NOW_MS,
                      prefer="gpu.10.0.0.1.8000")
    assert decision.chosen.state.queue == "gpu.10.0.0.1.8001"


def test_the_affinity_key_is_the_callers_or_the_prompts_prefix_when_turned_on():
    assert affinity_of("hello", {}, 0) is None
    assert affinity_of("hello", {"affinity_key": "conversation-7"}, 0) == \
        affinity_of("other prompt", {"affinity_key": "conversation-7"}, 0)
    same_system = affinity_of("You are terse. Q1", {}, 14)
    assert same_system == affinity_of("You are terse. Q2", {}, 14) != affinity_of("You are verbose. Q1", {}, 14)
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    assert affinity_of("", {"messages": chat}, 100) == affinity_of("", {"messages": chat[:1] + [{"role": "user",
                                                                                              "content": "yo"}]}, 100)
