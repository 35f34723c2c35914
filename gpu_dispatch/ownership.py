"""Who may receive work: GPU workers' leases and claims, held in the broker's Redis.

Each GPU worker process (an *incarnation*) renews every second its lease, the
ownership of its queue, and a claim on its Nacos instance carrying its latest
reading; dispatchers trust a Nacos entry only through such a claim.
``docs/security.md`` has the trust model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Mapping

import redis

from gpu_dispatch.ledger import PREFIX

#: ARGV: prefix, incarnation, queue, instance id, ttl ms, lease JSON, claim JSON, node, started ms,
#: and '1' to hold only the lease (a worker shutting down: no new work, what it runs is still its own).
#: {'ok', superseded incarnation or ''} | {'taken', owner}: another live worker consumes the queue — under
#: another node name, or a newer incarnation under ours.  A live owner with *our* node name that started
#: before us is our predecessor (restarted by a supervisor before its lease ran out): it is superseded at
#: once, so what it held is recovered now.
_RENEW = """
local P, inc, q, iid, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if ARGV[10] == '1' then
  redis.call('SET', P .. 'worker:' .. inc, ARGV[6], 'PX', ttl)
  return {'ok', ''}
end
local owner = redis.call('GET', P .. 'owner:' .. q)
local superseded = ''
if owner and owner ~= inc then
  local lease = redis.call('GET', P .. 'worker:' .. owner)
  if lease then
    local ok, other = pcall(cjson.decode, lease)
    if not ok or other['node'] ~= ARGV[8] or tonumber(other['started'] or 0) > tonumber(ARGV[9]) then
      return {'taken', owner}
    end
    redis.call('DEL', P .. 'worker:' .. owner)
    superseded = owner
  end
end
redis.call('SET', P .. 'worker:' .. inc, ARGV[6], 'PX', ttl)
redis.call('SET', P .. 'owner:' .. q, inc, 'PX', ttl)
redis.call('SET', P .. 'instance:' .. iid, ARGV[7], 'PX', ttl)
return {'ok', superseded}
"""

#: ARGV: prefix, lease to drop ('' keeps it), queue, instance id, incarnation.  Drops the queue and
#: instance claims if they are still this incarnation's.
_RELEASE = """
local P, lease, q, iid, inc = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if lease ~= '' then redis.call('DEL', P .. 'worker:' .. lease) end
if redis.call('GET', P .. 'owner:' .. q) == inc then redis.call('DEL', P .. 'owner:' .. q) end
local claim = redis.call('GET', P .. 'instance:' .. iid)
if claim then
  local ok, c = pcall(cjson.decode, claim)
  if ok and c['incarnation'] == inc then redis.call('DEL', P .. 'instance:' .. iid) end
end
return 1
"""


def instance_id(ip: str, port: int, cluster: str = "DEFAULT") -> str:
    """Nacos's identity of an instance within a service: address, port and cluster (``ip:port`` in the
    default cluster, ``ip:port#cluster`` in another)."""
    return f"{ip}:{port}" if cluster in ("", "DEFAULT") else f"{ip}:{port}#{cluster}"


def digest(metadata: Mapping[str, str]) -> str:
    """A short fingerprint of a metadata map (order-free), to tell the owner's from anyone else's."""
    text = json.dumps(dict(sorted(metadata.items())), separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Claim:
    """A live worker's claim on one Nacos instance: who it is, its latest reading, what it published."""

    incarnation: str
    node: str
    queue: str
    instance: str
    #: Its latest reading, as instance metadata (renewed every second, with the lease).
    metadata: dict[str, str]
    #: Fingerprints of the last metadata maps it published to Nacos (newest first): Nacos may show one.
    digests: tuple[str, ...]

    @classmethod
    def parse(cls, raw: bytes | str | None) -> "Claim | None":
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return cls(incarnation=str(data["incarnation"]), node=str(data["node"]), queue=str(data["queue"]),
                       instance=str(data["instance"]), metadata={str(k): str(v) for k, v in data["metadata"].items()},
                       digests=tuple(str(d) for d in data["digests"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def dumps(self) -> str:
        return json.dumps({"incarnation": self.incarnation, "node": self.node, "queue": self.queue,
                           "instance": self.instance, "metadata": self.metadata, "digests": list(self.digests)},
                          separators=(",", ":"))


#: A lease counts as possibly run out once this fraction of its TTL has passed since a renewal was sent
#: (the margin covers the time a command takes to reach Redis).
LAPSE_FRACTION = 0.9


class QueueTaken(RuntimeError):
    """Another live gpu-dispatch worker, under another node name, already consumes this GPU's queue."""


class Ownership:
    """One GPU worker's side: renew (and finally release) its lease, queue and instance claim.

    :param client: Redis client of the broker.
    :param incarnation: this process's id.
    :param node: its Celery node name.
    :param queue: the GPU queue it consumes.
    :param instance: its Nacos instance id (:func:`instance_id`).
    :param ttl_s: seconds a renewal holds; renew well within it.
    """

    #: How many recent metadata fingerprints the claim keeps.
    DIGESTS = 3

    def __init__(self, client: redis.Redis, *, incarnation: str, node: str, queue: str, instance: str,
                 ttl_s: float) -> None:
        self.client = client
        self.incarnation, self.node, self.queue, self.instance = incarnation, node, queue, instance
        self.ttl_ms = int(ttl_s * 1000)
        self.started_ms = int(time.time() * 1000)
        self.leaving = False
        #: Times the lease may have run out between two renewals (a gap near its TTL or longer).
        self.lapses = 0
        #: ``time.monotonic()`` when the last successful renewal was sent (``None``: none yet).
        self.renewed_sent: float | None = None
        self._metadata: dict[str, str] = {}
        self._digests: tuple[str, ...] = ()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def publishing(self, metadata: Mapping[str, str]) -> None:
        """Put ``metadata`` in the claim, as published to Nacos (call before publishing it), and renew now."""
        self._metadata = dict(metadata)
        self._digests = (digest(metadata), *self._digests)[:self.DIGESTS]
        self.renew()

    def reading(self, metadata: Mapping[str, str]) -> None:
        """Put a fresh reading in the claim without publishing it to Nacos (sent with the next renewal)."""
        self._metadata = dict(metadata)

    def renew(self) -> str:
        """Renew lease and claims; returns the incarnation superseded by this one, or ``""``.

        :raises QueueTaken: another live worker under another node name owns the queue.
        :raises redis.RedisError: the broker did not answer (the caller retries on its next beat).
        """
        lease = json.dumps({"node": self.node, "queue": self.queue, "instance": self.instance,
                            "started": self.started_ms})
        claim = Claim(self.incarnation, self.node, self.queue, self.instance, self._metadata, self._digests)
        sent = time.monotonic()
        verdict, detail = self._renew(args=[PREFIX, self.incarnation, self.queue, self.instance, self.ttl_ms,
                                            lease, claim.dumps(), self.node, self.started_ms,
                                            "1" if self.leaving else "0"])
        if verdict == b"taken":
            raise QueueTaken(f"queue {self.queue} is consumed by another live gpu-dispatch worker (incarnation "
                             f"{detail.decode()}) under another node name; each GPU has one worker: stop the "
                             "other one, or give this one another --gpu or GPU_DISPATCH_WORKER_IP")
        if self.renewed_sent is not None and time.monotonic() - self.renewed_sent >= self.ttl_ms / 1000 * LAPSE_FRACTION:
            self.lapses += 1  # the lease may have run out in between: claims may have been taken over
        self.renewed_sent = sent
        return detail.decode()

    def live_since(self, lapses: int) -> bool:
        """Whether the lease has certainly held without a lapse since :attr:`lapses` was ``lapses``, up to now."""
        return self.lapses == lapses and self.renewed_sent is not None \
            and time.monotonic() - self.renewed_sent < self.ttl_ms / 1000 * LAPSE_FRACTION

    def leave(self) -> None:
        """Give up the queue and the instance claim (no new work), keeping the lease: what this worker
        is running stays its own while it finishes (warm shutdown)."""
        self.leaving = True
        self._release(args=[PREFIX, "", self.queue, self.instance, self.incarnation])

    def release(self) -> None:
        """Give up lease and claims now (the end of a shutdown), so recovery need not wait for them to expire."""
        self._release(args=[PREFIX, self.incarnation, self.queue, self.instance, self.incarnation])


def alive(client: redis.Redis, incarnations: list[str]) -> dict[str, bool]:
    """Which incarnations hold a live lease, in one round trip."""
    if not incarnations:
        return {}
    with client.pipeline(transaction=False) as pipe:
        for inc in incarnations:
            pipe.exists(PREFIX + "worker:" + inc)
        answers = pipe.execute()
    return {inc: bool(a) for inc, a in zip(incarnations, answers)}


def owners(client: redis.Redis, queues: list[str]) -> dict[str, str | None]:
    """The incarnation owning each queue now (``None``: no live owner), in one round trip."""
    if not queues:
        return {}
    values = client.mget([PREFIX + "owner:" + q for q in queues])
    return {q: (v.decode() if v else None) for q, v in zip(queues, values)}


def claims(client: redis.Redis, instances: list[str]) -> dict[str, Claim | None]:
    """The live claim on each Nacos instance id (``None``: nobody of ours claims it)."""
    if not instances:
        return {}
    values = client.mget([PREFIX + "instance:" + i for i in instances])
    return {i: Claim.parse(v) for i, v in zip(instances, values)}


def live_claims(client: redis.Redis) -> list[Claim]:
    """Every live instance claim (for a dispatcher that cannot reach Nacos)."""
    keys = list(client.scan_iter(match=PREFIX + "instance:*", count=500))
    if not keys:
        return []
    return [c for c in (Claim.parse(v) for v in client.mget(keys)) if c is not None]
