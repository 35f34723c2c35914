"""Which registry entries may steer dispatch (dispatcher.trust.vet): a table of entries and claims in,
verdicts out — no servers."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dispatcher.trust import vet
from gpu_dispatch.contract import METADATA_SCHEMA
from gpu_dispatch.ownership import Claim, digest
from gpu_dispatch.registry import Instance

NOW_MS = int(time.time() * 1000)


def metadata(port: int = 8000, ip: str = "10.0.0.1", **changes: str) -> dict[str, str]:
    meta = {"gpu_index": "0", "memory_total_mb": "81920", "memory_used_mb": "20000", "memory_free_mb": "61920",
            "gpu_util": "10", "concurrent_requests": "0", "model_name": "llama", "queue": f"gpu.{ip}.{port}",
            "worker": "gpu0@host", "incarnation": "inc1", "held_mb": "0", "updated_at": str(NOW_MS - 1000),
            "source": "simulated", "gpu_name": "Simulated GPU", "gpu_uuid": "GPU-SIM", "max_concurrency": "4",
            "schema": METADATA_SCHEMA}
    meta.update(changes)
    return meta


def claim(port: int = 8000, ip: str = "10.0.0.1", incarnation: str = "inc1", **changes: str) -> Claim:
    meta = metadata(port, ip, incarnation=incarnation, **changes)
    key = f"{ip}:{port}"
    return Claim(incarnation, "gpu0@host", meta["queue"], key, meta, (digest(meta),))


def entry(port: int = 8000, ip: str = "10.0.0.1", meta: dict | None = None, **fields) -> Instance:
    return Instance(ip, port, metadata(port, ip) if meta is None else meta, **fields)


def judge(entries, claims, owners=None):
    claims = {c.instance: c for c in claims}
    owners = owners if owners is not None else {c.queue: c.incarnation for c in claims.values()}
    return vet(entries, {e.key: claims.get(e.key) for e in entries}, owners, NOW_MS)


def test_an_entry_its_live_worker_claims_is_trusted_and_read_from_the_claim():
    [verdict] = judge([entry()], [claim()])
    assert verdict.kind == "trusted" and verdict.reason is None and verdict.note is None
    assert verdict.state.queue == "gpu.10.0.0.1.8000" and verdict.state.key == "10.0.0.1:8000"


@pytest.mark.parametrize("case, entries, claims, owners, kind, reason", [
    ("the seed article's mock, nobody claims it", [entry(9000, meta={"memory_free_mb": "4194304"})], [], None,
     "unclaimed", "no live gpu-dispatch worker claims this instance"),
    ("another GPU's queue copied into a foreign instance", [entry(9000, meta=metadata(8000))], [claim(8000)], None,
     "unclaimed", "no live gpu-dispatch worker claims"),
    ("a claim whose queue has a newer owner", [entry()], [claim()], {"gpu.10.0.0.1.8000": "inc2"},
     "unclaimed", "incarnation inc1 has been superseded"),
    ("drained: weight 0", [entry(weight=0.0)], [claim()], None, "drained", "weight 0 in Nacos"),
    ("drained: disabled", [entry(enabled=False)], [claim()], None, "drained", "enabled=false"),
    ("unhealthy", [entry(healthy=False)], [claim()], None, "unhealthy", "unhealthy in Nacos"),
    ("a schema this dispatcher does not read", [entry(meta=metadata(schema="99"))], [claim(schema="99")], None,
     "schema", "metadata schema '99' is not one this dispatcher reads"),
    ("the claim's metadata names another queue", [entry()],
     [dataclasses.replace(claim(), metadata=metadata(queue="gpu.10.0.0.1.8001"))], None,
     "forged", "metadata names queue 'gpu.10.0.0.1.8001', its worker consumes 'gpu.10.0.0.1.8000'"),
    ("NVML cannot read the GPU", [entry()], [claim(gpu_error="memory: Unknown Error", memory_total_mb="0",
                                                   memory_free_mb="0", memory_used_mb="0")], None,
     "unhealthy", "its GPU cannot be read: memory: Unknown Error"),
    ("its model server does not answer", [entry()], [claim(backend_error="cannot reach http://x:8000")], None,
     "unhealthy", "its model server does not answer: cannot reach http://x:8000"),
    ("malformed reading", [entry(meta=metadata(memory_free_mb="-1"))], [claim(memory_free_mb="-1")], None,
     "malformed", "memory_free_mb is '-1': negative"),
])
def test_an_entry_is_excluded_with_its_reason(case, entries, claims, owners, kind, reason):
    [verdict] = judge(entries, claims, owners)
    assert verdict.state is None, case
    assert verdict.kind == kind, case
    assert reason in verdict.reason, case


@pytest.mark.parametrize("queue", ["dispatch", "unacked", "gpu.10.0.0.1.8000.control", "blackhole.nobody",
                                   "_kombu.binding.x", "gpu-dispatch:owner:x", "celery"])
def test_a_claim_on_a_reserved_or_malformed_queue_name_is_never_a_target(queue):
    forged = Claim("inc1", "gpu0@host", queue, "10.0.0.1:8000", metadata(queue=queue),
                   (digest(metadata(queue=queue)),))
    [verdict] = judge([entry(meta=metadata(queue=queue))], [forged])
    assert verdict.state is None and verdict.kind == "queue"


def test_metadata_overwritten_in_nacos_is_noted_and_the_workers_own_reading_is_used():
    overlaid = entry(meta={**metadata(), "memory_free_mb": "4194304", "memory_total_mb": "4194304"})
    [verdict] = judge([overlaid], [claim()])
    assert verdict.kind == "trusted"
    assert verdict.state.memory_free_mb == 61920
    assert "not what its worker published" in verdict.note


def test_of_two_registrations_of_one_instance_the_owners_is_used_and_the_other_excluded():
    mock = entry(meta={"memory_free_mb": "60000", "gpu_util": "5"})
    ours = entry()
    verdicts = judge([mock, ours], [claim()])
    assert [v.kind for v in verdicts] == ["forged", "trusted"]
    assert verdicts[1].entry is ours
    assert "another registration of instance 10.0.0.1:8000" in verdicts[0].reason


def test_an_instance_in_another_cluster_is_another_instance():
    [verdict] = judge([entry(cluster="other")], [claim()])
    assert verdict.instance == "10.0.0.1:8000#other" and verdict.kind == "unclaimed"


def test_while_nacos_is_unreachable_a_claim_alone_proves_a_worker():
    verdicts = vet([], {}, {"gpu.10.0.0.1.8000": "inc1"}, NOW_MS, claims_only=[claim()])
    assert [v.kind for v in verdicts] == ["trusted"]
    assert "proven by the broker" in verdicts[0].note
