"""The libraries whose internals we rely on are the versions we tested, and those internals are still there.

When one of these fails after an upgrade, read the module it names before widening the range in
pyproject.toml: each workaround says which upstream behaviour it depends on.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import celery
import kombu
import pytest
from celery.worker.consumer import Consumer
from kombu.transport import TRANSPORT_ALIASES, redis as kombu_redis, virtual

from gpu_dispatch.kombu_redis import TESTED_KOMBU, kombu_version


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_the_tested_versions_are_installed():
    assert kombu_version() in TESTED_KOMBU, f"kombu {kombu.__version__}: gpu_dispatch/kombu_redis.py and " \
                                            "gpu_dispatch/transport.py were tested with 5.7 only"
    assert celery.VERSION[:2] == (5, 7), f"celery {celery.__version__}: gpu_dispatch/consumer.py, workers/steps.py"
    assert version("nacos-sdk-python").startswith("3.2."), "gpu_dispatch/registry.py works around 3.2.0"


def test_what_gpu_dispatch_transport_overrides_is_still_kombus():
    channel = kombu_redis.Channel
    assert params(channel._connparams) == ["self", "asynchronous"]
    assert params(channel._brpop_read) == ["self", "options"]
    assert "parse_response" in inspect.getsource(channel._brpop_read)  # the raw entry we capture
    assert params(kombu_redis.SentinelChannel._sentinel_managed_pool) == ["self", "asynchronous"]
    assert params(virtual.Transport._deliver) == ["self", "message", "queue"]
    assert TRANSPORT_ALIASES["redis"] and TRANSPORT_ALIASES["sentinel"]


def test_what_the_kombu_adapter_reads_is_still_there():
    channel = kombu_redis.Channel
    assert (channel.sep, channel.unacked_key, channel.unacked_index_key) == ("\x06\x16", "unacked", "unacked_index")
    assert channel.priority_steps == [0, 3, 6, 9]
    assert "conn_or_acquire" in dir(channel)
    assert params(kombu_redis.QoS.restore_by_tag) == ["self", "tag", "client", "leftmost"]
    assert params(kombu_redis.QoS.reject) == ["self", "delivery_tag", "requeue"]
    assert "f\"{queue}{self.sep}{pri}\"" in inspect.getsource(channel._q_for_pri)  # our list_keys


@pytest.mark.parametrize("name, arguments", [
    ("on_decode_error", ["self", "message", "exc"]),
    ("on_unknown_message", ["self", "body", "message"]),
    ("on_unknown_task", ["self", "body", "message", "exc"]),
    ("on_invalid_task", ["self", "body", "message", "exc"]),
])
def test_the_consumer_hooks_gpu_dispatch_consumer_extends_are_still_celerys(name, arguments):
    assert params(getattr(Consumer, name)) == arguments


def test_the_nacos_sdk_internals_the_registry_uses_are_still_there():
    from v2.nacos import ClientConfigBuilder, NacosNamingService
    from v2.nacos.naming.model.instance import Instance

    config = ClientConfigBuilder().server_address("127.0.0.1:1").build()
    for attribute in ("update_cache_when_empty", "load_cache_at_start", "timeout_ms", "server_list"):
        assert hasattr(config, attribute), attribute
    assert hasattr(config.grpc_config, "port_offset") and hasattr(config.grpc_config, "grpc_timeout")
    assert "grpc_client_proxy" in inspect.getsource(NacosNamingService)
    assert {"clusterName", "weight", "enabled", "healthy", "metadata"} <= set(Instance.model_fields)


def test_the_consumer_steps_gpu_dispatch_consumer_leaves_out_are_still_celerys_and_only_those_go():
    from gpu_dispatch.consumer import LEFT_OUT_STEPS, Consumer as Ours

    celerys = Consumer.Blueprint.default_steps
    assert set(LEFT_OUT_STEPS) <= set(celerys), "Celery renamed a step gpu_dispatch/consumer.py leaves out"
    assert Ours.Blueprint.default_steps == [step for step in celerys if step not in LEFT_OUT_STEPS]
    assert Ours.Blueprint.name == Consumer.Blueprint.name
