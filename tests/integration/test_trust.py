"""Foreign instances in a shared Nacos steer nothing: registered over Nacos's HTTP API as the seed article's
mock does, beside real GPU workers, they divert, strand and lose no request, and status says why each
one is excluded."""

from __future__ import annotations

import collections
import json
import urllib.parse
import urllib.request

import pytest

from dispatcher import NoGpuAvailable, dispatch_inference
from gpu_dispatch.celery import app
from tests.integration.dispatch_support import start_gpus, wait_for_gpus, start_dispatcher
from tests.support import wait_until

#: The seed article's mock GPU metadata (its keys), with whatever a test adds.
ARTICLE = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": "1024", "memory_free_mb": "80896",
           "gpu_util": "1", "concurrent_requests": "0", "model_name": "llama-7b-sim"}


def register_over_http(service: str, ip: str, port: int, metadata: dict[str, str], **params: str) -> None:
    """``POST /nacos/v1/ns/instance``, as the seed article's Python script registers its mock GPUs."""
    host = app.conf.nacos_server_addresses.split(",")[0]
    query = {"serviceName": service, "ip": ip, "port": str(port), "ephemeral": "true",
             "metadata": json.dumps(metadata), **params}
    token = _token(host)
    if token:
        query["accessToken"] = token
    request = urllib.request.Request(f"http://{host}/nacos/v1/ns/instance?{urllib.parse.urlencode(query)}",
                                     method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.read() == b"ok"


def _token(host: str) -> str | None:
    user, password = app.conf.nacos_username, app.conf.nacos_password
    if not user:
        return None
    body = urllib.parse.urlencode({"username": user, "password": password}).encode()
    with urllib.request.urlopen(f"http://{host}/nacos/v1/auth/users/login", data=body, timeout=10) as reply:
        return json.loads(reply.read())["accessToken"]


def verdicts(view) -> dict[str, list[str]]:
    found = collections.defaultdict(list)
    for v in view.verdicts():
        found[v.instance].append(v.kind)
    return found


@pytest.fixture
def two_gpus(service_name, celery_processes, producer_view):
    start_gpus(service_name, celery_processes, ["idle", "idle"], env={"GPU_DISPATCH_SIM_MS_PER_TOKEN": "1"})
    start_dispatcher(service_name, celery_processes, {"GPU_DISPATCH_NO_GPU_WAIT": "3"})
    wait_for_gpus(producer_view, 2)
    return producer_view


def test_a_foreign_instance_copying_a_gpus_queue_and_claiming_4_tib_diverts_nothing(service_name, two_gpus):
    register_over_http(service_name, "10.55.0.1", 9000, {**ARTICLE, "queue": "gpu.127.0.0.1.8000",
                                                         "memory_total_mb": "4194304", "memory_free_mb": "4194304",
                                                         "memory_used_mb": "0"})
    wait_until(lambda: "unclaimed" in verdicts(two_gpus).get("10.55.0.1:9000", []), 20, "the copy to be excluded")

    served = collections.Counter(dispatch_inference.delay(f"q{n}", max_tokens=2).get(timeout=30)["gpu"]["queue"]
                                 for n in range(60))
    assert set(served) == {"gpu.127.0.0.1.8000", "gpu.127.0.0.1.8001"}
    assert max(served.values()) <= 45, served  # the copy would double one share (41 of 60 before)
    with pytest.raises(NoGpuAvailable, match="200000 MB"):  # no 80 GB card gets a 200 GB request
        dispatch_inference.delay("huge", max_tokens=2, memory_mb=200_000).get(timeout=60)


@pytest.mark.parametrize("queue", ["blackhole.nobody", "dispatch", "gpu.127.0.0.1.8000.control", "unacked",
                                   "gpu.10.55.0.2.9001"])
def test_a_foreign_instance_with_a_queue_nobody_consumes_or_a_reserved_one_strands_nothing(
        service_name, two_gpus, queue):
    register_over_http(service_name, "10.55.0.2", 9001, {**ARTICLE, "queue": queue})
    wait_until(lambda: "unclaimed" in verdicts(two_gpus).get("10.55.0.2:9001", []), 20, "it to be excluded")

    answers = [dispatch_inference.delay(f"q{n}", max_tokens=2).get(timeout=30) for n in range(20)]
    assert {a["gpu"]["queue"] for a in answers} <= {"gpu.127.0.0.1.8000", "gpu.127.0.0.1.8001"}


def test_200_foreign_instances_with_unconsumed_queues_strand_nothing(service_name, two_gpus):
    for n in range(200):
        register_over_http(service_name, "10.56.0.1", 10000 + n, {**ARTICLE, "queue": f"gpu.10.56.0.1.{10000 + n}"})
    wait_until(lambda: len(two_gpus.verdicts()) >= 202, 30, "all 200 in the view")

    answers = [dispatch_inference.delay(f"q{n}", max_tokens=2) for n in range(40)]
    assert {a.get(timeout=60)["gpu"]["queue"] for a in answers} <= {"gpu.127.0.0.1.8000", "gpu.127.0.0.1.8001"}
    assert sum(kinds.count("unclaimed") for kinds in verdicts(two_gpus).values()) == 200


def test_the_articles_mock_on_a_gpus_own_address_changes_nothing(service_name, two_gpus):
    # The article's mock registers the seven keys at 127.0.0.1:8000 — the same instance id as GPU 0.
    register_over_http(service_name, "127.0.0.1", 8000, ARTICLE)
    wait_until(lambda: sorted(verdicts(two_gpus).get("127.0.0.1:8000", [])) == ["forged", "trusted"], 20,
               "both registrations of 127.0.0.1:8000 in the view")

    served = collections.Counter(dispatch_inference.delay(f"q{n}", max_tokens=2).get(timeout=30)["gpu"]["queue"]
                                 for n in range(40))
    assert set(served) == {"gpu.127.0.0.1.8000", "gpu.127.0.0.1.8001"} and min(served.values()) >= 8
    forged = next(v for v in two_gpus.verdicts() if v.kind == "forged")
    assert "metadata its worker" in forged.reason
