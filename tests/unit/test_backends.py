"""Inference backends: the simulated model, an OpenAI-compatible HTTP server, a Python callable."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers.backends import BackendError, OpenAIBackend, PythonBackend, SimulatedBackend
from workers.gpu import InFlight, SimulatedGpu


class ModelServer:
    """A real HTTP server on loopback that answers /v1/completions as told by the test."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if server.behaviour == "slow":
                    time.sleep(2)
                if server.behaviour == "error":
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                body = (b"{not json" if server.behaviour == "malformed" else
                        json.dumps({"choices": [{"text": "four"}], "usage": {"completion_tokens": 1}}).encode())
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def model_server():
    server = ModelServer()
    yield server
    server.close()


def openai(url: str, read_timeout: float = 5.0) -> OpenAIBackend:
    return OpenAIBackend(url, "llama-7b", connect_timeout=1.0, read_timeout=read_timeout)


def test_openai_backend_returns_the_servers_completion_and_sends_model_and_options(model_server):
    text, usage = openai(model_server.url).complete("2+2=", max_tokens=4, temperature=0.0)

    assert (text, usage) == ("four", {"completion_tokens": 1})
    assert model_server.requests == [{"model": "llama-7b", "prompt": "2+2=", "max_tokens": 4, "temperature": 0.0}]


def test_openai_backend_reports_a_read_timeout_with_the_settings_to_change(model_server):
    model_server.behaviour = "slow"
    with pytest.raises(BackendError, match="did not answer in time.*GPU_DISPATCH_OPENAI_READ_TIMEOUT"):
        openai(model_server.url, read_timeout=0.3).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_server_error_with_its_status_and_body(model_server):
    model_server.behaviour = "error"
    with pytest.raises(BackendError, match="HTTP 503: overloaded"):
        openai(model_server.url).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_reply_that_is_not_a_completion(model_server):
    model_server.behaviour = "malformed"
    with pytest.raises(BackendError, match="not an OpenAI completion"):
        openai(model_server.url).complete("hi", max_tokens=1)


def test_openai_backend_reports_a_server_that_is_not_running(model_server):
    url = model_server.url
    model_server.close()
    with pytest.raises(BackendError, match="cannot reach the model server.*GPU_DISPATCH_OPENAI_URL"):
        openai(url).complete("hi", max_tokens=1)


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
