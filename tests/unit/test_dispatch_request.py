"""What dispatch_inference refuses at call time, before anything is queued (no servers needed)."""

from __future__ import annotations

import datetime
from types import SimpleNamespace

import pytest

from dispatcher.errors import InvalidRequest, NoGpuAvailable
from dispatcher.request import check, scoring_request
from dispatcher.tasks import backoff, waited_after
from scoring import NoEligibleGpu, Request

LIMIT = 1024
#: The settings check() reads.
CONF = SimpleNamespace(max_prompt_bytes=LIMIT, max_tokens=4096, request_memory_mb=2048)


@pytest.mark.parametrize("args, kwargs, message", [
    ((), {}, "needs a prompt"),
    (("a", "b"), {}, "one positional argument"),
    (("a",), {"prompt": "b"}, "prompt twice"),
    ((None,), {}, "must be text (str), not NoneType"),
    ((b"hi",), {}, "decode bytes first"),
    ((["hi"],), {}, "not list"),
    (("",), {}, "the prompt is empty"),
    (("\t \n",), {}, "only whitespace"),
    (("x" * (LIMIT + 1),), {}, "1.0 KiB (1025 bytes); the limit is 1.0 KiB (1024 bytes) (GPU_DISPATCH_MAX_PROMPT_BYTES)"),
    (("€" * 342,), {}, "1026 bytes"),  # 342 characters, 3 bytes each in UTF-8
    (("hi",), {"max_tokens": 0}, "max_tokens must be a whole number above 0"),
    (("hi",), {"max_tokens": 2.5}, "max_tokens"),
    (("hi",), {"max_tokens": True}, "max_tokens"),
    (("hi",), {"memory_mb": float("nan")}, "memory_mb"),
    (("hi",), {"memory_mb": "8G"}, "memory_mb"),
    (("hi",), {"model": ""}, "model must be a model name"),
    (("hi",), {"max_tokens": 4097}, "the limit is 4096 (GPU_DISPATCH_MAX_TOKENS)"),
    (("lone \ud800 surrogate",), {}, "not valid Unicode text: surrogates not allowed at character 5"),
    (("hi",), {"stop": object()}, "option stop=<object"),
    (("hi",), {"temperature": float("inf")}, "option temperature=inf cannot be sent as JSON"),
    (("hi",), {"stop": ["\udfff"]}, "option stop=['\\udfff'] cannot be sent as JSON"),
    (("x" * 1000,), {"stop": ["y" * 30]}, "the prompt and its options are 1.0 KiB (1042 bytes) together"),
])
def test_a_bad_call_is_refused_with_a_message_saying_what_is_wrong(args, kwargs, message):
    with pytest.raises(InvalidRequest) as refused:
        check(args, kwargs, {}, CONF)
    assert message in str(refused.value)


@pytest.mark.parametrize("options, message", [
    ({"queue": "gpu.10.0.0.1.8000"}, "queue= is not accepted: dispatch_inference picks the GPU queue itself"),
    ({"exchange": "x"}, "exchange= is not accepted"),
    ({"routing_key": "k"}, "routing_key= is not accepted"),
    ({"countdown": "soon"}, "countdown must be a number of seconds ≥ 0, not 'soon'"),
    ({"countdown": -1}, "countdown must be a number of seconds ≥ 0"),
    ({"eta": "tomorrow"}, "eta must be a datetime, not str"),
    ({"expires": float("nan")}, "expires must be a datetime or a number of seconds ≥ 0"),
    ({"priority": 1000}, "priority must be a whole number 0–255"),
    ({"task_id": ""}, "task_id must be a non-empty string"),
    ({"headers": {"h": object()}}, "header h=<object"),
    ({"serializer": "pickle"}, "does not take serializer"),
    ({"colour": "blue"}, "does not take colour"),
])
def test_a_bad_celery_argument_is_refused_at_delay_naming_it(options, message):
    with pytest.raises(InvalidRequest) as refused:
        check(("hi",), {}, options, CONF)
    assert message in str(refused.value)


def test_celery_arguments_a_caller_may_pass_are_accepted():
    check(("hi",), {}, {"countdown": 1.5, "eta": datetime.datetime.now(datetime.timezone.utc), "expires": 60,
                        "priority": 5, "task_id": "my-id", "headers": {"tenant": "a"}}, CONF)


def test_a_prompt_exactly_at_the_limit_is_accepted_and_the_limit_counts_utf8_bytes():
    check(("x" * LIMIT,), {}, {}, CONF)
    check(("€" * 341,), {}, {}, CONF)  # 1023 bytes
    check((), {"prompt": "by name", "max_tokens": 8, "memory_mb": 2048, "model": "llama", "temperature": 0.2},
          {}, CONF)


def test_options_become_the_scoring_request():
    assert scoring_request({}) == Request()
    assert scoring_request({"model": "llama-7b", "memory_mb": 8192, "max_tokens": 3}) == Request("llama-7b", 8192.0)


def test_the_backoff_doubles_up_to_its_cap_and_the_wait_is_the_sum():
    assert [backoff(n, 0.5, 5.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert waited_after(0, 0.5, 5.0) == 0
    assert waited_after(4, 0.5, 5.0) == 7.5
    assert backoff(10_000, 0.5, 5.0) == 5.0  # no overflow, however many retries


def test_no_gpu_available_is_a_no_eligible_gpu_rebuilt_from_its_message_alone():
    # Celery rebuilds a task's exception in the caller as cls(*args) from the JSON result.
    error = NoGpuAvailable("no eligible GPU for request (any model, 0 MB): every GPU was dropped — a: stale",
                           {"a": "stale"})
    rebuilt = type(error)(*error.args)
    assert isinstance(rebuilt, NoEligibleGpu)
    assert str(rebuilt) == str(error) and error.reasons == {"a": "stale"}


def test_a_request_that_does_not_say_memory_mb_is_taken_to_need_the_configured_default():
    assert scoring_request({}, default_memory_mb=2048) == Request(None, 2048.0)
    assert scoring_request({"memory_mb": 0}, default_memory_mb=2048) == Request(None, 0.0)
