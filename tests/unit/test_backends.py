"""Inference backends: the simulated model, an OpenAI-compatible HTTP server, a Python callable."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers.backends import BackendError, OpenAIBackend, PythonBackend, SimulatedBackend, derive_urls
from workers.gpu import InFlight, SimulatedGpu


class ModelServer:
    """A real HTTP server on loopback that answers like an OpenAI-compatible server, as told by the test.

    ``behaviour``: ok (streams when asked to, as vLLM and llama.cpp do), json (ignores "stream"),
    slow, error, malformed, cut (dies mid-stream), not-sse-json (a stream of non-JSON events).
    """

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.requests: list[dict] = []
        self.paths: list[str] = []
        self.connections: list = []  # kept-alive ones too: close() ends them, as a dying server would
        self.metrics: tuple[int, str] = (404, '{"detail":"Not Found"}')
        self.models: tuple[int, str] = (200, json.dumps({"object": "list", "data": [{"id": "llama-7b"}]}))
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                server.connections.append(self.connection)

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.paths.append(self.path)
                status, body = server.models if self.path == "/v1/models" else \
                    server.metrics if self.path == "/metrics" else (404, "{}")
                self._send(status, body.encode(), "text/plain" if self.path == "/metrics" else "application/json")

            def do_POST(self) -> None:
                server.paths.append(self.path)
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(request)
                chat = self.path.endswith("/chat/completions")
                if server.behaviour == "slow":
                    time.sleep(2)
                if server.behaviour == "error":
                    return self._send(503, b"overloaded", "text/plain")
                if server.behaviour == "malformed":
                    return self._send(200, b"{not json")
                if not request.get("stream") or server.behaviour == "json":
                    choice = {"message": {"role": "assistant", "content": "four"}} if chat else {"text": "four"}
                    return self._send(200, json.dumps({"choices": [{**choice, "finish_reason": "length"}],
                                                       "usage": {"completion_tokens": 1}}).encode())
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                if server.behaviour == "not-sse-json":
                    self.wfile.write(b"data: <html>\n\n")
                    return
                self.wfile.write(b": ping - 2026-01-01 00:00:00\n\n")
                for i, piece in enumerate(["fo", "ur", ""]):
                    delta = {"delta": {"content": piece} if i else {"role": "assistant", "content": piece}} if chat \
                        else {"text": piece}
                    chunk = {"choices": [{"index": 0, **delta, "finish_reason": "length" if i == 2 else None}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                    if server.behaviour == "cut":
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    time.sleep(0.05)
                if request.get("stream_options", {}).get("include_usage"):
                    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
                    self.wfile.write(f"data: {json.dumps(usage)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for connection in self.connections:
            try:
                connection.shutdown(2)
            except OSError:
                pass


@pytest.fixture
def model_server():
    server = ModelServer()
    yield server
    server.close()


def openai(url: str, read_timeout: float = 5.0) -> OpenAIBackend:
    return OpenAIBackend(url, "llama-7b", connect_timeout=1.0, read_timeout=read_timeout)


def test_openai_backend_streams_the_completion_and_reports_usage_and_time_to_first_token(model_server):
    text, usage = openai(model_server.url).complete("2+2=", max_tokens=4, temperature=0.0)

    assert text == "four"
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "finish_reason", "stream_chunks")} == \
        {"prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "length", "stream_chunks": 2}
    assert 0 < usage["ttft_ms"] < usage["total_ms"]
    assert model_server.requests == [{"model": "llama-7b", "prompt": "2+2=", "max_tokens": 4, "temperature": 0.0,
                                      "stream": True, "stream_options": {"include_usage": True}}]
    assert model_server.paths == ["/v1/completions"]


def test_openai_backend_never_sends_options_meant_for_dispatch(model_server):
    openai(model_server.url).complete("hi", max_tokens=2, affinity_key="system-prompt-3")
    assert "affinity_key" not in model_server.requests[0]


def test_openai_backend_sends_messages_as_a_chat_completion_with_the_prompt_as_last_user_turn(model_server):
    system = [{"role": "system", "content": "Answer in one word."}]
    text, usage = openai(model_server.url).complete("2+2?", max_tokens=4, messages=system)

    assert (text, usage["completion_tokens"]) == ("four", 2) and "ttft_ms" in usage
    assert model_server.paths == ["/v1/chat/completions"]
    assert model_server.requests[0]["messages"] == system + [{"role": "user", "content": "2+2?"}]
    assert "prompt" not in model_server.requests[0]


def test_openai_backend_without_streaming_reads_one_json_reply(model_server):
    assert openai(model_server.url).complete("2+2=", max_tokens=4, stream=False) == \
        ("four", {"completion_tokens": 1, "finish_reason": "length", "total_ms": pytest.approx(0, abs=5000)})
    assert "stream" not in model_server.requests[0]
    text, _ = openai(model_server.url).complete("", max_tokens=4, stream=False,
                                                messages=[{"role": "user", "content": "2+2?"}])
    assert text == "four"


def test_openai_backend_takes_a_json_reply_to_a_streamed_request(model_server):
    model_server.behaviour = "json"
    text, usage = openai(model_server.url).complete("2+2=", max_tokens=4)
    assert (text, usage["completion_tokens"]) == ("four", 1) and "ttft_ms" not in usage


def test_openai_backend_refuses_messages_that_are_not_role_and_content(model_server):
    with pytest.raises(BackendError, match="messages must be a list"):
        openai(model_server.url).complete("", max_tokens=1, messages=["hi"])


def test_openai_backend_cannot_derive_a_chat_endpoint_from_an_odd_url_and_says_which_setting(model_server):
    odd = model_server.url.replace("/v1/completions", "/generate")
    with pytest.raises(BackendError, match="GPU_DISPATCH_OPENAI_URL.*does not end in /completions"):
        openai(odd).complete("", max_tokens=1, messages=[{"role": "user", "content": "hi"}])


def test_urls_of_the_server_are_derived_from_its_completions_endpoint():
    assert derive_urls("http://10.0.0.5:8001/v1/completions") == {
        "completions": "http://10.0.0.5:8001/v1/completions", "chat": "http://10.0.0.5:8001/v1/chat/completions",
        "models": "http://10.0.0.5:8001/v1/models", "metrics": "http://10.0.0.5:8001/metrics"}
    assert derive_urls("https://proxy/llm/v1/completions/")["chat"] == "https://proxy/llm/v1/chat/completions"
    assert set(derive_urls("http://h:1/generate")) == {"completions", "metrics"}


def test_openai_backend_reports_a_read_timeout_with_the_settings_to_change(model_server):
    model_server.behaviour = "slow"
    with pytest.raises(BackendError, match="did not answer in time.*GPU_DISPATCH_OPENAI_READ_TIMEOUT"):
        openai(model_server.url, read_timeout=0.3).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_server_error_with_its_status_and_body(model_server):
    model_server.behaviour = "error"
    with pytest.raises(BackendError, match="HTTP 503: overloaded"):
        openai(model_server.url).complete("hi", max_tokens=1)


@pytest.mark.parametrize("behaviour", ["malformed", "not-sse-json"])
def test_openai_backend_reports_a_reply_that_is_not_a_completion(model_server, behaviour):
    model_server.behaviour = behaviour
    with pytest.raises(BackendError, match="(not an OpenAI completion|not JSON).*GPU_DISPATCH_OPENAI_URL"):
        openai(model_server.url).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_stream_cut_short(model_server):
    model_server.behaviour = "cut"
    with pytest.raises(BackendError, match="ended the stream before the answer was complete.*GPU_DISPATCH_OPENAI_URL"):
        openai(model_server.url).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_server_that_is_not_running(model_server):
    url = model_server.url
    model_server.close()
    with pytest.raises(BackendError, match=f"cannot reach the model server at {url}.*GPU_DISPATCH_OPENAI_URL"):
        openai(url).complete("hi", max_tokens=1)


def test_openai_backend_serves_concurrent_requests_from_one_client(model_server):
    backend = openai(model_server.url)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: backend.complete(f"q{n}", max_tokens=2)[0], range(8)))
    assert answers == ["four"] * 8
    backend.close()


def test_health_is_none_while_the_server_lists_models_and_says_why_otherwise(model_server):
    backend = openai(model_server.url)
    assert backend.health() is None
    model_server.models = (200, json.dumps({"object": "list", "data": []}))
    assert "serves no model" in backend.health()
    model_server.models = (500, "boom")
    assert "answered HTTP 500: boom" in backend.health()
    model_server.models = (200, "<html>")
    assert "not an OpenAI model list" in backend.health()
    url = model_server.url
    model_server.close()
    reason = backend.health()
    assert reason.startswith(f"cannot reach the model server at {url.replace('/completions', '/models')}")
    assert "GPU_DISPATCH_OPENAI_URL" in reason


def test_signals_read_the_servers_prometheus_metrics(model_server):
    model_server.metrics = (200, 'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
                                 'vllm:num_requests_running{engine="0",model_name="m"} 1.0\n'
                                 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n')
    backend = openai(model_server.url)
    assert backend.signals() == {"model_waiting": "2", "model_running": "1", "kv_cache_used_pct": "25.0"}
    assert backend.signals_reason is None


def test_signals_are_empty_for_a_server_without_metrics_and_it_is_not_asked_again_at_once(model_server):
    backend = openai(model_server.url)
    assert backend.signals() == {} and "404" in backend.signals_reason
    assert backend.signals() == {}
    assert model_server.paths.count("/metrics") == 1


def test_signals_never_raise_when_the_server_is_gone_or_talks_nonsense(model_server):
    backend = openai(model_server.url)
    model_server.metrics = (200, "<html>hello</html>")
    assert backend.signals() == {} and "not a Prometheus text exposition" in backend.signals_reason
    model_server.close()
    assert backend.signals() == {} and "cannot read" in backend.signals_reason


def test_every_backend_has_health_signals_and_close():
    backends = [SimulatedBackend(SimulatedGpu(0, 81920, "idle", 1, InFlight()), ms_per_token=1.0),
                PythonBackend("tests.unit.sample_model:shout")]
    for backend in backends:
        assert backend.health() is None and backend.signals() == {}
        backend.close()


def test_python_backend_accepts_text_or_a_dict_with_text():
    assert PythonBackend("tests.unit.sample_model:shout").complete("abc", max_tokens=2) == ("AB", {})
    assert PythonBackend("tests.unit.sample_model:with_usage").complete("abc", max_tokens=2) == \
        ("cba", {"tokens": 3})


@pytest.mark.parametrize("spec, message", [
    ("no_colon", "is not 'module:function'"),
    ("tests.unit.no_such_module:f", "cannot load"),
    ("tests.unit.sample_model:missing", "cannot load"),
    ("tests.unit.sample_model:NOT_CALLABLE", "is not callable"),
])
def test_python_backend_refuses_a_bad_callable_spec_naming_the_setting(spec, message):
    with pytest.raises(BackendError, match=message):
        PythonBackend(spec)


def test_python_backend_refuses_a_result_that_is_neither_text_nor_a_dict_with_text():
    with pytest.raises(BackendError, match="must return a str or a dict"):
        PythonBackend("tests.unit.sample_model:wrong_type").complete("abc", max_tokens=2)


def test_simulated_backend_is_deterministic_and_slower_on_a_busier_gpu():
    slept: list[float] = []
    idle = SimulatedGpu(0, 81920, "idle", 1, InFlight())
    busy = SimulatedGpu(1, 81920, "nearly-full", 1, InFlight())

    first = SimulatedBackend(idle, ms_per_token=1.0, sleep=slept.append).complete("same prompt", max_tokens=16)
    again = SimulatedBackend(idle, ms_per_token=1.0, sleep=slept.append).complete("same prompt", max_tokens=16)
    SimulatedBackend(busy, ms_per_token=1.0, sleep=slept.append).complete("same prompt", max_tokens=16)

    assert first == again
    assert slept[2] > 2 * slept[0]
