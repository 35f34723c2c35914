"""The highly available registry: three Nacos nodes as one cluster on this machine (cluster mode,
embedded storage replicated by JRaft, auth on), started and stopped by our tooling — and dispatch over
it while one node is killed (``bench/faults.py``'s ``nacos-node-kill``, short form)."""

from __future__ import annotations

import time

import pytest

import celeryconfig
from gpu_dispatch.registry import Registry
from gpu_dispatch_tools.servers import NacosAuth, NacosCluster
from tests.conftest import TEST_NACOS_HA_PORT, TEST_NACOS_PORT
from tests.support import run_bench_fault, wait_until

#: Seconds within which an instance registered through one node is listed by another (Distro sync).
SYNC_DEADLINE = 15.0
#: Seconds the node-kill fault's run may take: its workers' start, 5 s of load, 30 s with a node down,
#: the node's restart (up to a minute here), 10 s more, the last outcomes.
FAULT_DEADLINE_S = 240


@pytest.fixture(scope="module")
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


@pytest.mark.ha
@pytest.mark.timeout(FAULT_DEADLINE_S + 90)
def test_one_nacos_node_of_three_killed_mid_load_loses_nothing_and_fails_nothing(cluster, service_name):
    """Every worker and the dispatcher know all three nodes; one is killed (kill -9) mid-load and
    started 30 s later.  The clients move to the nodes left: no request lost, none refused, no
    NoGpuAvailable (the GPUs were healthy throughout), no worker exited."""
    row = run_bench_fault("nacos-node-kill", {"GPU_DISPATCH_NACOS_SERVER": cluster.addresses,
                                              "GPU_DISPATCH_NACOS_SERVICE": service_name},
                          ha=False, deadline_s=FAULT_DEADLINE_S)
    assert not row["skipped"], row["skipped"]
    assert row["sent"] > 100, "the load did not run"
    assert row["answered"] + sum(row["errors"].values()) + row["lost"] == row["sent"] - row["refused"]
    assert row["lost"] == 0 and row["refused"] == 0, row
    assert not row["errors"], row["errors"]
    assert row["exited"] == [] and row["duplicates"] == 0, row
    assert row["details"]["killed"], row
    # A node's death is not a registry outage: dispatch never stopped for it.
    assert row["stall_s"] < 5, row
    assert all(node.answering() for node in cluster.nodes), "the killed node rejoined"
