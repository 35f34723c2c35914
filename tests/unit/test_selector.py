"""The incremental selector decides exactly as choose() does over the same candidates, however many of
them changed one at a time since it was built (no servers)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import Candidate, NoEligibleGpu, Request, choose, explain, parse_instance
from scoring.selector import Selector

NOW_MS = 1_700_000_000_000


def gpu(port: int, free: int, util: int, model: str = "m", age_s: float = 1.0, running: int = 0) -> Candidate:
    metadata = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": str(81920 - free),
                "memory_free_mb": str(free), "gpu_util": str(util), "concurrent_requests": "0", "model_name": model,
                "queue": f"gpu.10.0.0.1.{port}", "updated_at": str(int(NOW_MS - age_s * 1000)), "max_concurrency": "4"}
    return Candidate(parse_instance("10.0.0.1", port, metadata, now_ms=NOW_MS), running=running, running_mb=0)


_GPU = st.builds(lambda port, free, util, model, age, running: gpu(port, free, util, model, age, running),
                 st.integers(8000, 8999), st.integers(0, 81920), st.integers(0, 100), st.sampled_from(["m", "other"]),
                 st.floats(0, 30), st.integers(0, 8))


@settings(max_examples=150, deadline=None)
@given(st.lists(_GPU, min_size=1, max_size=16, unique_by=lambda c: c.state.queue),
       st.lists(st.tuples(st.integers(0, 15), st.integers(0, 6), st.integers(0, 30000)), max_size=10),
       st.sampled_from(["default", "p2c", "seed"]), st.integers(0, 30000), st.integers(0, 2**32))
def test_after_any_changes_it_decides_what_choose_decides(candidates, changes, profile, memory_mb, seed):
    request = Request(model="m", memory_mb=memory_mb)
    selector = Selector(candidates, request, profile=profile, now_ms=NOW_MS)
    current = list(candidates)
    for index, queued, queued_mb in changes:
        index %= len(current)
        changed = Candidate(current[index].state, queued, queued_mb, current[index].running, 0)
        current[index] = changed
        selector.replace(index, changed)
    try:
        expected = choose(current, request, profile=profile, rng=random.Random(seed), now_ms=NOW_MS)
    except NoEligibleGpu as error:
        with pytest.raises(NoEligibleGpu) as caught:
            selector.choose(random.Random(seed))
        assert caught.value.reasons == error.reasons
        return
    decision = selector.choose(random.Random(seed))
    assert decision.chosen is expected.chosen
    assert decision.explanation == explain(current, request, profile=profile, now_ms=NOW_MS)


def test_a_preferred_gpu_is_kept_within_the_bounded_load_as_by_choose():
    candidates = [gpu(8000, 60000, 90, running=3), gpu(8001, 60000, 0)]
    selector = Selector(candidates, Request(model="m"), now_ms=NOW_MS)
    assert selector.choose(random.Random(1), prefer="gpu.10.0.0.1.8000").chosen is candidates[0]
    swamped = Candidate(candidates[0].state, 9, 0.0, 3, 0)
    selector.replace(0, swamped)
    assert selector.choose(random.Random(1), prefer="gpu.10.0.0.1.8000").chosen is candidates[1]
