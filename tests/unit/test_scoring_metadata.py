"""parse_instance: registry metadata → GpuState, or MalformedMetadata with a reason an operator can act on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scoring import GpuState, MalformedMetadata, ScoringError, parse_instance
from scoring.state import EXTRA_KEYS, SEED_KEYS

NOW_MS = 1_700_000_000_000

#: The metadata a gpu-dispatch worker publishes (every key of DESIGN.md).
WORKER_METADATA = {
    "gpu_index": "1", "memory_total_mb": "81920", "memory_used_mb": "20480", "memory_free_mb": "61440",
    "gpu_util": "37.5", "concurrent_requests": "2", "model_name": "llama-7b", "queue": "gpu.10.0.0.7.8001",
    "worker": "gpu1@host-a", "updated_at": str(NOW_MS - 2500), "source": "nvml",
    "gpu_name": "NVIDIA A100-SXM4-80GB", "gpu_uuid": "GPU-5f1c", "max_concurrency": "8", "schema": "1",
}

#: The bare key set of the seed article's mock_gpu_http.py.
SEED_ARTICLE_METADATA = {
    "gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": "30000", "memory_free_mb": "51920",
    "gpu_util": "40", "concurrent_requests": "3", "model_name": "llama-7b-mock",
}


def parse(metadata: dict, **kwargs) -> GpuState:
    return parse_instance("10.0.0.7", 8001, metadata, now_ms=NOW_MS, **kwargs)


def reason(metadata: dict) -> str:
    with pytest.raises(MalformedMetadata) as caught:
        parse(metadata)
    assert caught.value.key == "10.0.0.7:8001"
    return caught.value.reason


def with_(**changes: str | None) -> dict:
    metadata = dict(WORKER_METADATA)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    return metadata


def test_worker_metadata_parses_into_typed_state_with_age():
    state = parse(WORKER_METADATA, healthy=True, enabled=False)
    assert state.key == "10.0.0.7:8001"
    assert (state.ip, state.port, state.queue, state.gpu_index) == ("10.0.0.7", 8001, "gpu.10.0.0.7.8001", 1)
    assert (state.memory_total_mb, state.memory_used_mb, state.memory_free_mb) == (81920, 20480, 61440)
    assert (state.gpu_util, state.concurrent_requests, state.max_concurrency) == (37.5, 2, 8)
    assert (state.model_name, state.source, state.worker) == ("llama-7b", "nvml", "gpu1@host-a")
    assert (state.gpu_name, state.gpu_uuid, state.schema) == ("NVIDIA A100-SXM4-80GB", "GPU-5f1c", "1")
    assert state.updated_at_ms == NOW_MS - 2500
    assert state.age_s(NOW_MS) == 2.5
    assert (state.healthy, state.enabled) == (True, False)


def test_seed_article_keys_plus_queue_are_enough():
    state = parse({**SEED_ARTICLE_METADATA, "queue": "gpu.10.0.0.7.8001"})
    assert state.memory_free_mb == 51920
    assert state.max_concurrency is None
    assert (state.worker, state.source, state.gpu_name) == ("", "", "")


def test_seed_article_instance_without_queue_is_rejected_as_not_ours():
    assert reason(SEED_ARTICLE_METADATA) == "no `queue` key: not a gpu-dispatch worker"


def test_reading_without_updated_at_has_unknown_age():
    state = parse(with_(updated_at=None))
    assert state.updated_at_ms is None
    assert state.age_s(NOW_MS) is None


def test_reading_stamped_slightly_in_the_future_is_zero_seconds_old():
    assert parse(with_(updated_at=str(NOW_MS + 3000))).age_s(NOW_MS) == 0.0


def test_whitespace_around_values_is_tolerated():
    assert parse(with_(gpu_util=" 12 ", queue=" gpu.a ")).gpu_util == 12.0


@pytest.mark.parametrize(("changes", "expected"), [
    ({"memory_free_mb": None}, "missing `memory_free_mb`"),
    ({"gpu_util": None}, "missing `gpu_util`"),
    ({"gpu_index": None}, "missing `gpu_index`"),
    ({"concurrent_requests": ""}, "missing `concurrent_requests`"),
    ({"model_name": None}, "missing `model_name` (the model this GPU serves)"),
    ({"gpu_util": "busy"}, "gpu_util is 'busy': not a number"),
    ({"gpu_util": "nan"}, "gpu_util is 'nan': not a finite number"),
    ({"memory_free_mb": "inf"}, "memory_free_mb is 'inf': not a finite number"),
    ({"memory_used_mb": "-5"}, "memory_used_mb is '-5': negative"),
    ({"concurrent_requests": "-1"}, "concurrent_requests is '-1': negative"),
    ({"concurrent_requests": "2.5"}, "concurrent_requests is '2.5': not a whole number"),
    ({"gpu_util": "140"}, "gpu_util is '140': absurd (above 100)"),
    ({"concurrent_requests": "1000000"}, "concurrent_requests is '1000000': absurd (above 100000)"),
    ({"memory_total_mb": "99999999999", "memory_free_mb": "0"},
     "memory_total_mb is '99999999999': absurd (above 4.1943e+06)"),
    ({"memory_total_mb": "0", "memory_used_mb": "0", "memory_free_mb": "0"},
     "memory_total_mb is 0: a GPU has memory; is NVML reading the right device?"),
    ({"memory_free_mb": "90000"}, "memory_free_mb 90000 exceeds memory_total_mb 81920"),
    ({"memory_used_mb": "60000"},
     "memory_used_mb 60000 + memory_free_mb 61440 = 121440, far from memory_total_mb 81920 (tolerance 4096 MB)"),
    ({"max_concurrency": "0"}, "max_concurrency is '0': must be at least 1"),
    ({"updated_at": "1700000000"}, "updated_at 1700000000 reads as seconds; it must be Unix milliseconds"),
    ({"updated_at": str(NOW_MS + 120_000)},
     f"updated_at is '{NOW_MS + 120_000}': lies more than 60 s in the future (reader's clock {NOW_MS}); "
     "are the hosts' clocks in sync?"),
    ({"queue": "gpu 1"}, "queue 'gpu 1' is not a usable queue name (no whitespace, at most 255 characters)"),
])
def test_malformed_value_is_rejected_with_a_reason_naming_key_and_value(changes, expected):
    assert reason(with_(**changes)) == expected


def test_small_rounding_between_used_free_and_total_is_tolerated():
    assert parse(with_(memory_used_mb="20000")).memory_used_mb == 20000


def test_very_long_value_is_quoted_shortened_in_the_reason():
    assert reason(with_(gpu_util="x" * 500)) == f"gpu_util is '{'x' * 40}…': not a number"


def test_non_string_value_is_rejected():
    assert reason(with_() | {"gpu_util": 37}) == "gpu_util is not a string (got int)"


def test_metadata_that_is_not_a_mapping_is_rejected():
    assert reason(["gpu_util"]) == "metadata is a list, not a mapping of strings"  # type: ignore[arg-type]


@pytest.mark.parametrize("port", [0, 70000, "8001", True])
def test_instance_without_a_tcp_port_is_rejected(port):
    with pytest.raises(MalformedMetadata, match="is not a TCP port"):
        parse_instance("10.0.0.7", port, WORKER_METADATA, now_ms=NOW_MS)


def test_instance_without_ip_is_rejected():
    with pytest.raises(MalformedMetadata, match="has no ip address"):
        parse_instance("", 8001, WORKER_METADATA, now_ms=NOW_MS)


def test_error_message_names_the_instance_and_the_reason():
    with pytest.raises(MalformedMetadata) as caught:
        parse(with_(gpu_util="busy"))
    assert str(caught.value) == "GPU instance 10.0.0.7:8001: gpu_util is 'busy': not a number"
    assert isinstance(caught.value, ScoringError)


_ANY_KEY = st.one_of(st.sampled_from(SEED_KEYS + EXTRA_KEYS), st.text(max_size=12))
_NUMBERISH = st.one_of(st.integers(-10, 10**14).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                       st.sampled_from(["", " ", "1e400", "0x10", "1_000", "١٢", "-0", "+5", "5."]))
_ANY_VALUE = st.one_of(st.text(max_size=30), _NUMBERISH)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_ANY_KEY, _ANY_VALUE, max_size=20))
def test_parser_raises_only_malformed_metadata_on_arbitrary_strings(metadata):
    try:
        state = parse(metadata)
    except MalformedMetadata as error:
        assert error.reason
        return
    assert 0 <= state.memory_free_mb <= state.memory_total_mb
    assert 0 <= state.gpu_util <= 100
    assert state.queue


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(SEED_KEYS + EXTRA_KEYS), _ANY_VALUE, max_size=8))
def test_parser_survives_any_mix_of_valid_and_garbage_values(changes):
    try:
        state = parse(WORKER_METADATA | changes)
    except MalformedMetadata as error:
        assert error.key == "10.0.0.7:8001" and error.reason
        return
    assert 0 <= state.memory_free_mb <= state.memory_total_mb
    assert state.concurrent_requests >= 0
    assert state.updated_at_ms is None or state.updated_at_ms <= NOW_MS + 60_000
