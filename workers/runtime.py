"""The state one GPU worker process keeps: who it is, its GPU, its requests, its Nacos instance and its lease.

One :class:`GpuWorker` per worker process, built by the worker bootstep
(:mod:`workers.steps`) in the process that uses it — never at import, since
gRPC channels and NVML handles do not survive ``fork()``.  Tasks reach it
through :func:`current`; how a request moves through it is
:meth:`GpuWorker.serve` (``docs/dispatcher.md``, "The ledger").
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import redis
from celery import states
from celery.exceptions import Ignore

from gpu_dispatch import broker, contract, results
from gpu_dispatch.ledger import Ledger, ledger_mb
from gpu_dispatch.ownership import Ownership, QueueTaken, instance_id
from gpu_dispatch.registry import Registry
from workers.admission import Admission
from workers.backends import BackendError, open_backend
from workers.gpu import InFlight, open_gpu

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest wait between two tries of a ledger write while the broker is unreachable, seconds.
BROKER_RETRY_MAX_S = 2.0
#: Longest backend_error published (the metadata map must stay under the contract's limit).
BACKEND_ERROR_CHARS = 120
#: Seconds between two batches of settled outcomes.
SETTLE_EVERY_S = 0.05

_current: "GpuWorker | None" = None


def current() -> "GpuWorker":
    """The GPU worker of this process; an error outside a GPU worker (started with ``--gpu``)."""
    if _current is None:
        raise RuntimeError("this process is not a GPU worker: start it with "
                           "`celery -A gpu_dispatch worker --gpu N` or `gpu-dispatch worker --gpu N`")
    return _current


def host_address() -> str:
    """This host's address as other hosts would reach it (``GPU_DISPATCH_WORKER_IP`` overrides)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Skipped(Ignore):
    """This delivery of a request is not run: the ledger says another one is, or has answered."""


class GpuWorker:
    """One GPU's worker: identity, GPU, backend, requests, Nacos instance and broker lease.

    :param conf: the app's settings (``app.conf``).
    :param gpu_index: which GPU this worker serves.
    :param hostname: the Celery worker's node name (published as ``worker``).
    :param concurrency: inference slots (the Celery pool's size), published as ``max_concurrency``.
    """

    def __init__(self, conf: Any, gpu_index: int, hostname: str, concurrency: int) -> None:
        self.conf = conf
        self.gpu_index = gpu_index
        self.hostname = hostname
        self.max_concurrency = concurrency
        self.ip = conf.worker_ip or host_address()
        self.port = conf.base_port + gpu_index
        self.queue = contract.gpu_queue(self.ip, self.port)
        #: Direct queue of this worker's own control messages (refresh retries, first registration).
        self.control_queue = self.queue + contract.CONTROL_SUFFIX
        self.incarnation = uuid.uuid4().hex[:12]
        self.instance = instance_id(self.ip, self.port)
        self.inflight = InFlight()
        self.gpu = open_gpu(gpu_index, conf.gpu_source, total_mb=conf.sim_memory_mb, tenants=conf.sim_tenants,
                            seed=conf.sim_seed, inflight=self.inflight, simulated_count=conf.sim_gpus)
        self.backend = open_backend(conf, self.gpu, self.ip, self.port, max_connections=concurrency + 2)
        self._backend_error: str | None = None
        self._backend_signals: dict[str, str] = {}
        self.admission = Admission(self.gpu.room_mb, self.inflight)
        self.redis = broker.client(conf.broker_url, conf.broker_transport_options)
        self.ledger = Ledger(self.redis, keep_s=conf.result_expires)
        self.ownership = Ownership(self.redis, incarnation=self.incarnation, node=hostname, queue=self.queue,
                                   instance=self.instance, ttl_s=conf.lease_seconds)
        self._registry: Registry | None = None
        self._lock = threading.Lock()
        self._withdrawn = False
        self._stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        #: Called (once) when a newer incarnation of this worker has taken its queue over.
        self.on_fenced: Callable[[str], None] | None = None
        #: Outcomes this worker has claimed and not yet settled: task id -> the lease's lapse count then.
        self._claims: dict[str, int] = {}
        #: With GPU_DISPATCH_REPLICA_WAIT: outcomes stored but not yet known to be on a replica (task id ->
        #: (return value, traceback)), to store again should a failover lose them.
        self._unreplicated: dict[str, tuple[Any, str | None]] = {}
        self._to_settle: list[tuple[str, str]] = []
        self._settle_lock = threading.Lock()
        self._settle_due = threading.Event()
        self._settler = threading.Thread(target=self._settle_batches, name="gpu-dispatch-settle", daemon=True)
        self._settler.start()
        self.check_metadata_size()

    # -- metadata ----------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        """The instance metadata from a fresh reading: the seed article's keys, then ours.  All values are strings."""
        reading = self.gpu.read()
        held = self.inflight.memory_mb if reading.source == "nvml" else min(self.inflight.memory_mb,
                                                                             reading.memory_used_mb)
        metadata = {
            "gpu_index": str(self.gpu_index),
            "memory_total_mb": str(reading.memory_total_mb),
            "memory_used_mb": str(reading.memory_used_mb),
            "memory_free_mb": str(reading.memory_free_mb),
            "gpu_util": str(reading.gpu_util),
            "concurrent_requests": str(self.inflight.count),
            "model_name": self.conf.model_name,
            "queue": self.queue,
            "worker": self.hostname,
            "incarnation": self.incarnation,
            "held_mb": str(held),
            "updated_at": str(int(time.time() * 1000)),
            "source": reading.source,
            "gpu_name": reading.name,
            "gpu_uuid": reading.uuid,
            "max_concurrency": str(self.max_concurrency),
            "schema": contract.METADATA_SCHEMA,
        }
        assert set(metadata) == set(contract.METADATA_KEYS), "the contract and the writer disagree"
        metadata.update(self._backend_signals)
        if reading.error:
            metadata["gpu_error"] = reading.error[:BACKEND_ERROR_CHARS]
        if self._backend_error:
            metadata["backend_error"] = self._backend_error[:BACKEND_ERROR_CHARS]
        return metadata

    def check_backend(self) -> str | None:
        """Ask the backend whether its model server answers, and for its load signals (each at most 2 s);
        the next reading carries them.  Returns why it does not answer, or ``None``."""
        error = self.backend.health()
        if error != self._backend_error:
            if error:
                log.error("model server of GPU %s does not answer: %s — no work is sent here until it does",
                          self.gpu_index, error)
            elif self._backend_error:
                log.warning("model server of GPU %s answers again", self.gpu_index)
        self._backend_error = error
        self._backend_signals = {} if error else {k: v for k, v in self.backend.signals().items()
                                                  if k in contract.OPTIONAL_METADATA_KEYS}
        return error

    def check_metadata_size(self) -> None:
        # The largest map this worker may publish: with every optional key at its longest.
        largest = {**self.metadata(), "backend_error": "x" * BACKEND_ERROR_CHARS,
                   "gpu_error": "x" * BACKEND_ERROR_CHARS, "model_waiting": "100000",
                   "model_running": "100000", "kv_cache_used_pct": "100.0"}
        size = contract.metadata_size(largest)
        if size > contract.METADATA_LIMIT:
            raise ValueError(f"instance metadata would be {size} characters, over our limit of "
                             f"{contract.METADATA_LIMIT} (Nacos refuses 1,024): shorten the worker name (-n), "
                             "GPU_DISPATCH_MODEL_NAME or GPU_DISPATCH_WORKER_IP")

    # -- Nacos and the broker-side claim ---------------------------------------------

    def publish(self) -> dict[str, str] | None:
        """Read the GPU; put the reading in the broker-side claim, then in the Nacos instance.

        The claim first: a dispatcher trusts Nacos metadata only when the
        claim holds the same, and keeps dispatching from the claim while
        Nacos is down.  ``None`` once withdrawn.  Raises
        :class:`~gpu_dispatch.registry.RegistryError` when Nacos cannot be
        reached (the refresh task retries on it).
        """
        with self._lock:
            if self._withdrawn:
                return None
            self.check_backend()
            metadata = self.metadata()
            try:
                self.ownership.publishing(metadata)
            except redis.RedisError as exc:  # Nacos still gets the reading; the lease thread keeps trying
                log.warning("could not put the reading in the broker (%s); dispatchers see it once it answers", exc)
            except QueueTaken as exc:
                self._fenced(str(exc))
                return None
            if self._registry is None:
                self._registry = Registry.from_config(self.conf)
            self._registry.update(self.ip, self.port, metadata)
            return metadata

    def withdraw(self) -> None:
        """No new work: deregister, give up the queue and instance claims, close admission.

        Called first on warm shutdown, so dispatchers stop sending work here
        while the requests already running finish (the lease stays until
        :meth:`close`, so they stay this worker's).
        """
        with self._lock:
            self._withdrawn = True
            registry, self._registry = self._registry, None
        self.admission.close()
        try:
            self.ownership.leave()
        except redis.RedisError as exc:  # the claims expire with the lease anyway
            log.warning("could not give up the queue claim in the broker: %s", exc)
        if registry is None:
            return
        try:
            registry.deregister(self.ip, self.port)
            log.info("deregistered %s:%s (queue %s) from Nacos", self.ip, self.port, self.queue)
        except Exception as exc:  # closing the connection drops the ephemeral instance anyway
            log.warning("could not deregister %s:%s, closing the connection instead: %s", self.ip, self.port, exc)
        finally:
            registry.close()

    # -- the lease ---------------------------------------------------------------------

    def start_lease(self) -> None:
        """Claim the queue now and renew the lease every third of ``GPU_DISPATCH_LEASE_SECONDS``.

        A queue owned by another worker is waited for one lease period (its
        owner may have just died; its lease then runs out).

        :raises QueueTaken: another live worker still consumes this GPU's queue after that.
        """
        deadline = time.monotonic() + self.conf.lease_seconds + 1.0
        while True:
            try:
                superseded = self.ownership.renew()
                if superseded:
                    log.warning("queue %s: took over from incarnation %s (same node %s, restarted); what it held "
                                "is re-dispatched now", self.queue, superseded, self.hostname)
                break
            except QueueTaken:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
            except redis.RedisError as exc:
                log.warning("broker unreachable at start (%s); claiming queue %s once it answers", exc, self.queue)
                break
        self._lease_thread = threading.Thread(target=self._keep_lease, name="gpu-dispatch-lease", daemon=True)
        self._lease_thread.start()

    def _keep_lease(self) -> None:
        interval = self.conf.lease_seconds / 3
        failing = False
        while not self._stop.wait(interval):
            try:
                # Each renewal carries a fresh reading: dispatchers read the broker-side claim, so their
                # readings stay current even when beat or Nacos lag (Nacos gets one every refresh).
                if not self._withdrawn:
                    self.ownership.reading(self.metadata())
                self.ownership.renew()
            except QueueTaken as exc:
                self._fenced(str(exc))
                return
            except redis.RedisError as exc:
                if not failing:
                    log.warning("cannot renew the lease of %s in the broker (%s); retrying every %.1f s",
                                self.queue, exc, interval)
                failing = True
                continue
            if failing:
                log.warning("lease of %s renewed again: the broker answers", self.queue)
            failing = False

    def _fenced(self, why: str) -> None:
        log.error("%s — this worker takes no more work", why)
        self._stop.set()
        if self.on_fenced is not None:
            callback, self.on_fenced = self.on_fenced, None
            callback(why)

    def close(self) -> None:
        """End of the process: settle what is left, stop renewing and give up the lease."""
        self._stop.set()
        self._settle_due.set()
        self._settler.join(10)
        if self._lease_thread is not None:
            self._lease_thread.join(5)
        self.backend.close()
        try:
            self.ownership.release()
        except redis.RedisError as exc:
            log.warning("could not release the lease in the broker (it expires by itself): %s", exc)
        self.redis.close()

    # -- one request -------------------------------------------------------------------

    @contextmanager
    def serve(self, task_id: str, attempt: int, memory_mb: float) -> Iterator[None]:
        """Run the ``with`` block as delivery ``attempt`` of request ``task_id``, or skip it.

        1. Claim it in the ledger (``started``); a delivery the ledger has
           moved elsewhere, answered already, or that a live incarnation runs,
           is skipped: :class:`Skipped` (Celery stores nothing and acks).
        2. Wait for its memory, first come first served (:mod:`workers.admission`).
        3. Run the block; then claim the request's one outcome.  If another
           delivery stored one first (this one was re-dispatched while it
           ran), this outcome is discarded with a log line.
        The ledger record is settled after Celery stores the outcome
        (:meth:`settled`, from the task's ``after_return``).
        """
        mb = ledger_mb(memory_mb)
        ticket = self.admission.enter(mb)
        admitted = self.admission.try_admit(ticket)
        verdict, detail = self._broker(lambda: self.ledger.start(task_id, self.queue, attempt, self.incarnation,
                                                                  admitted), f"claim {task_id}")
        if verdict not in ("ok", "untracked"):
            self.admission.leave(ticket)
            log.warning("task %s (attempt %d): not run here: %s", task_id, attempt, _skip_reason(verdict, detail))
            raise Skipped(verdict)
        tracked = verdict == "ok"
        try:
            if not admitted:
                log.info("task %s waits for %d MB on GPU %s (%d in line)", task_id, mb, self.gpu_index,
                         self.admission.waiting)
                if not self.admission.wait(ticket):
                    self._broker(lambda: self.ledger.unstart(task_id, self.incarnation), f"put back {task_id}")
                    log.warning("task %s: worker shutting down before it could run; back to the ledger for "
                                "re-dispatch", task_id)
                    raise Skipped("shutdown")
                if tracked and not self._broker(lambda: self.ledger.admit(task_id, self.incarnation),
                                                f"admit {task_id}"):
                    log.warning("task %s: re-dispatched while it waited for memory; not run here", task_id)
                    raise Skipped("moved")
            try:
                yield
            except BackendError:
                self.check_backend()  # a model server that stopped answering is taken out of dispatch now
                if self._backend_error:
                    self._renew_now()
                self._claim_outcome(task_id, tracked)
                raise
            except Exception:
                self._claim_outcome(task_id, tracked)
                raise
            self._claim_outcome(task_id, tracked)
        finally:
            self.admission.leave(ticket)

    def _renew_now(self) -> None:
        try:
            self.ownership.reading(self.metadata())
            self.ownership.renew()
        except (redis.RedisError, QueueTaken):  # the lease thread tries again within a second
            pass

    def _claim_outcome(self, task_id: str, tracked: bool) -> None:
        if not tracked:
            return
        lapses = self.ownership.lapses
        verdict = self._broker(lambda: self.ledger.finish(task_id, self.incarnation), f"finish {task_id}")
        if verdict == "ok":
            with self._settle_lock:
                self._claims[task_id] = lapses
        if verdict == "answered":
            log.warning("task %s: another delivery of it has already answered (it was re-dispatched while this "
                        "one ran); this outcome is discarded", task_id)
            raise Skipped("answered")

    def settled(self, task_id: str, state: str, retval: Any = None, traceback: str | None = None) -> None:
        """The outcome of ``task_id`` is stored: close its ledger record (batched, off the request's path).

        Settling late is safe: until then the record says its outcome is being
        stored by this incarnation, and if it dies first, recovery finds the
        outcome in the result backend and settles it.
        """
        with self._settle_lock:
            self._to_settle.append((task_id, state))
            claimed = self._claims.pop(task_id, None) is not None
            if claimed and self.conf.replica_wait:  # kept until a replica has it (see _settle_replicated)
                self._unreplicated[task_id] = (retval, traceback)
        self._settle_due.set()

    def may_store(self, task_id: str, state: str) -> bool:
        """Whether Celery may store this outcome now (asked before each try: :mod:`gpu_dispatch.results`).

        Yes for anything but an outcome this worker claimed; for a claimed one, yes while the lease has held
        without a lapse since the claim (no one could have taken it), else only if the ledger says the claim
        is still this worker's — a worker cut off after claiming finds its request re-dispatched and
        answered elsewhere, and stores nothing over that answer.
        """
        if state not in states.READY_STATES:
            return True
        with self._settle_lock:
            lapses = self._claims.get(task_id)
        if lapses is None or self.ownership.live_since(lapses):
            return True
        return self._broker(lambda: self.ledger.claimed_by(task_id, self.incarnation), f"check claim {task_id}")

    def _settle_batches(self) -> None:
        while True:
            self._settle_due.wait()
            if not self._stop.is_set():
                time.sleep(SETTLE_EVERY_S)  # gather a batch: a busy worker settles many in one round trip
            self._settle_due.clear()
            with self._settle_lock:
                batch, self._to_settle = self._to_settle, []
            if batch:
                try:
                    if self.conf.replica_wait:
                        self._settle_replicated(batch)
                    else:
                        self._broker(lambda: self.ledger.settle_many(batch, self.incarnation), "settle outcomes")
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    log.warning("ledger: %d outcomes not settled (%s); recovery settles them", len(batch), exc)
            if self._stop.is_set():
                return

    def _settle_replicated(self, batch: list[tuple[str, str]]) -> None:
        """Settle ``batch`` and ``WAIT`` for a replica to have it: the stored outcomes come before the settle
        in the primary's stream, so one WAIT covers both.  Short of that (the primary died, or the replica
        lags), each outcome is checked on the primary there is now and stored again if a failover lost it."""
        wanted, timeout_ms = self.conf.replica_wait, self.conf.replica_wait_ms
        try:
            replicas = self.ledger.settle_many(batch, self.incarnation, replicas=wanted, timeout_ms=timeout_ms)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("ledger: settling %d outcomes failed (%s); checking they survived", len(batch), exc)
            replicas = -1
        if replicas < wanted:
            for task_id, state in batch:
                self._broker(lambda: self._restore(task_id, state), f"check the outcome of {task_id}")
            replicas = self._broker(lambda: self.ledger.settle_many([], self.incarnation, replicas=wanted,
                                                                    timeout_ms=timeout_ms), "wait for a replica")
            if replicas < wanted:
                log.warning("ledger: %d outcomes on %d of %d replicas within %d ms (GPU_DISPATCH_REPLICA_WAIT)",
                            len(batch), replicas, wanted, timeout_ms)
        with self._settle_lock:
            for task_id, _state in batch:
                self._unreplicated.pop(task_id, None)

    def _restore(self, task_id: str, state: str) -> None:
        """Store the outcome of ``task_id`` again if the primary (after a failover) lacks it, and settle it;
        unless another delivery has answered it meanwhile."""
        backend = self.result_backend()
        with self._settle_lock:
            kept = self._unreplicated.get(task_id)
        if kept is None:
            return
        if backend.get_task_meta(task_id, cache=False).get("status") in states.READY_STATES:
            self.ledger.settle(task_id, self.incarnation, state)
            return
        mine = self.ledger.claimed_by(task_id, self.incarnation) \
            or self.ledger.finish(task_id, self.incarnation) in ("ok", "untracked")
        if not mine:
            log.warning("task %s: its outcome was lost in a failover, and another delivery has answered it", task_id)
            return
        retval, traceback = kept
        backend.store_result(task_id, retval, state, traceback=traceback)
        self.ledger.settle(task_id, self.incarnation, state)
        log.warning("task %s: its outcome was lost in a failover; stored again", task_id)

    @staticmethod
    def result_backend() -> Any:
        """Celery's result backend (this thread's)."""
        from gpu_dispatch.celery import app

        return app.backend

    def _broker(self, call: Callable[[], T], what: str) -> T:
        """``call()``, retried while the broker is unreachable, for at most ``GPU_DISPATCH_BROKER_OUTAGE``."""
        deadline = time.monotonic() + self.conf.broker_outage_seconds
        wait = 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + wait > deadline:
                    raise
                log.warning("ledger: cannot %s (%s); retrying in %.1f s", what, exc, wait)
                time.sleep(wait)
                wait = min(wait * 2, BROKER_RETRY_MAX_S)


def _skip_reason(verdict: str, detail: str) -> str:
    if verdict == "answered":
        return "it has already been answered"
    if verdict == "moved":
        return f"it was re-dispatched (now queue/attempt {detail})"
    if verdict == "held":
        return f"a live worker (incarnation {detail}) runs it"
    if verdict == "again":
        return "this worker is already running it (a second delivery)"
    return verdict


def install(worker: GpuWorker | None) -> None:
    """Make ``worker`` this process's GPU worker (the bootstep calls this), and its fence the result store's."""
    global _current
    _current = worker
    results.install_fence(worker.may_store if worker is not None else None)
