"""The dispatcher's live view of the GPUs: Nacos instances plus what only the dispatcher knows.

One :class:`RegistryView` per process that dispatches (an app on the producer
path, a dispatcher worker).  It holds:

- every instance of the service, parsed with :func:`scoring.parse_instance`
  (a malformed one is kept aside with its reason, logged once, never used);
  kept current by the Nacos **push** subscription and **reconciled** by a full
  list every ``GPU_DISPATCH_RECONCILE_INTERVAL`` seconds;
- the age of every reading (metadata ``updated_at``) and of the view itself
  (when Nacos was last heard from); if Nacos becomes unreachable the last view
  stays in force and its readings age — the scoring's freshness filter then
  decides how long they are trusted;
- per GPU, the requests this process sent since that GPU's last reading
  (reset when a newer ``updated_at`` arrives);
- per GPU, the depth of its broker queue: one pipelined ``LLEN`` for all
  queues every ``GPU_DISPATCH_QUEUE_DEPTH_INTERVAL`` seconds, by a background
  thread — never on the dispatch path.

Two daemon threads do the I/O (registry, queue depths); :meth:`choose` only
reads memory under a lock, so a dispatch costs a scoring decision and nothing
more.  Build one with :meth:`RegistryView.from_config`; the process-wide view
is :func:`current_view`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable

import redis

from dispatcher import metrics
from gpu_dispatch.contract import gpu_queue
from gpu_dispatch.registry import Instance, Registry
from gpu_dispatch.settings import getter
from scoring import (Candidate, Decision, GpuState, MalformedMetadata, NoEligibleGpu, Profile, Request,
                     choose, get_profile, parse_instance)

log = logging.getLogger(__name__)

#: Longest wait between two attempts to connect to Nacos, seconds.
CONNECT_BACKOFF_MAX = 5.0


class RegistryView:
    """The GPUs of one Nacos service as this process sees them (see the module docstring).

    :param registry_factory: builds the :class:`~gpu_dispatch.registry.Registry`
        (called on the view's thread, again after a failure).
    :param broker: Redis client of the broker, for queue depths.
    :param profile: the scoring profile decisions use.
    :param reconcile_interval: seconds between full lists from Nacos.
    :param queue_depth_interval: seconds between counts of the GPU queues.
    :param service: the service's name, for messages.
    :param rng: randomness of the pick; a seeded ``random.Random`` reproduces a run.
    """

    def __init__(self, *, registry_factory: Callable[[], Registry], broker: redis.Redis, profile: Profile,
                 reconcile_interval: float, queue_depth_interval: float, service: str,
                 rng: random.Random | None = None) -> None:
        self.profile = profile
        self.service = service
        self._registry_factory = registry_factory
        self._broker = broker
        self._reconcile_interval = reconcile_interval
        self._depth_interval = queue_depth_interval
        self._rng = rng
        self._lock = threading.Lock()
        self._states: dict[str, GpuState] = {}
        self._sent: dict[str, list[float]] = {}  # key -> [requests, memory MB] since the reading
        self._depths: dict[str, int] = {}
        self._present_queues: frozenset[str] = frozenset()
        self._workers: dict[str, str] = {}  # queue -> Celery node, kept after the instance leaves
        self._malformed: dict[str, str] = {}
        self._heard_at: float | None = None  # time.time() of the last list or push
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self.ready = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, conf: Any, **overrides: Any) -> "RegistryView":
        """A view built from the settings (``app.conf``, or a mapping of them); ``overrides`` replace settings."""
        get = getter(conf, **overrides)
        return cls(registry_factory=lambda: Registry.from_config(conf, **overrides),
                   broker=redis.Redis.from_url(get("broker_url")),
                   profile=get_profile(get("dispatch_profile"), get("max_reading_age")),
                   reconcile_interval=get("reconcile_interval"),
                   queue_depth_interval=get("queue_depth_interval"),
                   service=get("nacos_service"), rng=overrides.get("rng"))

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> "RegistryView":
        """Start the registry and queue-depth threads; returns at once (see :attr:`ready`)."""
        for target, name in ((self._follow_registry, "gpu-dispatch-view"),
                             (self._count_queues, "gpu-dispatch-queue-depth")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def close(self) -> None:
        """Stop the threads and close the Nacos client.  Safe to call twice."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()
        self._broker.close()

    # -- decisions -----------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Every parsed GPU with this process's counts and the last queue depths."""
        with self._lock:
            return self._candidates()

    def _candidates(self) -> list[Candidate]:
        sent, depths = self._sent, self._depths
        out = []
        for key, state in self._states.items():
            counts = sent.get(key)
            out.append(Candidate(state, int(counts[0]), counts[1], depths.get(state.queue)) if counts
                       else Candidate(state, 0, 0.0, depths.get(state.queue)))
        return out

    def choose(self, request: Request, task_id: str = "", *, path: str) -> Decision:
        """Pick the GPU for ``request`` and count the send to it.

        :param task_id: the request's task id, for the decision's log line.
        :param path: ``producer``, ``central`` or ``rescue``, for the decision counter.
        :raises NoEligibleGpu: when no GPU can take it; the message lists why.
        """
        now_ms = int(time.time() * 1000)
        with self._lock:
            candidates = self._candidates()
            try:
                decision = choose(candidates, request, profile=self.profile, rng=self._rng, now_ms=now_ms)
            except NoEligibleGpu as exc:
                if not candidates and self._malformed:
                    raise NoEligibleGpu(dict(self._malformed), request.describe()) from exc
                if not candidates:
                    raise NoEligibleGpu({}, f"{request.describe()}; service {self.service!r}") from exc
                raise
            chosen = decision.chosen.state
            counts = self._sent.setdefault(chosen.key, [0, 0.0])
            counts[0] += 1
            counts[1] += request.memory_mb
        metrics.DECISIONS.labels(chosen.key, path).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s → %s (queue %s) by profile %s; candidates: %s", task_id or "-", chosen.key,
                      chosen.queue, self.profile.name, _rows(decision))
        return decision

    # -- what the orphan rescue asks -------------------------------------------------

    def heard_within(self, seconds: float) -> bool:
        """Whether Nacos answered (list or push) in the last ``seconds``: the view can be trusted
        to say which GPUs are gone."""
        heard = self._heard_at
        return heard is not None and time.time() - heard <= seconds

    def present_queues(self) -> frozenset[str]:
        """Queues of every instance in the service now, malformed ones included."""
        return self._present_queues

    def last_worker(self, queue: str) -> str | None:
        """The Celery node that last published ``queue`` in its metadata, even after it left."""
        with self._lock:
            return self._workers.get(queue)

    def malformed(self) -> dict[str, str]:
        """Instances skipped for malformed metadata, by key, with the reason."""
        with self._lock:
            return dict(self._malformed)

    # -- updates -----------------------------------------------------------------------

    def apply(self, instances: list[Instance], source: str) -> None:
        """Replace the view with ``instances`` (a push or a full list: both are the whole service)."""
        now_ms = int(time.time() * 1000)
        states: dict[str, GpuState] = {}
        malformed: dict[str, str] = {}
        queues = set()
        workers = {}
        for instance in instances:
            queue = instance.metadata.get("queue") or gpu_queue(instance.ip, instance.port)
            queues.add(queue)
            if instance.metadata.get("worker"):
                workers[queue] = instance.metadata["worker"]
            try:
                states[instance.key] = parse_instance(instance.ip, instance.port, instance.metadata,
                                                      healthy=instance.healthy, enabled=instance.enabled,
                                                      now_ms=now_ms)
            except MalformedMetadata as exc:
                malformed[instance.key] = exc.reason
        with self._lock:
            for key, reason in malformed.items():
                if self._malformed.get(key) != reason:
                    log.warning("skipping instance %s of service %s: %s", key, self.service, reason)
            for key, state in states.items():
                old = self._states.get(key)
                if old is None or (state.updated_at_ms or 0) > (old.updated_at_ms or 0):
                    self._sent.pop(key, None)  # the new reading includes what we sent before it
            for key in set(self._states) - set(states):
                log.info("GPU %s (queue %s) left service %s", key, self._states[key].queue, self.service)
                self._sent.pop(key, None)
            for key in set(states) - set(self._states):
                log.info("GPU %s (queue %s) joined service %s", key, states[key].queue, self.service)
            self._states = states
            self._malformed = malformed
            self._present_queues = frozenset(queues)
            self._workers.update(workers)
            self._heard_at = time.time()
        metrics.MALFORMED.set(len(malformed))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("view of %s from %s: %d GPUs, %d malformed", self.service, source, len(states),
                      len(malformed))

    def _follow_registry(self) -> None:
        backoff = 0.5
        unreachable_since: float | None = None
        while not self._stop.is_set():
            try:
                if self._registry is None:
                    registry = self._registry_factory()
                    registry.subscribe(lambda instances: self.apply(instances, "push"))
                    self._registry = registry
                self.apply(self._registry.list_instances(healthy_only=False), "list")
                self.ready.set()
                if unreachable_since is not None:
                    log.warning("Nacos answers again after %.1f s; view of %s reconciled", time.time()
                                - unreachable_since, self.service)
                    unreachable_since = None
                backoff = 0.5
                wait = self._reconcile_interval
            except Exception as exc:  # RegistryError, or the SDK failing to connect: keep the last view
                if unreachable_since is None:
                    unreachable_since = time.time()
                    log.warning("Nacos unreachable (%s); dispatching from the last view of %s, whose readings "
                                "now age", exc, self.service)
                if self._registry is None:
                    wait, backoff = backoff, min(backoff * 2, CONNECT_BACKOFF_MAX)
                else:
                    wait = min(self._reconcile_interval, CONNECT_BACKOFF_MAX)
            self._stop.wait(wait)

    def _count_queues(self) -> None:
        failing = False
        while not self._stop.wait(self._depth_interval):
            with self._lock:
                states = list(self._states.values())
            if states:
                try:
                    with self._broker.pipeline(transaction=False) as pipe:
                        for state in states:
                            pipe.llen(state.queue)
                        depths = pipe.execute()
                except redis.RedisError as exc:
                    if not failing:
                        log.warning("cannot count GPU queues on the broker (%s); scoring on the last counts", exc)
                    failing = True
                    continue
                failing = False
                with self._lock:
                    self._depths = {s.queue: d for s, d in zip(states, depths)}
            self._export(states)

    def _export(self, states: list[GpuState]) -> None:
        now_ms = int(time.time() * 1000)
        depths = self._depths
        for state in states:
            age = state.age_s(now_ms)
            if age is not None:
                metrics.READING_AGE.labels(state.key).set(age)
            metrics.QUEUE_DEPTH.labels(state.key).set(depths.get(state.queue, 0))
        if self._heard_at is not None:
            metrics.VIEW_AGE.set(time.time() - self._heard_at)


def _rows(decision: Decision) -> str:
    return ", ".join(f"{r['key']}={'dropped: ' + r['dropped'] if r['dropped'] else format(r['score'], '.3f')}"
                     f"{' (p=' + format(r['probability'], '.2f') + ')' if r['score'] is not None else ''}"
                     for r in decision.as_rows())


# -- the process's view ------------------------------------------------------------------

_lock = threading.Lock()
_views: dict[int, RegistryView] = {}  # by pid: a view's threads and gRPC channel do not survive fork()
_installed: RegistryView | None = None


def process_view(app: Any) -> RegistryView:
    """This process's view (the installed one, or one started on first use from ``app.conf``), ready or not."""
    view = _installed or _views.get(os.getpid())
    if view is None:
        with _lock:
            view = _views.get(os.getpid())
            if view is None:
                view = _views[os.getpid()] = RegistryView.from_config(app.conf).start()
    return view


def current_view(app: Any, wait: float | None = None) -> RegistryView | None:
    """This process's view once it has heard from Nacos, else ``None``.

    :param wait: seconds to wait for the view's first list from Nacos when it
        has none yet (default ``GPU_DISPATCH_NACOS_TIMEOUT``): only the first
        calls in a process ever wait.
    """
    view = process_view(app)
    if view.ready.is_set():
        return view
    view.ready.wait(app.conf.nacos_timeout if wait is None else wait)
    return view if view.ready.is_set() else None


def install(view: RegistryView | None) -> None:
    """Make ``view`` this process's view (tests, benchmarks, apps with their own settings); ``None`` undoes it."""
    global _installed
    _installed = view


def close_views() -> None:
    """Close the view this process started (on worker shutdown)."""
    with _lock:
        view = _views.pop(os.getpid(), None)
    if view is not None:
        view.close()
