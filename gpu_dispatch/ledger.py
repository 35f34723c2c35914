"""The request ledger: every accepted request, in Redis, from dispatch to its stored outcome.

Dispatchers write a record when they send a request to a GPU queue; the GPU
worker moves it along (started → running → finishing) and settles it once the
result is stored; recovery (:mod:`dispatcher.recovery`) re-dispatches what a
dead or hung worker held.  Each transition is one Lua script, so a record is
counted in exactly one GPU's load at a time and two parties racing on it (a
re-dispatch and a late worker, two recoverers) cannot both win.
``docs/dispatcher.md`` ("The ledger") explains the states and the guarantee.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import redis

#: Prefix of every key gpu-dispatch keeps in the broker's Redis (reserved: never a queue name).
PREFIX = "gpu-dispatch:"

#: Record states, in the order a request moves through them.
QUEUED, STARTED, RUNNING, FINISHING, DONE = "queued", "started", "running", "finishing", "done"
#: States in which a record holds a place in its GPU's queue (memory not yet in use).
WAITING_STATES = (QUEUED, STARTED)

# Shared by the scripts: move a record's share of a GPU's load in or out (sign = 1 or -1).
_ACCOUNT = """
local P = ARGV[1]
local function account(id, q, st, mb, sign, now)
  if not q or not st then return end
  local load = P .. 'load:' .. q
  local delta = (mb == 0) and 0 or sign * mb  -- never -0: Redis refuses it as an increment
  if st == 'queued' or st == 'started' then
    redis.call('HINCRBY', load, 'queued', sign)
    redis.call('HINCRBY', load, 'queued_mb', delta)
  elseif st == 'running' then
    redis.call('HINCRBY', load, 'running', sign)
    redis.call('HINCRBY', load, 'running_mb', delta)
    if sign > 0 then redis.call('ZADD', P .. 'running', now, id) else redis.call('ZREM', P .. 'running', id) end
  elseif st == 'finishing' then
    if sign > 0 then redis.call('ZADD', P .. 'finishing', now, id) else redis.call('ZREM', P .. 'finishing', id) end
  end
end
local function untarget(id, q)
  local key = P .. 'queue:' .. q
  redis.call('ZREM', key, id)
  if redis.call('ZCARD', key) == 0 then redis.call('SREM', P .. 'queues', q) end
end
local function target(id, q, now)
  redis.call('ZADD', P .. 'queue:' .. q, now, id)
  redis.call('SADD', P .. 'queues', q)
end
local function unhold(id, inc)
  if not inc then return end
  local key = P .. 'held:' .. inc
  redis.call('SREM', key, id)
  if redis.call('SCARD', key) == 0 then redis.call('SREM', P .. 'incs', inc) end
end
local function hold(id, inc)
  redis.call('SADD', P .. 'held:' .. inc, id)
  redis.call('SADD', P .. 'incs', inc)
end
"""

#: ARGV: prefix, id, queue, memory MB, now ms, message JSON, path, and optionally an affinity key and its
#: TTL in seconds (remember that this queue served that prefix).  1 if recorded, 0 if the id is known.
_DISPATCH = _ACCOUNT + """
local id, q, mb, now = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local key = P .. 'req:' .. id
if ARGV[8] then redis.call('SET', ARGV[8], q, 'EX', tonumber(ARGV[9])) end
if redis.call('EXISTS', key) == 1 then return 0 end
redis.call('HSET', key, 'st', 'queued', 'q', q, 'n', 1, 'mb', mb, 'sent', now, 'msg', ARGV[6], 'path', ARGV[7])
redis.call('ZADD', P .. 'open', now, id)
target(id, q, now)
account(id, q, 'queued', mb, 1, now)
return 1
"""

#: ARGV: prefix, id, my queue, message attempt, my incarnation, now ms, admit (1: straight to running).
#: {verdict, detail}: ok | untracked | answered | moved <queue> <attempt> | held <incarnation> | again.
_START = _ACCOUNT + """
local id, myq, attempt, inc, now = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'q', 'n', 'mb', 'inc')
local st, q, n, mb, holder = r[1], r[2], tonumber(r[3]), tonumber(r[4]), r[5]
if not st then return {'untracked', ''} end
if st == 'finishing' or st == 'done' then return {'answered', st} end
if attempt > n then
  -- a re-dispatch whose ledger update has not landed yet (or whose recoverer died): adopt it here
  account(id, q, st, mb, -1, now)
  untarget(id, q)
  unhold(id, holder)
  target(id, myq, now)
  st, q, n, holder = 'queued', myq, attempt, false
  redis.call('HSET', key, 'st', st, 'q', q, 'n', n, 'path', 'recovery')
  redis.call('HDEL', key, 'inc')
  account(id, q, st, mb, 1, now)
elseif attempt < n or q ~= myq then
  return {'moved', q .. ' ' .. n}
end
if st == 'started' or st == 'running' then
  if holder == inc then return {'again', ''} end
  if holder and redis.call('EXISTS', P .. 'worker:' .. holder) == 1 then return {'held', holder} end
end
local new = (ARGV[7] == '1') and 'running' or 'started'
account(id, q, st, mb, -1, now)
unhold(id, holder)
redis.call('HSET', key, 'st', new, 'inc', inc, 'started', now)
if new == 'running' then redis.call('HSET', key, 'running', now) end
hold(id, inc)
account(id, q, new, mb, 1, now)
return {'ok', tostring(mb)}
"""

#: ARGV: prefix, id, my incarnation, now ms.  1 when the started request now runs (holds its memory).
_ADMIT = _ACCOUNT + """
local id, inc, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'q', 'mb', 'inc')
if r[1] ~= 'started' or r[4] ~= inc then return 0 end
account(id, r[2], 'started', tonumber(r[3]), -1, now)
redis.call('HSET', key, 'st', 'running', 'running', now)
account(id, r[2], 'running', tonumber(r[3]), 1, now)
return 1
"""

#: ARGV: prefix, id, my incarnation, now ms.  Puts a started request back in its queue's line (not run).
_UNSTART = _ACCOUNT + """
local id, inc, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'q', 'mb', 'inc')
if (r[1] ~= 'started' and r[1] ~= 'running') or r[4] ~= inc then return 0 end
account(id, r[2], r[1], tonumber(r[3]), -1, now)
unhold(id, inc)
redis.call('HSET', key, 'st', 'queued')
redis.call('HDEL', key, 'inc')
account(id, r[2], 'queued', tonumber(r[3]), 1, now)
return 1
"""

#: ARGV: prefix, id, claimant, now ms.  Claims the request's one outcome: ok | answered | untracked.
_FINISH = _ACCOUNT + """
local id, by, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'q', 'mb', 'inc')
local st = r[1]
if not st then return 'untracked' end
if st == 'finishing' or st == 'done' then return 'answered' end
account(id, r[2], st, tonumber(r[3]), -1, now)
unhold(id, r[4])
redis.call('HSET', key, 'st', 'finishing', 'by', by, 'finished', now)
account(id, r[2], 'finishing', 0, 1, now)
return 'ok'
"""

#: ARGV: prefix, id, claimant, seconds to keep the settled record, outcome.  1 when settled.
_SETTLE = _ACCOUNT + """
local id, by, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'by', 'q')
if r[1] ~= 'finishing' or (by ~= '' and r[2] ~= by) then return 0 end
account(id, r[3], 'finishing', 0, -1, 0)
redis.call('HSET', key, 'st', 'done', 'outcome', ARGV[5])
redis.call('HDEL', key, 'msg')
redis.call('EXPIRE', key, ttl)
redis.call('ZREM', P .. 'open', id)
untarget(id, r[3])
return 1
"""

#: ARGV: prefix, id, expected state, expected attempt, expected holder ('' for none), new queue, now ms.
#: The new attempt number when the record moved; 0 when it had changed meanwhile (someone else acted).
_REDISPATCH = _ACCOUNT + """
local id, est, en, einc, newq, now = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7])
local key = P .. 'req:' .. id
local r = redis.call('HMGET', key, 'st', 'q', 'n', 'mb', 'inc')
if r[1] ~= est or tonumber(r[3]) ~= en or (r[5] or '') ~= einc then return 0 end
local mb = tonumber(r[4])
account(id, r[2], r[1], mb, -1, now)
untarget(id, r[2])
unhold(id, r[5])
target(id, newq, now)
redis.call('HSET', key, 'st', 'queued', 'q', newq, 'n', en + 1, 'sent', now, 'path', 'recovery')
redis.call('HDEL', key, 'inc', 'by')
account(id, newq, 'queued', mb, 1, now)
return en + 1
"""

#: The per-GPU load fields, in the order :meth:`Ledger.loads` returns them.
LOAD_FIELDS = ("queued", "queued_mb", "running", "running_mb")


@dataclass(frozen=True, slots=True)
class Load:
    """One GPU's share of the ledger: requests waiting in its line and running on it, and their memory (MB)."""

    queued: int = 0
    queued_mb: int = 0
    running: int = 0
    running_mb: int = 0

    @classmethod
    def from_values(cls, values: Iterable[Any]) -> "Load":
        numbers = [max(0, int(v or 0)) for v in values]  # never negative, even after a hand edit
        return cls(*numbers) if len(numbers) == 4 else cls()


@dataclass(frozen=True, slots=True)
class Record:
    """One request as the ledger holds it (times in Unix ms; ``None`` when not reached)."""

    id: str
    state: str
    queue: str
    attempt: int
    memory_mb: int
    sent_ms: int
    holder: str | None
    started_ms: int | None
    running_ms: int | None
    message: dict | None
    path: str
    claimant: str | None = None
    finished_ms: int | None = None

    @classmethod
    def from_hash(cls, task_id: str, fields: Mapping[bytes, bytes]) -> "Record | None":
        get = {k.decode(): v.decode() for k, v in fields.items()}.get
        if get("st") is None:
            return None
        try:
            message = json.loads(get("msg")) if get("msg") else None
        except ValueError:
            message = None
        return cls(id=task_id, state=get("st"), queue=get("q", ""), attempt=int(get("n", "1")),
                   memory_mb=int(float(get("mb", "0"))), sent_ms=int(get("sent", "0")), holder=get("inc"),
                   started_ms=_int(get("started")), running_ms=_int(get("running")), message=message,
                   path=get("path", ""), claimant=get("by"), finished_ms=_int(get("finished")))


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def now_ms() -> int:
    return int(time.time() * 1000)


def ledger_mb(memory_mb: float) -> int:
    """A request's memory as the ledger counts it: whole MB, rounded up."""
    return int(math.ceil(memory_mb))


class Ledger:
    """The ledger's operations over one Redis client (thread-safe: redis-py pools connections).

    :param client: Redis client of the broker.
    :param keep_s: seconds a settled record is kept (for ``status`` and late duplicates to see it).
    """

    def __init__(self, client: redis.Redis, keep_s: int = 3600) -> None:
        self.client = client
        self.keep_s = keep_s
        self._dispatch = client.register_script(_DISPATCH)
        self._start = client.register_script(_START)
        self._admit = client.register_script(_ADMIT)
        self._unstart = client.register_script(_UNSTART)
        self._finish = client.register_script(_FINISH)
        self._settle = client.register_script(_SETTLE)
        self._redispatch = client.register_script(_REDISPATCH)

    # -- dispatchers ----------------------------------------------------------------

    def dispatch(self, task_id: str, queue: str, memory_mb: float, message: Mapping[str, Any], path: str,
                 affinity: tuple[str, int] | None = None) -> bool:
        """Record that ``task_id`` is sent to ``queue`` (attempt 1); ``False`` when the id is already known.

        ``message`` is what re-dispatching needs: ``args``, ``kwargs`` and the
        ids of its parent and root.  ``affinity`` — a key and a TTL in seconds —
        remembers, in the same round trip, that ``queue`` served that prefix.
        One ``EVALSHA``.
        """
        return bool(self._dispatch(args=self._dispatch_args(task_id, queue, memory_mb, message, path, affinity)))

    def dispatch_replicated(self, task_id: str, queue: str, memory_mb: float, message: Mapping[str, Any],
                            path: str, affinity: tuple[str, int] | None, replicas: int,
                            timeout_ms: int) -> tuple[bool, int]:
        """:meth:`dispatch`, then wait up to ``timeout_ms`` for ``replicas`` replicas to have the record
        (:meth:`replicate`), in one round trip: ``(recorded, replicas reached)``."""
        with self.client.pipeline(transaction=False) as pipe:
            self._dispatch(args=self._dispatch_args(task_id, queue, memory_mb, message, path, affinity), client=pipe)
            self.replicate(pipe, replicas, timeout_ms)
            answers = pipe.execute()
        return bool(answers[0]), int(answers[-1])

    @staticmethod
    def _dispatch_args(task_id, queue, memory_mb, message, path, affinity) -> list:
        return [PREFIX, task_id, queue, ledger_mb(memory_mb), now_ms(), json.dumps(message, separators=(",", ":")),
                path, *(affinity or ())]

    @staticmethod
    def replicate(pipe: redis.client.Pipeline, replicas: int, timeout_ms: int) -> None:
        """Queue a write and a ``WAIT`` on ``pipe``: the ``WAIT``'s reply, with ``execute()``, is how many
        replicas have everything the primary had executed when the write ran — on any connection.  (The
        write is needed: ``WAIT`` counts up to its own connection's last write, and a script that changed
        nothing writes nothing.)"""
        pipe.set(PREFIX + "replicated", now_ms(), px=60_000)
        pipe.execute_command("WAIT", replicas, timeout_ms)

    def loads(self, queues: list[str]) -> dict[str, Load]:
        """Each queue's :class:`Load`, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.hmget(PREFIX + "load:" + queue, LOAD_FIELDS)
            answers = pipe.execute()
        return {q: Load.from_values(a) for q, a in zip(queues, answers)}

    # -- GPU workers ------------------------------------------------------------------

    def start(self, task_id: str, queue: str, attempt: int, incarnation: str, admit: bool) -> tuple[str, str]:
        """Claim ``task_id`` for this worker; see :data:`_START` for the verdicts."""
        verdict, detail = self._start(args=[PREFIX, task_id, queue, attempt, incarnation, now_ms(),
                                            "1" if admit else "0"])
        return verdict.decode(), detail.decode()

    def admit(self, task_id: str, incarnation: str) -> bool:
        return bool(self._admit(args=[PREFIX, task_id, incarnation, now_ms()]))

    def unstart(self, task_id: str, incarnation: str) -> bool:
        return bool(self._unstart(args=[PREFIX, task_id, incarnation, now_ms()]))

    def finish(self, task_id: str, claimant: str) -> str:
        """Claim the one outcome of ``task_id``: ``ok`` (store it), ``answered`` (someone did), ``untracked``."""
        return self._finish(args=[PREFIX, task_id, claimant, now_ms()]).decode()

    def claimed_by(self, task_id: str, claimant: str) -> bool:
        """Whether ``claimant`` still holds the claim on the outcome of ``task_id`` (not settled, not taken)."""
        state, by = self.client.hmget(PREFIX + "req:" + task_id, ["st", "by"])
        return state == b"finishing" and by == claimant.encode()

    def settle(self, task_id: str, claimant: str, outcome: str) -> bool:
        """Mark a claimed outcome as stored; the record is kept :attr:`keep_s` seconds more."""
        return bool(self._settle(args=[PREFIX, task_id, claimant, self.keep_s, outcome]))

    # -- recovery ---------------------------------------------------------------------

    def redispatch(self, record: Record, queue: str) -> int:
        """Move ``record`` (as read) to ``queue`` as its next attempt; 0 when it changed meanwhile."""
        return int(self._redispatch(args=[PREFIX, record.id, record.state, record.attempt, record.holder or "",
                                          queue, now_ms()]))

    def records(self, task_ids: list[str]) -> list[Record]:
        """The records of ``task_ids`` that exist, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(PREFIX + "req:" + task_id)
            answers = pipe.execute()
        return [r for r in (Record.from_hash(i, a) for i, a in zip(task_ids, answers)) if r is not None]

    def record(self, task_id: str) -> Record | None:
        return Record.from_hash(task_id, self.client.hgetall(PREFIX + "req:" + task_id))

    def targeted(self, queue: str) -> list[str]:
        """Ids of the open records whose current attempt targets ``queue``."""
        return [m.decode() for m in self.client.zrange(PREFIX + "queue:" + queue, 0, -1)]

    def held_by(self, incarnation: str) -> list[str]:
        """Ids of the records an incarnation has started."""
        return [m.decode() for m in self.client.smembers(PREFIX + "held:" + incarnation)]

    def running_since_before(self, before_ms: int) -> list[str]:
        """Ids of the requests running since before ``before_ms``."""
        return [m.decode() for m in self.client.zrangebyscore(PREFIX + "running", "-inf", before_ms)]

    def finishing_since_before(self, before_ms: int) -> list[str]:
        """Ids of the requests whose outcome was claimed before ``before_ms`` and is not settled yet."""
        return [m.decode() for m in self.client.zrangebyscore(PREFIX + "finishing", "-inf", before_ms)]

    def settle_many(self, outcomes: list[tuple[str, str]], claimant: str, replicas: int = 0,
                    timeout_ms: int = 0) -> int:
        """:meth:`settle` for many ``(task_id, outcome)`` pairs, in one round trip; with ``replicas``, followed by
        a ``WAIT`` for that many (:meth:`replicate`), whose answer is returned (else 0)."""
        with self.client.pipeline(transaction=False) as pipe:
            for task_id, outcome in outcomes:
                self._settle(args=[PREFIX, task_id, claimant, self.keep_s, outcome], client=pipe)
            if replicas:
                self.replicate(pipe, replicas, timeout_ms)
            answers = pipe.execute()
        return int(answers[-1]) if replicas else 0

    def settle_stored(self, task_id: str, outcome: str) -> bool:
        """Settle a claimed outcome found stored, whoever claimed it (its claimant died before settling)."""
        return bool(self._settle(args=[PREFIX, task_id, "", self.keep_s, outcome]))

    def queues_with_work(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(PREFIX + "queues"))

    def holding_incarnations(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(PREFIX + "incs"))

    def open_count(self) -> int:
        return int(self.client.zcard(PREFIX + "open"))
