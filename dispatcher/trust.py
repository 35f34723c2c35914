"""Which registry entries may steer dispatch: a pure decision over Nacos entries and broker-side claims.

Nacos is shared: anyone can register any address, queue name or metadata
there.  An entry is trusted only when a live gpu-dispatch worker claims its
instance id in the broker (:mod:`gpu_dispatch.ownership`) and still owns the
queue that claim names; its reading is then the claim's own copy of what the
worker published.  Everything else is excluded with a reason an operator can
act on (``gpu-dispatch status``; ``docs/security.md`` has the trust model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from gpu_dispatch.contract import KNOWN_SCHEMAS, queue_refusal
from gpu_dispatch.ownership import Claim, digest, instance_id
from gpu_dispatch.registry import Instance
from scoring import GpuState, MalformedMetadata, parse_instance


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one registry entry.

    :param entry: the Nacos entry (``None`` for a claim seen only in the broker, Nacos unreachable).
    :param instance: its instance id (``ip:port`` or ``ip:port#cluster``).
    :param state: the reading dispatch may use; ``None`` when excluded.
    :param reading: the parsed reading, also for a drained or unhealthy entry (for status).
    :param reason: why it is excluded (``None`` when trusted).
    :param note: something an operator should know about a trusted entry.
    :param kind: short reason class for metrics: ``trusted``, ``drained``, ``unhealthy``, ``unclaimed``,
        ``forged``, ``malformed``, ``schema``, ``queue``.
    :param claim: the claim it was checked against.
    """

    entry: Instance | None
    instance: str
    state: GpuState | None
    reading: GpuState | None
    reason: str | None
    note: str | None
    kind: str
    claim: Claim | None


def vet(entries: Sequence[Instance], claims: Mapping[str, Claim | None], owners: Mapping[str, str | None],
        now_ms: int, *, claims_only: Sequence[Claim] = ()) -> list[Verdict]:
    """One :class:`Verdict` per Nacos entry (in order), then one per claim in ``claims_only``.

    :param entries: the service's instances as Nacos lists them (duplicates included: the same
        instance id registered by two clients shows twice).
    :param claims: the live claim on each instance id (``None``: no live worker of ours claims it).
    :param owners: the incarnation owning each claimed queue now.
    :param now_ms: the reader's clock, Unix ms.
    :param claims_only: live claims on instances Nacos does not list (used while Nacos is unreachable:
        a worker that registered during the outage still proves itself through the broker).
    """
    by_instance: dict[str, list[int]] = {}
    for index, entry in enumerate(entries):
        by_instance.setdefault(instance_id(entry.ip, entry.port, entry.cluster), []).append(index)
    verdicts: list[Verdict | None] = [None] * len(entries)
    for iid, indices in by_instance.items():
        claim = claims.get(iid)
        if claim is None:
            for i in indices:
                verdicts[i] = _excluded(entries[i], iid, "unclaimed", None,
                                        "no live gpu-dispatch worker claims this instance in the broker (another "
                                        "team's instance, or its worker is gone)")
            continue
        # Of several entries for one instance id, the owner's is the one whose metadata it published.
        own = [i for i in indices if digest(entries[i].metadata) in claim.digests]
        chosen = own[0] if own else indices[0]
        for i in indices:
            if i != chosen:
                verdicts[i] = _excluded(entries[i], iid, "forged", claim,
                                        f"another registration of instance {iid}, with metadata its worker "
                                        f"({claim.node}) did not publish")
        note = None if own else (f"the metadata Nacos shows for {iid} is not what its worker published "
                                 "(overwritten by another writer?); dispatching on the worker's own reading")
        verdicts[chosen] = _judge(entries[chosen], iid, claim, owners, now_ms, note)
    extra = [_judge(None, c.instance, c, owners, now_ms, "not listed by Nacos (unreachable): proven by the broker")
             for c in claims_only]
    return [v for v in verdicts if v is not None] + extra


def _judge(entry: Instance | None, iid: str, claim: Claim, owners: Mapping[str, str | None], now_ms: int,
           note: str | None) -> Verdict:
    if owners.get(claim.queue) != claim.incarnation:
        return _excluded(entry, iid, "unclaimed", claim,
                         f"its claim on queue {claim.queue} is no longer its worker's (incarnation "
                         f"{claim.incarnation} has been superseded)")
    refusal = queue_refusal(claim.queue)
    if refusal:
        return _excluded(entry, iid, "queue", claim, refusal)
    metadata = claim.metadata
    if metadata.get("queue") != claim.queue:
        return _excluded(entry, iid, "forged", claim, f"metadata names queue {metadata.get('queue')!r}, its "
                                                      f"worker consumes {claim.queue!r}")
    if metadata.get("schema") not in KNOWN_SCHEMAS:
        return _excluded(entry, iid, "schema", claim,
                         f"metadata schema {metadata.get('schema')!r} is not one this dispatcher reads "
                         f"({', '.join(sorted(KNOWN_SCHEMAS))}); upgrade the dispatcher or the worker")
    if metadata.get("gpu_error"):
        return _excluded(entry, iid, "unhealthy", claim, f"its GPU cannot be read: {metadata['gpu_error']}")
    healthy = entry.healthy if entry is not None else True
    enabled = entry.enabled if entry is not None else True
    ip, port = _address(entry, iid)
    try:
        state = parse_instance(ip, port, metadata, healthy=healthy, enabled=enabled, now_ms=now_ms, key=iid)
    except MalformedMetadata as exc:
        return _excluded(entry, iid, "malformed", claim, exc.reason)
    if entry is not None and not entry.enabled:
        return _excluded(entry, iid, "drained", claim, "disabled in Nacos (enabled=false): drained, no new work",
                         state)
    if entry is not None and entry.weight <= 0:
        return _excluded(entry, iid, "drained", claim, "weight 0 in Nacos: drained, no new work", state)
    if not healthy:
        return _excluded(entry, iid, "unhealthy", claim, "unhealthy in Nacos", state)
    if metadata.get("backend_error"):
        return _excluded(entry, iid, "unhealthy", claim, f"its model server does not answer: "
                                                         f"{metadata['backend_error']}", state)
    return Verdict(entry, iid, state, state, None, note, "trusted", claim)


def _excluded(entry: Instance | None, iid: str, kind: str, claim: Claim | None, reason: str,
              reading: GpuState | None = None) -> Verdict:
    return Verdict(entry, iid, None, reading, reason, None, kind, claim)


def _address(entry: Instance | None, iid: str) -> tuple[str, int]:
    if entry is not None:
        return entry.ip, entry.port
    address = iid.split("#", 1)[0]
    host, _, port = address.rpartition(":")
    return host, int(port)
