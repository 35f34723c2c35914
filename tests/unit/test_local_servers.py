"""The local servers' health probes, against sockets that misbehave as a starting server can."""

from __future__ import annotations

import socket
import threading

from gpu_dispatch_tools.servers import NacosServer


def _echoing_port() -> tuple[int, threading.Thread]:
    """A port whose one connection gets its request line echoed back (not HTTP): what a Nacos node
    still starting answered once (http.client.BadStatusLine)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(4096).split(b"\r\n")[0] + b"\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def test_a_nacos_node_answering_with_something_that_is_not_http_is_not_ready_and_raises_nothing(tmp_path):
    port, server = _echoing_port()
    status, reason = NacosServer("127.0.0.1", port, tmp_path).readiness()
    server.join(5)
    assert status == 0 and "BadStatusLine" in reason, (status, reason)


def test_a_nacos_node_on_a_closed_port_is_not_ready(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, reason = NacosServer("127.0.0.1", port, tmp_path).readiness()
    assert status == 0 and reason
