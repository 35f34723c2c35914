"""Model-server load signals from Prometheus text: vLLM and llama.cpp samples, malformed and absent input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from workers.model_metrics import parse_exposition, signals_from_exposition

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "model_metrics"


def sample(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_vllm_v1_gives_waiting_running_and_kv_cache_percent():
    assert signals_from_exposition(sample("vllm_v1.prom")) == (
        {"model_waiting": "2", "model_running": "5", "kv_cache_used_pct": "42.5"}, None)


def test_vllm_waiting_by_reason_is_not_taken_for_waiting():
    text = sample("vllm_v1.prom").replace('vllm:num_requests_waiting{engine="0",model_name="google/gemma-3-270m-it"} 2.0',
                                          "")
    signals, reason = signals_from_exposition(text)
    assert "model_waiting" not in signals and reason is None


def test_vllm_engines_are_summed_for_counts_and_averaged_for_the_kv_cache():
    signals, reason = signals_from_exposition(sample("vllm_v1_two_engines.prom"))
    assert reason is None
    assert signals == {"model_waiting": "7", "model_running": "7", "kv_cache_used_pct": "60.0"}


def test_older_vllm_kv_cache_name_is_read():
    assert signals_from_exposition(sample("vllm_v0.prom")) == (
        {"model_waiting": "0", "model_running": "12", "kv_cache_used_pct": "88.3"}, None)


def test_the_newer_kv_cache_name_wins_when_both_are_there():
    text = sample("vllm_v1_two_engines.prom").replace(
        'vllm:gpu_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-0.6B"} 0.7',
        'vllm:gpu_cache_usage_perc{engine="1",model_name="Qwen/Qwen3-0.6B"} 0.1')
    assert signals_from_exposition(text)[0]["kv_cache_used_pct"] == "60.0"


def test_llama_cpp_server_gives_processing_and_deferred():
    assert signals_from_exposition(sample("llamacpp.prom")) == ({"model_waiting": "3", "model_running": "2"}, None)


def test_older_llama_cpp_server_also_gives_its_kv_cache_ratio():
    assert signals_from_exposition(sample("llamacpp_with_kv.prom")) == (
        {"model_waiting": "0", "model_running": "1", "kv_cache_used_pct": "18.5"}, None)


def test_labels_holding_braces_quotes_and_commas_are_parsed():
    text = ('vllm:num_requests_running{model_name="a,b} \\"c\\"",engine="0"} 3\n'
            'vllm:num_requests_running{model_name="x",engine="1"} 4 1712345678000\n')
    assert parse_exposition(text) == ({"vllm:num_requests_running": [3.0, 4.0]}, 0)


def test_nan_and_infinite_values_are_dropped():
    text = 'vllm:num_requests_waiting{engine="0"} NaN\nvllm:num_requests_waiting{engine="1"} 4\n' \
           "vllm:kv_cache_usage_perc +Inf\n"
    assert signals_from_exposition(text) == ({"model_waiting": "4"}, None)


def test_kv_cache_percent_stays_within_0_and_100():
    assert signals_from_exposition("vllm:kv_cache_usage_perc 1.7\n")[0] == {"kv_cache_used_pct": "100.0"}


@pytest.mark.parametrize("text, reason", [
    ("", "no samples"),
    ("<html><body>404 Not Found</body></html>", "malformed"),
    ('{"detail": "Not Found"}', "malformed"),
    ("# HELP only comments\n# TYPE x gauge\n", "no samples"),
    ("vllm:num_requests_waiting{engine=\"0\" 3\n", "malformed"),
    ("vllm:num_requests_waiting twelve\n", "malformed"),
])
def test_malformed_input_gives_nothing_and_a_reason(text, reason):
    signals, why = signals_from_exposition(text)
    assert signals == {} and reason in why


def test_a_metrics_page_without_model_server_metrics_gives_nothing_and_says_so():
    text = "python_gc_objects_collected_total{generation=\"0\"} 1.0\nprocess_open_fds 12.0\n"
    assert signals_from_exposition(text) == ({}, "no vllm: or llamacpp: load metrics among 2 metric name(s) "
                                                 "(not a vLLM or llama.cpp server, or its metrics are off)")


def test_input_that_is_not_text_never_raises():
    assert signals_from_exposition(b"vllm:num_requests_running 1")[0] == {}  # type: ignore[arg-type]
    assert signals_from_exposition(None)[0] == {}  # type: ignore[arg-type]


def test_a_huge_body_is_refused():
    signals, why = signals_from_exposition("x 1\n" * 2_000_000)
    assert signals == {} and "too large" in why


def test_the_signals_fit_well_within_the_metadata_budget():
    signals, _ = signals_from_exposition(sample("vllm_v1_two_engines.prom"))
    assert sum(len(k) + len(v) for k, v in signals.items()) < 80


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_never_raises(text):
    signals, why = signals_from_exposition(text)
    assert isinstance(signals, dict) and (signals or why)
    assert all(isinstance(v, str) for v in signals.values())
