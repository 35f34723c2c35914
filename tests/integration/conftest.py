"""Real servers for the integration tests: one Redis and one Nacos per test session.

They run on the non-default ports fixed in ``tests/conftest.py``; Nacos with auth
on, its admin being the user and session password set there, which every client
uses.  If either cannot start, the whole run fails with the reason (it never skips).
"""

from __future__ import annotations

import uuid

import pytest

import celeryconfig
from gpu_dispatch.registry import Registry
from gpu_dispatch_tools.servers import local_servers
# The dispatcher's fixtures, for every integration test.
from tests.integration.dispatch_support import central_mode, producer_view  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def servers():
    """Start Redis and Nacos for the session and stop them (and only them) at the end."""
    redis_server, nacos_server = local_servers(celeryconfig)
    started = []
    try:
        for server in (redis_server, nacos_server):
            assert server.port not in (6379, 8848), "tests must never use the default ports"
            if server is nacos_server:
                assert nacos_server.auth is not None, "the tests' Nacos runs with auth on (tests/conftest.py)"
            # Leftovers of an interrupted run are ours (same port, our pid file): restart them cleanly.
            server.stop()
            print(server.start(timeout=120))
            # Never someone else's server that happens to answer on the port (tests flush its data).
            assert server.pid() is not None, (
                f"a {server.name} this session did not start answers at {server.address}; give this run its own "
                "ports (GPU_DISPATCH_TEST_REDIS_PORT, GPU_DISPATCH_TEST_NACOS_PORT)")
            started.append(server)
        yield redis_server, nacos_server
    finally:
        # The test process's result consumer would otherwise try to reconnect to the stopped Redis.
        from gpu_dispatch.celery import app

        app.backend.result_consumer.stop()
        for server in reversed(started):
            print(server.stop())


@pytest.fixture
def service_name() -> str:
    """A Nacos service name of its own for each test, so tests never see each other's instances."""
    return f"gpu-inference-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_registry(service_name):
    """Build Registry clients on the test's own service; all are closed after the test."""
    made: list[Registry] = []

    def make(service: str | None = None) -> Registry:
        registry = Registry.from_config(celeryconfig, nacos_service=service or service_name)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        registry.close()


@pytest.fixture(autouse=True)
def clean_broker(servers):
    """Every test starts with empty broker and result databases (queues are named by ip:port)."""
    import redis

    for url in (celeryconfig.broker_url, celeryconfig.result_backend):
        redis.Redis.from_url(url).flushdb()


@pytest.fixture
def celery_processes():
    """Collects the Celery processes a test starts and stops them all afterwards, whatever happens."""
    started = []
    yield started
    for process in started:
        process.stop(timeout=15)
