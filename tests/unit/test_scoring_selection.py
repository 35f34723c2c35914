"""Filters, scorers, profiles and choose(): what is dropped and why, what is scored, what is picked."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import (PROFILES, BelowMaxConcurrency, Candidate, ExpectedWait, FreeMemory, Fresh, Healthy, InFlight,
                     InvalidParameter, MemoryFits, ModelMatches, NoEligibleGpu, PowerOfTwoChoices, Profile,
                     QueueDepth, Request, SeedFormula, Utilisation, WeightedRoulette, choose, explain,
                     get_profile, parse_instance)

NOW_MS = 1_700_000_000_000
REQUEST = Request(model="llama-7b", memory_mb=4096)


def gpu(port: int = 8000, *, free: float = 40960, total: float = 81920, util: float = 30, concurrent: int = 0,
        model: str = "llama-7b", age_s: float | None = 1.0, healthy: bool = True, enabled: bool = True,
        max_concurrency: int | None = None, held: float = 0.0, queued: int = 0, queued_mb: float = 0.0,
        running: int | None = None, running_mb: float | None = None) -> Candidate:
    """A candidate built through the real parser, as the dispatcher builds them: a reading (``free``,
    ``held`` by our own requests at the reading) and the ledger's load now."""
    metadata = {"gpu_index": str(port - 8000), "memory_total_mb": str(total), "memory_used_mb": str(total - free),
                "memory_free_mb": str(free), "gpu_util": str(util), "concurrent_requests": str(concurrent),
                "model_name": model, "queue": f"gpu.10.0.0.1.{port}", "held_mb": str(held)}
    if age_s is not None:
        metadata["updated_at"] = str(int(NOW_MS - age_s * 1000))
    if max_concurrency is not None:
        metadata["max_concurrency"] = str(max_concurrency)
    state = parse_instance("10.0.0.1", port, metadata, healthy=healthy, enabled=enabled, now_ms=NOW_MS)
    return Candidate(state, queued=queued, queued_mb=queued_mb, running=running, running_mb=running_mb)


def dropped(candidates: list[Candidate], request: Request = REQUEST, profile: str | Profile = "default"):
    return {r.key: r.dropped for r in explain(candidates, request, profile=profile, now_ms=NOW_MS)}


# -- filters ---------------------------------------------------------------------------------------------


def test_healthy_filter_drops_unhealthy_and_disabled_instances_saying_which():
    candidates = [gpu(8000), gpu(8001, healthy=False), gpu(8002, enabled=False)]
    kept = Healthy().keep(candidates, REQUEST, NOW_MS)
    assert kept == [candidates[0]]
    assert Healthy().why(candidates[1], REQUEST, NOW_MS) == "unhealthy in the registry"
    assert Healthy().why(candidates[2], REQUEST, NOW_MS) == "disabled in the registry"


def test_model_filter_drops_gpus_serving_another_model():
    candidates = [gpu(8000, model="llama-7b"), gpu(8001, model="qwen-14b")]
    assert ModelMatches().keep(candidates, REQUEST, NOW_MS) == [candidates[0]]
    assert ModelMatches().why(candidates[1], REQUEST, NOW_MS) == \
        "serves model 'qwen-14b', the request needs 'llama-7b'"


def test_model_filter_keeps_every_gpu_when_the_request_names_no_model():
    candidates = [gpu(8000, model="llama-7b"), gpu(8001, model="qwen-14b")]
    assert ModelMatches().keep(candidates, Request(), NOW_MS) == candidates


def test_memory_filter_drops_only_a_gpu_whose_other_tenants_leave_too_little_even_with_none_of_ours():
    # 2048 MB free, none of it held by us: other tenants use 79872 MB; a 4096 MB request can never fit.
    crowded = gpu(8001, free=2048)
    # 2048 MB free, but 30000 MB held by our own requests at the reading: it fits once they finish.
    busy_with_ours = gpu(8002, free=2048, held=30000)
    assert MemoryFits().keep([gpu(8000, free=8192), crowded, busy_with_ours], REQUEST, NOW_MS) == \
        [gpu(8000, free=8192), busy_with_ours]
    assert MemoryFits().why(crowded, REQUEST, NOW_MS) == \
        "needs 4096 MB; even with none of our work running it has 2048 MB (81920 MB total − 79872 MB used by " \
        "other tenants at the reading)"


def test_memory_filter_keeps_a_gpu_whose_memory_our_queued_requests_will_take_the_request_waits_there():
    filling = gpu(8000, free=8192, queued=2, queued_mb=6144)
    assert MemoryFits().keep([filling], REQUEST, NOW_MS) == [filling]


def test_memory_filter_keeps_exact_fit():
    exact = gpu(8000, free=4096)
    assert MemoryFits().keep([exact], REQUEST, NOW_MS) == [exact]


def test_free_memory_now_is_the_reading_plus_what_finished_since_less_what_started_since():
    # At the reading 10000 MB free and our requests held 20000 MB; now (ledger) they hold 5000 MB.
    assert gpu(8000, free=10000, held=20000, running=1, running_mb=5000).free_mb == 25000
    # The ledger unknown: the reading as it is.
    assert gpu(8000, free=10000, held=20000).free_mb == 10000


def test_fresh_filter_drops_readings_older_than_max_age():
    fresh, stale = gpu(8000, age_s=14.9), gpu(8001, age_s=20.0)
    assert Fresh(max_age_s=15).keep([fresh, stale], REQUEST, NOW_MS) == [fresh]
    assert Fresh(max_age_s=15).why(stale, REQUEST, NOW_MS) == "reading is 20.0 s old; the limit is 15 s (max_age_s)"


def test_fresh_filter_treats_reading_of_unknown_age_as_stale():
    unknown = gpu(8000, age_s=None)
    assert Fresh().keep([unknown], REQUEST, NOW_MS) == []
    assert Fresh().why(unknown, REQUEST, NOW_MS) == \
        "no `updated_at` in its metadata: the reading's age is unknown, so it is treated as stale"


def test_max_concurrency_filter_counts_running_and_waiting_and_passes_unknown_limits():
    full = gpu(8000, running=6, queued=2, max_concurrency=8)
    room = gpu(8001, running=6, queued=1, max_concurrency=8)
    unlimited = gpu(8002, running=500)
    assert BelowMaxConcurrency().keep([full, room, unlimited], REQUEST, NOW_MS) == [room, unlimited]
    assert BelowMaxConcurrency().why(full, REQUEST, NOW_MS) == \
        "6 running + 2 waiting = 8 in flight; max_concurrency is 8"


# -- scorers ---------------------------------------------------------------------------------------------


def test_free_memory_score_is_the_fraction_left_after_the_requests_waiting_and_this_one():
    candidates = [gpu(8000, free=40960), gpu(8001, free=40960, queued=3, queued_mb=36864), gpu(8002, free=0)]
    assert FreeMemory().scores(candidates, REQUEST) == [0.45, 0.0, 0.0]


def test_utilisation_score_is_idle_compute():
    assert Utilisation().scores([gpu(8000, util=0), gpu(8001, util=75), gpu(8002, util=100)], REQUEST) == \
        [1.0, 0.25, 0.0]


def test_in_flight_score_halves_at_half_at_counting_running_and_waiting():
    candidates = [gpu(8000, running=0), gpu(8001, running=2, queued=2), gpu(8002, concurrent=12)]
    assert InFlight(half_at=4).scores(candidates, REQUEST) == [1.0, 0.5, 0.25]


def test_queue_depth_score_halves_at_half_at():
    candidates = [gpu(8000, queued=0), gpu(8001, queued=3)]
    assert QueueDepth(half_at=3).scores(candidates, REQUEST) == [1.0, 0.5]


def test_expected_wait_is_one_where_the_request_starts_at_once():
    # A free slot, and 40960 MB left by other tenants hold the 8192 MB running and this 4096 MB request.
    assert ExpectedWait().scores([gpu(8000, running=2, running_mb=8192, max_concurrency=8)], REQUEST) == [1.0]


def test_expected_wait_counts_the_requests_ahead_in_rounds_of_the_slots():
    # 4 running and 4 waiting on 4 slots: with this one, 9 requests fill 9 / 4 rounds; it waits 1.25.
    full = gpu(8000, running=4, running_mb=4096, queued=4, queued_mb=4096, max_concurrency=4)
    assert ExpectedWait(half_at=1).scores([full], REQUEST) == [pytest.approx(1 / 2.25)]
    assert ExpectedWait(half_at=1.25).scores([full], REQUEST) == [pytest.approx(0.5)]


def test_expected_wait_counts_a_line_in_rounds_of_what_the_other_tenants_memory_lets_run_at_once():
    # Two 4096 MB requests waiting, then this one.  Other tenants leave 4096 MB: one at a time, it waits
    # 2 rounds.  They leave 40960 MB: all three run at once.
    crowded = gpu(8000, free=4096, queued=2, queued_mb=8192, max_concurrency=8)
    roomy = gpu(8001, free=40960, queued=2, queued_mb=8192, max_concurrency=8)
    assert ExpectedWait().scores([crowded, roomy], REQUEST) == [pytest.approx(1 / 3), 1.0]


def test_expected_wait_sees_a_request_wait_for_memory_our_running_requests_hold():
    # A free slot, but 30000 of the 32768 MB other tenants leave are held by one running request of ours.
    waits = gpu(8000, free=2768, held=30000, running=1, running_mb=30000, max_concurrency=8)
    assert waits.state.room_mb == 32768
    assert ExpectedWait().scores([waits], REQUEST) == [0.5]
    # Once it finished (the ledger says so before the next reading), the request starts at once.
    finished = gpu(8000, free=2768, held=30000, running=0, running_mb=0, max_concurrency=8)
    assert ExpectedWait().scores([finished], REQUEST) == [1.0]


def test_expected_wait_without_max_concurrency_is_bound_by_memory_alone():
    assert ExpectedWait().scores([gpu(8000, free=40960, running=30, running_mb=3000)], REQUEST) == [1.0]


def test_seed_formula_is_the_articles_score_floored_at_one():
    candidates = [gpu(8000, free=1000, util=40, concurrent=3), gpu(8001, free=0, util=100, concurrent=10)]
    assert SeedFormula().scores(candidates, REQUEST) == [1000 + 60 * 0.3 - 150, 1.0]


# -- choose ----------------------------------------------------------------------------------------------


def test_choose_never_returns_an_empty_pick_when_no_gpu_is_registered():
    with pytest.raises(NoEligibleGpu) as caught:
        choose([], REQUEST, now_ms=NOW_MS)
    assert str(caught.value) == \
        "no eligible GPU for request (model 'llama-7b', 4096 MB): no GPU registered in service"
    assert caught.value.reasons == {}


def test_choose_raises_listing_every_gpu_and_why_when_all_are_filtered_out():
    candidates = [gpu(8000, age_s=30), gpu(8001, model="qwen-14b"), gpu(8002, free=1024)]
    with pytest.raises(NoEligibleGpu) as caught:
        choose(candidates, REQUEST, now_ms=NOW_MS)
    assert caught.value.reasons == {
        "10.0.0.1:8000": "reading is 30.0 s old; the limit is 15 s (max_age_s)",
        "10.0.0.1:8001": "serves model 'qwen-14b', the request needs 'llama-7b'",
        "10.0.0.1:8002": "needs 4096 MB; even with none of our work running it has 1024 MB (81920 MB total − "
                         "80896 MB used by other tenants at the reading)",
    }
    for key in caught.value.reasons:
        assert key in str(caught.value)


def test_single_eligible_candidate_is_always_chosen_with_probability_one():
    only = gpu(8000)
    decision = choose([only, gpu(8001, age_s=60)], REQUEST, rng=random.Random(1), now_ms=NOW_MS)
    assert decision.chosen is only
    assert decision.fallbacks == []
    assert [(r.probability, r.dropped is None) for r in decision.explanation] == [(1.0, True), (0.0, False)]


def test_choose_never_picks_a_stale_gpu_or_one_where_the_request_does_not_fit():
    good = gpu(8003, free=8192, util=90, concurrent=7, queued=5)
    candidates = [gpu(8000, age_s=16, free=80000), gpu(8001, free=1024, util=0), good]
    rng = random.Random(7)
    assert {choose(candidates, REQUEST, rng=rng, now_ms=NOW_MS).chosen.state.key for _ in range(200)} == \
        {good.state.key}


def test_decision_explains_each_candidate_in_input_order():
    candidates = [gpu(8000, free=60000), gpu(8001, healthy=False), gpu(8002, free=20000)]
    decision = choose(candidates, REQUEST, rng=random.Random(3), now_ms=NOW_MS)
    rows = decision.as_rows()
    assert [row["key"] for row in rows] == ["10.0.0.1:8000", "10.0.0.1:8001", "10.0.0.1:8002"]
    assert rows[1] == {"key": "10.0.0.1:8001", "score": None, "probability": 0.0,
                       "dropped": "unhealthy in the registry", "chosen": False}
    assert sum(row["probability"] for row in rows) == pytest.approx(1.0)
    assert [row["chosen"] for row in rows].count(True) == 1
    assert rows[[row["chosen"] for row in rows].index(True)]["key"] == decision.chosen.state.key


def test_fallbacks_are_the_other_eligible_gpus_best_score_first():
    candidates = [gpu(8000, queued=4), gpu(8001, queued=0), gpu(8002, queued=1),
                  gpu(8003, healthy=False)]
    decision = choose(candidates, REQUEST, rng=random.Random(5), now_ms=NOW_MS)
    scores = {r.key: r.score for r in decision.explanation}
    ranked = sorted((k for k, s in scores.items() if s is not None and k != decision.chosen.state.key),
                    key=lambda k: -scores[k])
    assert [c.state.key for c in decision.fallbacks] == ranked
    assert decision.chosen not in decision.fallbacks


def test_reasons_for_dropped_candidates_are_worded_only_when_asked_for(monkeypatch):
    worded = []
    original = Fresh.why

    def counting(self, candidate, request, now_ms):
        worded.append(candidate.state.key)
        return original(self, candidate, request, now_ms)

    monkeypatch.setattr(Fresh, "why", counting)
    stale, fresh = gpu(8000, age_s=30), gpu(8001)
    decision = choose([stale, fresh], REQUEST, rng=random.Random(1), now_ms=NOW_MS)
    assert decision.chosen is fresh and worded == []
    assert decision.explanation[0].dropped == "reading is 30.0 s old; the limit is 15 s (max_age_s)"
    assert worded == [stale.state.key]
    decision.explanation  # noqa: B018 - computed once
    assert worded == [stale.state.key]


def test_explain_reports_without_raising_when_everything_is_dropped():
    assert dropped([gpu(8000, healthy=False)]) == {"10.0.0.1:8000": "unhealthy in the registry"}


def test_each_candidate_is_reported_with_the_first_filter_that_dropped_it():
    assert dropped([gpu(8000, healthy=False, age_s=99, model="other")]) == \
        {"10.0.0.1:8000": "unhealthy in the registry"}


def test_same_seed_reproduces_the_same_choices():
    candidates = [gpu(8000 + i, free=10000 * (i + 1), queued=i % 3) for i in range(6)]
    runs = [[choose(candidates, REQUEST, rng=rng, now_ms=NOW_MS).chosen.state.key for _ in range(50)]
            for rng in (random.Random(42), random.Random(42))]
    assert runs[0] == runs[1]


def test_default_prefers_the_gpu_with_less_work_queued_and_in_flight():
    idle = gpu(8000, queued=0, running=0)
    swamped = gpu(8001, queued=6, running=8)
    probabilities = {r.key: r.probability for r in explain([idle, swamped], REQUEST, now_ms=NOW_MS)}
    assert probabilities[idle.state.key] > 0.99


def test_work_sent_since_the_reading_moves_the_default_choice_away_before_the_next_reading():
    a, b = gpu(8000), gpu(8001)
    before = {r.key: r.probability for r in explain([a, b], REQUEST, now_ms=NOW_MS)}
    a.queued = 3
    after = {r.key: r.probability for r in explain([a, b], REQUEST, now_ms=NOW_MS)}
    assert before[a.state.key] == pytest.approx(0.5)
    assert after[a.state.key] < 0.1


# -- profiles --------------------------------------------------------------------------------------------


def test_named_profiles_exist_and_unknown_names_list_the_known_ones():
    assert {"default", "seed", "p2c"} <= set(PROFILES)
    assert get_profile("seed") is PROFILES["seed"]
    with pytest.raises(InvalidParameter) as caught:
        get_profile("fastest")
    assert caught.value.parameter == "profile"
    assert "choose one of default, p2c, seed" in str(caught.value)


def test_a_profile_can_be_had_with_another_reading_age_limit():
    profile = get_profile("default", 42)
    assert [f.max_age_s for f in profile.filters if isinstance(f, Fresh)] == [42.0]
    assert get_profile("seed", 42) is PROFILES["seed"]  # no freshness filter there: unchanged


def test_seed_profile_filters_on_health_only_so_stale_readings_still_count():
    stale = gpu(8000, age_s=3600, free=1000)
    assert choose([stale], REQUEST, profile="seed", now_ms=NOW_MS).chosen is stale


@pytest.mark.parametrize(("build", "parameter"), [
    (lambda: Fresh(max_age_s=0), "max_age_s"),
    (lambda: Fresh(max_age_s=float("nan")), "max_age_s"),
    (lambda: InFlight(half_at=-1), "half_at"),
    (lambda: QueueDepth(half_at="1"), "half_at"),
    (lambda: ExpectedWait(half_at=0), "half_at"),
    (lambda: ExpectedWait(half_at=float("inf")), "half_at"),
    (lambda: WeightedRoulette(sharpness=0), "sharpness"),
    (lambda: Profile("x", (), (), WeightedRoulette()), "scorers"),
    (lambda: Profile("x", (), ((FreeMemory(), -1.0),), WeightedRoulette()), "scorers"),
    (lambda: Profile("x", (), ((FreeMemory(), 0.0),), WeightedRoulette()), "scorers"),
    (lambda: Profile("x", (Fresh,), ((FreeMemory(), 1.0),), WeightedRoulette()), "filters"),
    (lambda: Profile("x", (), ((FreeMemory(), 1.0),), "roulette"), "picker"),
    (lambda: Profile("", (), ((FreeMemory(), 1.0),), WeightedRoulette()), "name"),
    (lambda: Request(memory_mb=-1), "memory_mb"),
    (lambda: Request(model=7), "model"),
])
def test_constructors_refuse_bad_parameters_naming_the_parameter(build, parameter):
    with pytest.raises(InvalidParameter) as caught:
        build()
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"{parameter}: ")
    assert isinstance(caught.value, ValueError)


def test_profile_weights_are_relative():
    halves = Profile("h", (), ((Utilisation(), 0.5), (InFlight(), 0.5)), WeightedRoulette())
    tens = Profile("t", (), ((Utilisation(), 10), (InFlight(), 10)), WeightedRoulette())
    candidates = [gpu(8000, util=20, concurrent=1), gpu(8001, util=70, concurrent=5)]
    assert [r.score for r in explain(candidates, REQUEST, profile=halves, now_ms=NOW_MS)] == \
        pytest.approx([r.score for r in explain(candidates, REQUEST, profile=tens, now_ms=NOW_MS)])


def test_profile_describes_itself_in_one_line():
    line = get_profile("default").describe()
    assert line.startswith("default: filters Healthy(), ModelMatches(), Fresh(max_age_s=15), MemoryFits()")
    assert "picker WeightedRoulette(sharpness=" in line


# -- properties ------------------------------------------------------------------------------------------

_CANDIDATE = st.builds(
    lambda port, free, held, util, concurrent, model, age, healthy, enabled, queued, queued_mb, running: gpu(
        port, free=free, held=min(held, 81920 - free), util=util, concurrent=concurrent, model=model, age_s=age,
        healthy=healthy, enabled=enabled, queued=queued, queued_mb=queued_mb, running=running,
        running_mb=None if running is None else 1000.0 * running),
    st.integers(8000, 8999), st.integers(0, 81920), st.integers(0, 81920), st.integers(0, 100),
    st.integers(0, 20), st.sampled_from(["llama-7b", "qwen-14b"]), st.one_of(st.none(), st.floats(0, 60)),
    st.booleans(), st.booleans(), st.integers(0, 10), st.floats(0, 40000), st.one_of(st.none(), st.integers(0, 30)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_CANDIDATE, max_size=12, unique_by=lambda c: c.state.key), st.sampled_from(["llama-7b", "qwen-14b", None]),
       st.integers(0, 30000), st.sampled_from(["default", "p2c"]), st.integers(0, 2**32))
def test_picker_never_picks_a_filtered_out_instance(candidates, model, memory_mb, profile, seed):
    request = Request(model=model, memory_mb=memory_mb)

    def eligible(c: Candidate) -> bool:
        s = c.state
        return (s.healthy and s.enabled and (model is None or s.model_name == model)
                and s.updated_at_ms is not None and NOW_MS - s.updated_at_ms <= 15_000
                and s.memory_total_mb - (s.memory_used_mb - s.held_mb) >= memory_mb)

    try:
        decision = choose(candidates, request, profile=profile, rng=random.Random(seed), now_ms=NOW_MS)
    except NoEligibleGpu as error:
        assert not any(eligible(c) for c in candidates)
        assert list(error.reasons) == [c.state.key for c in candidates]
        return
    assert eligible(decision.chosen)
    assert all(eligible(c) for c in decision.fallbacks)
    assert sum(r.probability for r in decision.explanation) == pytest.approx(1.0)
    assert all((r.dropped is None) == (r.score is not None) for r in decision.explanation)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20), st.floats(0.1, 64), st.integers(0, 2**32))
def test_pickers_return_an_index_in_range_with_probabilities_summing_to_one(scores, sharpness, seed):
    for picker in (WeightedRoulette(sharpness), PowerOfTwoChoices()):
        assert 0 <= picker.pick(scores, random.Random(seed)) < len(scores)
        probabilities = picker.probabilities(scores)
        assert sum(probabilities) == pytest.approx(1.0)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
