"""Routing by live state: shares follow the scores, the seed article's example, bad inputs, no GPU at all."""

from __future__ import annotations

import collections
import time

import pytest

from dispatcher import InvalidRequest, NoGpuAvailable, dispatch_inference
from gpu_dispatch import broker
from gpu_dispatch.celery import app
from gpu_dispatch.contract import METADATA_SCHEMA
from gpu_dispatch.ledger import PREFIX
from gpu_dispatch.ownership import Claim, digest
from tests.integration.dispatch_support import make_view, served_by, start_dispatcher, start_gpus, wait_for_gpus
from tests.support import wait_until

#: The seed article's worked example: free memory of three GPUs (MB), all idle, nothing running.
SEED_FREE_MB = (10000, 5000, 2000)
#: Their seed-formula scores, free_mb + (100 - 0) * 0.3 - 0 * 50, and the roulette's probabilities.
SEED_SCORES = tuple(free + 30 for free in SEED_FREE_MB)
SEED_SHARES = tuple(score / sum(SEED_SCORES) for score in SEED_SCORES)


def test_300_prompts_all_return_and_each_gpus_share_follows_its_scores_with_none_left_out(
        service_name, celery_processes, producer_view, monkeypatch):
    start_gpus(service_name, celery_processes, ["idle", "steady", "nearly-full"])
    wait_for_gpus(producer_view, 3)
    expected: collections.Counter = collections.Counter()  # Σ of each GPU's probability over the decisions
    choose = producer_view.choose

    def choose_and_note(*args, **kwargs):
        decision = choose(*args, **kwargs)
        for row in decision.as_rows():
            expected[row["key"]] += row["probability"]
        return decision

    monkeypatch.setattr(producer_view, "choose", choose_and_note)

    started = time.monotonic()
    pending = []
    for n in range(300):  # about 150 requests/s: the GPUs' readings and counts move while it runs
        # Light requests (memory_mb=0): the subject is the scores; at 150 requests/s the default memory
        # estimate would exhaust the free memory seen in one reading (that path is tested apart).
        pending.append(dispatch_inference.delay(f"prompt {n}: balance me", max_tokens=8, memory_mb=0))
        time.sleep(max(0.0, started + n / 150 - time.monotonic()))
    results = [r.get(timeout=60) for r in pending]
    elapsed = time.monotonic() - started

    assert [r["task_id"] for r in results] == [p.id for p in pending]
    observed = collections.Counter(f"127.0.0.1:{r['gpu']['port']}" for r in results)
    keys = [f"127.0.0.1:{8000 + g}" for g in range(3)]
    print(f"\n300 prompts in {elapsed:.2f} s (idle, steady, nearly-full): observed "
          f"{[observed[k] for k in keys]}, expected from the scores {[round(expected[k]) for k in keys]}")
    assert min(expected[k] for k in keys) >= 10, "premise: every GPU expects enough picks to compare"
    assert observed[keys[0]] > observed[keys[1]] > observed[keys[2]]  # the freer, the more
    for key in keys:
        assert observed[key] == pytest.approx(expected[key], abs=25)  # about 3 standard deviations


def test_the_seed_articles_worked_example_end_to_end_with_the_seed_profile(
        service_name, make_registry, celery_processes):
    # Three real GPU workers serve the queues; they register in a service of their own, while the
    # dispatcher's service holds the example's three instances, whose metadata points at those queues.
    # Each is claimed in the broker for the worker that owns its queue (as that worker would claim its
    # own instance), so the dispatcher trusts the example's exact readings.
    elsewhere = f"{service_name}-workers"
    start_gpus(elsewhere, celery_processes, ["idle", "idle", "idle"], concurrency=4, beat=False)
    client = broker.client(app.conf.broker_url)
    for gpu, free in enumerate(SEED_FREE_MB):
        queue = f"gpu.127.0.0.1.{8000 + gpu}"
        metadata = {"gpu_index": str(gpu), "memory_total_mb": "24576", "memory_used_mb": str(24576 - free),
                    "memory_free_mb": str(free), "gpu_util": "0", "concurrent_requests": "0",
                    "model_name": "llama-7b-sim", "queue": queue, "updated_at": str(int(time.time() * 1000)),
                    "schema": METADATA_SCHEMA}
        incarnation = wait_until(lambda: client.get(PREFIX + "owner:" + queue), 30, f"{queue}'s owner").decode()
        claim = Claim(incarnation, f"gpu{gpu}", queue, f"127.0.0.1:{9000 + gpu}", metadata, (digest(metadata),))
        client.set(PREFIX + "instance:" + claim.instance, claim.dumps(), px=120_000)
        make_registry().register("127.0.0.1", 9000 + gpu, metadata)
    import random
    from dispatcher import view as views
    view = make_view(service_name, dispatch_profile="seed", rng=random.Random(42))
    views.install(view)
    try:
        wait_for_gpus(view, 3)
        pending = [dispatch_inference.delay(f"seed {n}", max_tokens=1) for n in range(600)]
        shares = served_by([r.get(timeout=60) for r in pending])
    finally:
        views.install(None)
        view.close()

    observed = tuple(shares[f"gpu.127.0.0.1.{8000 + g}"] / 600 for g in range(3))
    print(f"\nseed example: expected {[round(p, 3) for p in SEED_SHARES]}, observed {[round(p, 3) for p in observed]}")
    for expected, got in zip(SEED_SHARES, observed):
        assert got == pytest.approx(expected, abs=0.06)  # 3 standard deviations at n = 600


@pytest.mark.parametrize("prompt, message", [
    (b"bytes", "must be text (str), not bytes"),
    (42, "must be text (str), not int"),
    ("", "the prompt is empty"),
    ("  \n", "empty (only whitespace)"),
    ("x" * (1048576 + 1), "GPU_DISPATCH_MAX_PROMPT_BYTES"),
    ("é" * 600000, "1.1 MiB"),
])
def test_a_prompt_that_is_not_text_is_empty_or_oversize_is_refused_at_delay_and_nothing_is_queued(prompt, message):
    import redis

    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        dispatch_inference.delay(prompt)

    assert redis.Redis.from_url(app.conf.broker_url).dbsize() == 0


def test_options_of_the_wrong_type_are_refused_at_delay():
    with pytest.raises(InvalidRequest, match="max_tokens"):
        dispatch_inference.delay("hi", max_tokens="many")
    with pytest.raises(InvalidRequest, match="memory_mb"):
        dispatch_inference.delay("hi", memory_mb=-1)
    with pytest.raises(InvalidRequest, match="model"):
        dispatch_inference.delay("hi", model=3)


def test_malformed_instances_in_the_service_are_skipped_with_their_reason_and_dispatch_goes_on(
        service_name, make_registry, celery_processes, producer_view):
    make_registry().register("10.9.9.9", 8000, {"gpu_index": "0", "memory_free_mb": "lots"})  # another team's
    make_registry().register("10.9.9.9", 8001, {"weight": "1"})  # the seed article's scripts: no queue
    start_gpus(service_name, celery_processes, ["idle"])
    wait_for_gpus(producer_view, 1)

    def excluded() -> dict[str, str]:
        return {v.instance: v.reason for v in producer_view.verdicts() if v.reason}

    wait_until(lambda: len(excluded()) == 2, 10, "both foreign instances in the view")

    results = [dispatch_inference.delay(f"p{n}", max_tokens=2).get(timeout=30) for n in range(10)]

    assert {r["gpu"]["queue"] for r in results} == {"gpu.127.0.0.1.8000"}
    assert set(excluded()) == {"10.9.9.9:8000", "10.9.9.9:8001"}
    assert all("no live gpu-dispatch worker claims" in reason for reason in excluded().values())


def test_with_no_gpu_registered_the_result_fails_with_a_typed_error_after_the_bounded_wait(
        service_name, celery_processes, producer_view):
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_NO_GPU_WAIT": "2",
                                                      "GPU_DISPATCH_NO_GPU_BACKOFF": "0.2"})
    wait_until(lambda: producer_view.heard_within(5.0), 10, "the view's first list of the (empty) service")

    started = time.monotonic()
    result = dispatch_inference.delay("anyone there?")
    with pytest.raises(NoGpuAvailable) as failure:
        result.get(timeout=30)
    waited = time.monotonic() - started

    print(f"\nfailed after {waited:.2f} s: {failure.value}")
    assert "no GPU registered" in str(failure.value) and "GPU_DISPATCH_NO_GPU_WAIT" in str(failure.value)
    # At least the configured wait; well short of the default one (30 s), with room for a busy machine.
    assert 2.0 <= waited < 20.0


def test_an_unknown_model_fails_with_the_reason_each_gpu_was_dropped(
        service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle"])
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_NO_GPU_WAIT": "1",
                                                      "GPU_DISPATCH_NO_GPU_BACKOFF": "0.2"})
    wait_for_gpus(producer_view, 1)

    with pytest.raises(NoGpuAvailable) as failure:
        dispatch_inference.delay("hi", model="gpt-imaginary").get(timeout=30)

    assert "127.0.0.1:8000" in str(failure.value) and "gpt-imaginary" in str(failure.value)


def test_a_gpu_registering_during_the_wait_takes_the_request(service_name, celery_processes, central_mode):
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_NO_GPU_WAIT": "60"})
    result = dispatch_inference.delay("wait for me", max_tokens=2)
    wait_until(lambda: result.state == "RETRY", 10, "the request to be waiting for a GPU (state RETRY)")

    start_gpus(service_name, celery_processes, ["idle"])

    assert result.get(timeout=60)["gpu"]["queue"] == "gpu.127.0.0.1.8000"


def test_requests_sharing_an_affinity_key_stay_on_one_gpu_while_balanced_and_spread_when_it_is_overloaded(
        service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle", "idle"], env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "5"})
    wait_for_gpus(producer_view, 2)

    one_at_a_time = [dispatch_inference.delay(f"turn {n}", max_tokens=4, affinity_key="conversation-1")
                     .get(timeout=30)["gpu"]["queue"] for n in range(12)]
    assert len(set(one_at_a_time)) == 1  # its prefix stays where it is cached

    burst = [dispatch_inference.delay(f"burst {n}", max_tokens=200, affinity_key="conversation-1")
             for n in range(16)]
    served = collections.Counter(r.get(timeout=90)["gpu"]["queue"] for r in burst)
    print(f"\none at a time: all on {one_at_a_time[0]}; a burst of 16 of the same prefix: {dict(served)}")
    assert len(served) == 2 and min(served.values()) >= 4  # bounded load: the other GPU takes its share


def test_calling_dispatch_inference_directly_does_what_delay_get_does(service_name, celery_processes,
                                                                       producer_view):
    start_gpus(service_name, celery_processes, ["idle"])
    wait_for_gpus(producer_view, 1)
    answer = dispatch_inference("called directly", max_tokens=2)
    assert answer["text"] and answer["gpu"]["queue"] == "gpu.127.0.0.1.8000"


def test_an_inference_over_the_time_limit_is_answered_with_an_error_and_its_late_result_discarded(
        service_name, celery_processes, producer_view):
    from dispatcher.errors import InferenceTimeLimitExceeded

    [worker] = start_gpus(service_name, celery_processes, ["idle"], env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "30"})
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_MAX_INFERENCE_SECONDS": "2"})
    wait_for_gpus(producer_view, 1)
    result = dispatch_inference.delay("slow", max_tokens=300)  # about 9 s, the limit is 2 s

    with pytest.raises(InferenceTimeLimitExceeded, match="GPU_DISPATCH_MAX_INFERENCE_SECONDS"):
        result.get(timeout=30)
    wait_until(lambda: "this outcome is discarded" in worker.log(lines=300), 30, "the late result discarded")
    assert result.state == "FAILURE"
