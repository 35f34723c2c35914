"""The pickers' frequencies match their stated probabilities (chi-square, fixed seeds).

Tolerance: each test draws a fixed number of picks from a fixed seed and
compares the observed counts with the expected ones by Pearson's chi-square
statistic.  The bound is the chi-square critical value at p = 0.001 for the
test's degrees of freedom: a correct picker exceeds it for at most 1 seed in
1,000, so with the fixed seeds here the tests are deterministic, and a picker
off by even a few percentage points fails them (each test also shows that a
wrong distribution is rejected).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from scoring import (Candidate, PowerOfTwoChoices, Profile, Request, Utilisation, WeightedRoulette, choose,
                     explain, parse_instance)

NOW_MS = 1_700_000_000_000
REQUEST = Request(model="llama-7b", memory_mb=0)
#: Picks drawn per test.
DRAWS = 20_000
#: Chi-square critical values at p = 0.001, by degrees of freedom (from the standard table,
#: e.g. NIST/SEMATECH e-Handbook 1.3.6.7.4; scipy is not a dependency).
CHI2_CRITICAL_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def chi_square(counts: Counter, expected: dict[str, float]) -> float:
    """Pearson's statistic of ``counts`` against probabilities ``expected`` (over the same keys)."""
    total = sum(counts.values())
    return sum((counts[k] - total * p) ** 2 / (total * p) for k, p in expected.items())


def assert_frequencies_match(counts: Counter, expected: dict[str, float]) -> None:
    assert set(counts) <= set(expected), "picked a candidate it should never pick"
    statistic = chi_square(counts, expected)
    critical = CHI2_CRITICAL_P001[len(expected) - 1]
    assert statistic < critical, f"chi-square {statistic:.1f} ≥ {critical} (p = 0.001): {counts} vs {expected}"
    uniform = {k: 1 / len(expected) for k in expected}
    if max(expected.values()) - min(expected.values()) > 0.05:
        assert chi_square(counts, uniform) > critical, "the test cannot tell these weights from uniform"


def seed_gpu(port: int, free_mb: float, concurrent: int = 0) -> Candidate:
    """A 100 %-busy GPU, so that its seed-article score is ``free_mb - 50 * concurrent`` exactly."""
    metadata = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": str(81920 - free_mb),
                "memory_free_mb": str(free_mb), "gpu_util": "100", "concurrent_requests": str(concurrent),
                "model_name": "llama-7b", "queue": f"gpu.{port}", "updated_at": str(NOW_MS)}
    return Candidate(parse_instance("10.0.0.1", port, metadata, now_ms=NOW_MS))


def busy_gpu(port: int, util: float) -> Candidate:
    metadata = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": "0", "memory_free_mb": "81920",
                "gpu_util": str(util), "concurrent_requests": "0", "model_name": "llama-7b",
                "queue": f"gpu.{port}", "updated_at": str(NOW_MS)}
    return Candidate(parse_instance("10.0.0.1", port, metadata, now_ms=NOW_MS))


def pick_counts(candidates: list[Candidate], profile, seed: int) -> Counter:
    rng = random.Random(seed)
    return Counter(choose(candidates, REQUEST, profile=profile, rng=rng, now_ms=NOW_MS).chosen.state.key
                   for _ in range(DRAWS))


def probabilities(candidates: list[Candidate], profile) -> dict[str, float]:
    return {r.key: r.probability for r in explain(candidates, REQUEST, profile=profile, now_ms=NOW_MS)}


def test_seed_profile_reproduces_the_articles_worked_example():
    candidates = [seed_gpu(8000, 10000), seed_gpu(8001, 5000), seed_gpu(8002, 2000)]
    stated = probabilities(candidates, "seed")
    assert [round(100 * p, 1) for p in stated.values()] == [58.8, 29.4, 11.8]
    assert stated == pytest.approx({"10.0.0.1:8000": 10 / 17, "10.0.0.1:8001": 5 / 17, "10.0.0.1:8002": 2 / 17})
    assert_frequencies_match(pick_counts(candidates, "seed", seed=1), stated)


def test_seed_profile_floors_negative_scores_at_one():
    # 0 MB free, 100 % busy, 4 requests: 0 + 0 - 200 → floored to 1, against a GPU scoring 99.
    candidates = [seed_gpu(8000, 0, concurrent=4), seed_gpu(8001, 99)]
    stated = probabilities(candidates, "seed")
    assert stated == pytest.approx({"10.0.0.1:8000": 0.01, "10.0.0.1:8001": 0.99})
    assert_frequencies_match(pick_counts(candidates, "seed", seed=2), stated)


def test_order_of_candidates_does_not_change_probabilities():
    candidates = [seed_gpu(8000, 10000), seed_gpu(8001, 5000), seed_gpu(8002, 2000), seed_gpu(8003, 1)]
    reference = probabilities(candidates, "seed")
    for order in itertools.permutations(candidates):
        assert probabilities(list(order), "seed") == pytest.approx(reference)
    assert_frequencies_match(pick_counts(list(reversed(candidates)), "seed", seed=3), reference)


def test_order_of_candidates_does_not_change_default_probabilities():
    candidates = [busy_gpu(8000, 10), busy_gpu(8001, 35), busy_gpu(8002, 50)]
    reference = probabilities(candidates, "default")
    for order in itertools.permutations(candidates):
        assert probabilities(list(order), "default") == pytest.approx(reference)


@pytest.mark.parametrize("sharpness", [0.5, 1.0, 2.0, 4.0])
def test_roulette_frequencies_match_score_to_the_sharpness(sharpness):
    profile = Profile("sharp", (), ((Utilisation(), 1.0),), WeightedRoulette(sharpness))
    candidates = [busy_gpu(8000, 10), busy_gpu(8001, 40), busy_gpu(8002, 60), busy_gpu(8003, 80)]
    idle = {"10.0.0.1:8000": 0.9, "10.0.0.1:8001": 0.6, "10.0.0.1:8002": 0.4, "10.0.0.1:8003": 0.2}
    weights = {k: v ** sharpness for k, v in idle.items()}
    expected = {k: w / sum(weights.values()) for k, w in weights.items()}
    assert probabilities(candidates, profile) == pytest.approx(expected)
    assert_frequencies_match(pick_counts(candidates, profile, seed=4), expected)


def test_all_zero_scores_fall_back_to_a_uniform_pick():
    profile = Profile("idle-only", (), ((Utilisation(), 1.0),), WeightedRoulette())
    candidates = [busy_gpu(8000 + i, 100) for i in range(4)]
    expected = {c.state.key: 0.25 for c in candidates}
    assert probabilities(candidates, profile) == pytest.approx(expected)
    assert_frequencies_match(pick_counts(candidates, profile, seed=5), expected)


def test_zero_weight_candidate_is_never_picked_by_the_roulette():
    profile = Profile("idle-only", (), ((Utilisation(), 1.0),), WeightedRoulette())
    candidates = [busy_gpu(8000, 100), busy_gpu(8001, 50), busy_gpu(8002, 100)]
    assert pick_counts(candidates, profile, seed=6) == Counter({"10.0.0.1:8001": DRAWS})


def test_power_of_two_choices_frequencies_match_its_stated_probabilities():
    profile = Profile("p2c-idle", (), ((Utilisation(), 1.0),), PowerOfTwoChoices())
    candidates = [busy_gpu(8000, 10), busy_gpu(8001, 40), busy_gpu(8002, 40), busy_gpu(8003, 80)]
    # Best wins all 3 of its pairs, the two tied ones 1 + a half, the worst none; each pair is 1 of 6.
    expected = {"10.0.0.1:8000": 3 / 6, "10.0.0.1:8001": 1.5 / 6, "10.0.0.1:8002": 1.5 / 6, "10.0.0.1:8003": 0.0}
    assert probabilities(candidates, profile) == pytest.approx(expected)
    counts = pick_counts(candidates, profile, seed=7)
    assert counts["10.0.0.1:8003"] == 0
    assert_frequencies_match(counts, {k: p for k, p in expected.items() if p > 0})


def test_one_candidate_is_picked_every_time():
    only = [seed_gpu(8000, 5)]
    assert pick_counts(only, "seed", seed=8) == Counter({"10.0.0.1:8000": DRAWS})
    assert probabilities(only, "seed") == {"10.0.0.1:8000": 1.0}
