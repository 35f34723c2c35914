"""The highly available registry: three Nacos nodes as one cluster on this machine (cluster mode,
embedded storage replicated by JRaft, auth on), started and stopped by our tooling."""

from __future__ import annotations

import time

import pytest

import celeryconfig
from gpu_dispatch.registry import Registry
from gpu_dispatch_tools.servers import NacosAuth, NacosCluster
from tests.conftest import TEST_NACOS_HA_PORT, TEST_NACOS_PORT
from tests.support import wait_until

#: Seconds within which an instance registered through one node is listed by another (Distro sync).
SYNC_DEADLINE = 15.0


@pytest.fixture
def cluster():
    nacos = NacosCluster("127.0.0.1", [TEST_NACOS_HA_PORT + 20 * i for i in range(3)], celeryconfig.home,
                         auth=NacosAuth(celeryconfig.nacos_username, celeryconfig.nacos_password))
    assert not {8848, TEST_NACOS_PORT} & set(nacos.ports), "tests never use the default or the session's Nacos ports"
    nacos.stop()  # leftovers of an interrupted run are ours
    try:
        print(nacos.start(timeout=150))
        assert all(node.pid() is not None for node in nacos.nodes), "the cluster's ports are taken by another Nacos"
        yield nacos
    finally:
        print(nacos.stop())


@pytest.mark.ha
def test_a_three_node_cluster_survives_a_killed_node_which_rejoins(cluster, service_name):
    started_at = time.monotonic()
    made: list[Registry] = []

    def through(node) -> Registry:  # a client that knows this node only
        registry = Registry.from_config(celeryconfig, nacos_server_addresses=node.address, nacos_service=service_name)
        made.append(registry)
        return registry

    def listed(registry: Registry) -> list[str]:
        return sorted(i.key for i in registry.list_instances())

    def mark(what: str) -> None:
        print(f"{time.monotonic() - started_at:6.1f} s  {what}")

    first, second, third = cluster.nodes
    try:
        owner = through(first)
        owner.register("10.6.6.1", 8000, {"gpu_index": "0"})
        for node in (second, third):
            other = through(node)
            wait_until(lambda: listed(other) == ["10.6.6.1:8000"], SYNC_DEADLINE,
                       f"the instance registered through {first.address} listed by {node.address}")

        mark("the first instance is listed by every node")
        print(third.kill())
        assert not third.answering()
        late = through(second)
        late.register("10.6.6.2", 8000, {"gpu_index": "1"})  # the two left still take registrations ...
        both = ["10.6.6.1:8000", "10.6.6.2:8000"]
        for registry in (owner, late):  # ... and serve lists
            wait_until(lambda: listed(registry) == both, SYNC_DEADLINE, "both instances listed after the kill")

        mark("both instances listed by the two nodes left")
        print(third.start(timeout=120))  # it rejoins: its own data and the others' instances come back
        mark("the killed node answers again")
        rejoined = through(third)
        wait_until(lambda: listed(rejoined) == both, SYNC_DEADLINE, f"both instances listed by {third.address}")
    finally:
        for registry in made:
            registry.close()
    mark("both instances listed by the node that rejoined")
