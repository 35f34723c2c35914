"""The highly available topology, from real parts on this machine: Redis with Sentinel (a primary, a
replica, three sentinels), Nacos, and GPU workers on hosts of their own (network namespaces on a bridge).

Each test is the short form of a fault of ``bench/faults.py --ha`` (a bounded load, one fault, every
request counted), run as that program against the servers this module starts, under a deadline:

- the Redis primary killed (kill -9) mid-load: Sentinel fails over, nothing accepted is lost, no worker
  exits — with asynchronous replication, and with GPU_DISPATCH_REPLICA_WAIT=1 (``docs/reliability.md``
  says what a failover could lose without it);
- one host's link cut mid-load: every request that was waiting or running there is answered by
  another GPU as a later attempt (its worker's lease ran out and recovery re-dispatched it), none lost.

The servers listen on the hosts' bridge address (and loopback); without network namespaces (no root,
no ``ip netns``) they listen on loopback, the Sentinel test runs and the host test is skipped.
Ports: sentinels at GPU_DISPATCH_TEST_HA_SENTINEL_PORT (default: the test Redis port + 80, and the two
after it), their data nodes 100 below; Nacos at GPU_DISPATCH_TEST_HA_NACOS_PORT (default: the test
Nacos port - 20, with its gRPC and JRaft ports).
"""

from __future__ import annotations

import os

import pytest

import celeryconfig
from gpu_dispatch_tools import testhosts
from gpu_dispatch_tools.servers import NacosServer, RedisSentinelSet
from tests.conftest import REDIS_PASSWORD, TEST_NACOS_PORT, TEST_REDIS_PORT
from tests.support import run_bench_fault, wait_until

pytestmark = [pytest.mark.ha, pytest.mark.timeout(300)]

SENTINEL_PORT = int(os.environ.get("GPU_DISPATCH_TEST_HA_SENTINEL_PORT", TEST_REDIS_PORT + 80))
NACOS_PORT = int(os.environ.get("GPU_DISPATCH_TEST_HA_NACOS_PORT", TEST_NACOS_PORT - 20))
MASTER = "gpu-dispatch-test-ha"
#: Seconds one fault's run may take, start of its workers to the last outcome (about a minute here).
FAULT_DEADLINE_S = 170
#: Requests a failover may lose: none (docs/reliability.md, "Redis primary killed").
FAILOVER_LOSS_BOUND = 0


@pytest.fixture(scope="module")
def servers():
    """This module's servers instead of the session's: Redis with Sentinel and a Nacos, on the hosts'
    bridge when network namespaces are permitted (the hosts are made first and removed last)."""
    no_hosts = testhosts.unavailable()
    hosts = testhosts.Hosts(2) if no_hosts is None else None
    address = testhosts.BRIDGE_ADDRESS if hosts else "127.0.0.1"
    sentinels = ";".join(f"sentinel://:{REDIS_PASSWORD}@{address}:{SENTINEL_PORT + n}" for n in range(3))
    redis_set = RedisSentinelSet.from_url(sentinels + "/0", MASTER, celeryconfig.home)
    nacos = NacosServer(address, NACOS_PORT, celeryconfig.home)
    started = []
    try:
        if hosts:
            hosts.create()
        for server in (redis_set, nacos):
            server.stop()  # leftovers of an interrupted run are ours (our pid files): start afresh
            print(server.start(timeout=120))
            started.append(server)
        yield {"redis": redis_set, "nacos": nacos, "hosts": hosts, "no_hosts": no_hosts,
               "env": {"GPU_DISPATCH_BROKER_URL": sentinels + "/0", "GPU_DISPATCH_RESULT_BACKEND": sentinels + "/1",
                       "GPU_DISPATCH_SENTINEL_MASTER": MASTER, "GPU_DISPATCH_NACOS_SERVER": nacos.address}}
    finally:
        for server in reversed(started):
            print(server.stop())
        if hosts:
            hosts.remove()


@pytest.fixture(autouse=True)
def clean_broker():
    """Nothing to empty: each fault's run starts its own workers on its own Nacos service."""


def run_fault(topology: dict, fault: str, env: dict[str, str] | None = None) -> dict:
    """``python -m bench.faults --ha --short --only FAULT`` against this module's servers; its row."""
    name = f"ha-{fault}" + "".join(f"-{k.removeprefix('GPU_DISPATCH_').lower()}{v}"
                                   for k, v in (env or {}).items())
    env = {**topology["env"], "GPU_DISPATCH_NACOS_SERVICE": f"gpu-inference-test-ha-{fault}", **(env or {})}
    return run_bench_fault(fault, env, ha=True, deadline_s=FAULT_DEADLINE_S, name=name)


@pytest.mark.parametrize("replica_wait", ["0", "1"], ids=["async-replication", "replica-wait"])
def test_kill_9_of_the_redis_primary_mid_load_fails_over_and_loses_nothing(servers, replica_wait):
    redis_set: RedisSentinelSet = servers["redis"]
    before = redis_set.primary()
    row = run_fault(servers, "sentinel-failover", {"GPU_DISPATCH_REPLICA_WAIT": replica_wait})
    assert not row["skipped"], row["skipped"]
    assert row["sent"] > 100, "the load did not run"
    assert row["answered"] + sum(row["errors"].values()) + row["lost"] == row["sent"] - row["refused"]
    assert row["lost"] <= FAILOVER_LOSS_BOUND, f"lost {row['lost']}: {row['details'].get('lost_why')}"
    assert row["exited"] == [] and row["duplicates"] == 0
    assert not row["errors"].get("NoGpuAvailable"), row["errors"]
    assert row["refused"] == 0, "a failover of a few seconds is waited out at delay()"
    assert row["details"]["failover_s"] < 15
    # Consumers reconnect within a second or two of the new primary (gpu_dispatch/consumer.py).
    assert row["recovery_s"] < row["details"]["failover_s"] + 8, row
    # It did fail over, and the old primary is back as the replica.
    assert redis_set.primary() != before
    assert redis_set.node_at(before).role() == "slave"
    wait_until(redis_set.healthy, 30, "the set healthy again (the old primary in sync as the replica)")


def test_a_host_cut_off_mid_load_has_its_requests_re_dispatched_to_other_gpus(servers):
    if servers["hosts"] is None:
        pytest.skip(f"no separate hosts here: {servers['no_hosts']}")
    row = run_fault(servers, "host-cut")
    details = row["details"]
    assert row["sent"] > 100, "the load did not run"
    assert row["lost"] == 0 and row["exited"] == [] and row["duplicates"] == 0, row
    assert not row["errors"], row["errors"]
    # The cut host had work, and every request of it was answered by another GPU as a later attempt.
    assert details["stranded"] >= 2, "the cut host held no work: nothing was tested"
    assert details["not_rescued"] == [] and details["rescued"] == details["stranded"], details
    # Re-dispatched once the lease ran out: not before, and well within the run.
    # (The lease is renewed every third of it, so it runs out between 2/3 of it and all of it after the cut.)
    assert details["lease_s"] * 2 / 3 <= details["first_rescued_s"] < details["lease_s"] + 10, details
    assert details["all_rescued_s"] < details["lease_s"] + 20, details
    # The cut host is back: its link is up and it takes work again.
    assert servers["hosts"][0].link_up()
