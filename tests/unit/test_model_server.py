"""Model-server tooling that needs no model: command line, the missing-extra message, start-up failures."""

from __future__ import annotations

import importlib.util
import socket
from types import SimpleNamespace

import pytest

from gpu_dispatch_tools import model_server
from gpu_dispatch_tools.model_server import ModelServer, ModelServerError, missing_extra


def test_the_command_line_is_the_llama_cpp_server_with_our_flags(tmp_path):
    server = ModelServer(38123, tmp_path / "m.gguf", tmp_path, n_ctx=512, n_threads=1)
    argv = server.argv()

    assert argv[1:3] == ["-m", "llama_cpp.server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--model"] == str(tmp_path / "m.gguf") and flags["--host"] == "127.0.0.1"
    assert (flags["--port"], flags["--n_ctx"], flags["--n_threads"]) == ("38123", "512", "1")
    assert flags["--interrupt_requests"] == "False"  # a waiting request must not cut a streamed one short
    assert flags["--logits_all"] == "False" and flags["--cache"] == "True" and flags["--cache_type"] == "ram"
    assert flags["--chat_format"] == "gemma" and flags["--model_alias"] == "gemma-3-270m"
    assert server.url == "http://127.0.0.1:38123" and server.completions_url.endswith(":38123/v1/completions")
    assert server.log_path == tmp_path / "model-servers" / "model-server-38123.log"
    assert "--cache" not in ModelServer(1, "m", tmp_path, cache_bytes=0).argv()


def test_threads_are_shared_among_the_servers_of_one_machine(tmp_path, monkeypatch):
    monkeypatch.setattr(model_server.os, "cpu_count", lambda: 8)
    assert ModelServer(1, "m", tmp_path, share=3).n_threads == 2
    assert ModelServer(1, "m", tmp_path, share=16).n_threads == 1


def test_a_missing_extra_is_reported_with_the_command_to_install_it(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(model_server.importlib.util, "find_spec",
                        lambda name: None if name == "llama_cpp" else real_find_spec(name))
    message = missing_extra()
    assert "pip install -e '.[real-model]'" in message and "llama_cpp" in message
    with pytest.raises(ModelServerError, match=r"real-model extra is not installed"):
        ModelServer(1, tmp_path / "m.gguf", tmp_path).start()
    with pytest.raises(ModelServerError, match=r"real-model extra is not installed"):
        model_server.ensure_model(tmp_path)


def test_the_gpus_server_listens_at_the_instance_port(monkeypatch, tmp_path):
    monkeypatch.setattr(model_server, "ensure_model", lambda home: tmp_path / "m.gguf")
    server = model_server.for_gpu(2, SimpleNamespace(base_port=38000, home=str(tmp_path)))
    assert (server.port, server.name, server.host) == (38002, "gpu2", "127.0.0.1")


needs_extra = pytest.mark.skipif(missing_extra() is not None, reason=str(missing_extra()))


@needs_extra
def test_start_refuses_a_port_already_in_use(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ModelServerError, match="already in use"):
            ModelServer(taken.getsockname()[1], tmp_path / "m.gguf", tmp_path).start()


@needs_extra
def test_start_refuses_a_missing_model_file(tmp_path):
    with pytest.raises(ModelServerError, match="no model file"):
        ModelServer(1, tmp_path / "absent.gguf", tmp_path).start()


@needs_extra
def test_a_server_that_exits_at_start_is_reported_with_its_log(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"not a gguf file")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ModelServer(port, tmp_path / "m.gguf", tmp_path, name="broken")
    with pytest.raises(ModelServerError, match=r"exited with status \d+ before answering; .*broken.log ends with"):
        server.start(timeout=60)
    assert not server.running()
