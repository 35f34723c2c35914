"""The dispatcher's live view of the GPUs: Nacos membership, broker-side proof and reading, ledger load.

Two daemon threads keep a :class:`RegistryView` current, so
:meth:`RegistryView.choose` only reads memory under a lock.  ``docs/dispatcher.md``
("What a dispatcher knows").
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import Counter
from typing import Any, Callable

import redis

from dispatcher import metrics
from dispatcher.trust import Verdict, vet
from gpu_dispatch import broker as brokers, ownership
from gpu_dispatch.ledger import Ledger, Load, ledger_mb
from gpu_dispatch.registry import Instance, Registry
from scoring import Candidate, Decision, NoEligibleGpu, Profile, Request, get_profile
from scoring.selector import Selector

log = logging.getLogger(__name__)

#: Seconds a selector may decide on before it is built again (readings age; Fresh must see it).
SELECTOR_MAX_AGE_S = 0.5
#: Request shapes (model, memory) a view keeps a selector for.
SELECTORS = 32
#: Longest wait between two attempts to connect to Nacos, seconds.
CONNECT_BACKOFF_MAX = 5.0


class RegistryView:
    """The GPUs of one Nacos service as this process sees them (see the module docstring).

    :param registry_factory: builds the :class:`~gpu_dispatch.registry.Registry`
        (called on the view's thread, again after a failure).
    :param broker: Redis client of the broker (claims, ledger).
    :param profile: the scoring profile decisions use.
    :param reconcile_interval: seconds between full lists from Nacos.
    :param poll_interval: seconds between passes over the broker.
    :param service: the service's name, for messages.
    :param rng: randomness of the pick; a seeded ``random.Random`` reproduces a run.
    :param registry_outage_after: seconds without an answer from Nacos after which it counts as
        unreachable: workers then prove themselves through the broker alone.
    """

    def __init__(self, *, registry_factory: Callable[[], Registry], broker: redis.Redis, profile: Profile,
                 reconcile_interval: float, poll_interval: float, service: str,
                 rng: random.Random | None = None, registry_outage_after: float | None = None,
                 affinity_slack: float = 0.25) -> None:
        self.profile = profile
        self.affinity_slack = affinity_slack
        self.service = service
        self._registry_factory = registry_factory
        self.broker = broker
        self.ledger = Ledger(broker)
        self._reconcile_interval = reconcile_interval
        self._poll_interval = poll_interval
        self._outage_after = registry_outage_after or 3 * reconcile_interval
        self._rng = rng
        self._lock = threading.Lock()
        self._entries: list[Instance] = []
        self._verdicts: list[Verdict] = []
        self._loads: dict[str, Load] = {}
        self._current: list[Candidate] = []  # the ledger's load at the last pass plus this process's sends since
        self._positions: dict[str, int] = {}  # queue -> index in _current
        self._selectors: dict[tuple, Selector] = {}  # (model, memory MB) -> its decisions over _current
        self._local: dict[str, list[tuple[float, int]]] = {}  # queue -> [(time, MB)] sent since the last pass
        self._heard_at: float | None = None  # time.time() of the last list or push from Nacos
        self._started_at = time.time()
        self._unreachable_since: float | None = None
        self._polled_at: float | None = None
        self._logged: dict[str, str] = {}  # instance -> reason last logged
        self._registry: Registry | None = None
        self._stop = threading.Event()
        self._changed = threading.Event()
        self._nacos_ready = threading.Event()
        self.ready = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def from_config(cls, conf: Any, **overrides: Any) -> "RegistryView":
        """A view built from the settings (``app.conf``, or a mapping of them); ``overrides`` replace settings."""
        def get(name: str) -> Any:
            return overrides[name] if name in overrides else getattr(conf, name)
        return cls(registry_factory=lambda: Registry.from_config(conf, **overrides),
                   broker=brokers.client(get("broker_url"), get("broker_transport_options")),
                   profile=get_profile(get("dispatch_profile"), get("max_reading_age")),
                   reconcile_interval=get("reconcile_interval"), poll_interval=get("queue_depth_interval"),
                   service=get("nacos_service"), rng=overrides.get("rng"), affinity_slack=get("affinity_slack"))

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> "RegistryView":
        """Start the registry and broker threads; returns at once (see :attr:`ready`)."""
        for target, name in ((self._follow_registry, "gpu-dispatch-view"),
                             (self._follow_broker, "gpu-dispatch-broker-view")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def open_registry(self) -> Registry:
        """The view's Nacos client, opened now if it is not yet (a view used without its threads: status)."""
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def close(self) -> None:
        """Stop the threads and close the Nacos client.  Safe to call twice."""
        self._stop.set()
        self._changed.set()
        for thread in self._threads:
            thread.join(5)
        registry, self._registry = self._registry, None
        if registry is not None:
            registry.close()
        self.broker.close()

    # -- decisions -----------------------------------------------------------------

    def candidates(self) -> list[Candidate]:
        """Every trusted GPU with its load: the ledger's at the last pass, plus what this process sent since."""
        with self._lock:
            return list(self._current)

    def choose(self, request: Request, task_id: str = "", *, path: str, prefer: str | None = None) -> Decision:
        """Pick the GPU for ``request`` (call :meth:`sent` once it is recorded in the ledger).

        Decided by a :class:`~scoring.selector.Selector` per request shape, kept
        current as this process sends (only the GPU sent to is evaluated again)
        and rebuilt at every pass over the broker, or once it is older than
        :data:`SELECTOR_MAX_AGE_S` (readings age).

        :param task_id: the request's task id, for the decision's log line.
        :param path: ``producer``, ``central`` or ``recovery``, for the decision counter.
        :param prefer: the queue this request has prefix affinity with (see :func:`scoring.choose`).
        :raises NoEligibleGpu: when no GPU can take it; the message lists why.
        """
        now_ms = int(time.time() * 1000)
        key = (request.model, request.memory_mb)
        with self._lock:
            selector = self._selectors.get(key)
            if selector is None or now_ms - selector.now_ms > SELECTOR_MAX_AGE_S * 1000:
                if len(self._selectors) >= SELECTORS:
                    self._selectors.clear()
                selector = self._selectors[key] = Selector(self._current, request, profile=self.profile,
                                                           now_ms=now_ms, prefer_slack=self.affinity_slack)
            empty = not self._current
            excluded = {v.instance: v.reason for v in self._verdicts if v.reason}
            try:
                decision = selector.choose(self._rng, prefer)
            except NoEligibleGpu as exc:
                if empty and excluded:
                    raise NoEligibleGpu(excluded, request.describe()) from exc
                if empty:
                    raise NoEligibleGpu({}, f"{request.describe()}; service {self.service!r}") from exc
                raise NoEligibleGpu({**exc.reasons, **excluded}, request.describe()) from exc
        chosen = decision.chosen.state
        metrics.DECISIONS.labels(chosen.queue, path).inc()
        if prefer is not None:
            metrics.AFFINITY.labels("kept" if chosen.queue == prefer else "moved").inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s → %s (queue %s) by profile %s; candidates: %s", task_id or "-", chosen.key,
                      chosen.queue, self.profile.name, _rows(decision))
        return decision

    def sent(self, queue: str, memory_mb: float) -> None:
        """Count a request this process has just recorded in the ledger for ``queue``, until the next pass."""
        mb = ledger_mb(memory_mb)
        with self._lock:
            self._local.setdefault(queue, []).append((time.time(), mb))
            index = self._positions.get(queue)
            if index is None:
                return
            c = self._current[index]
            c = self._current[index] = Candidate(c.state, c.queued + 1, c.queued_mb + mb, c.running, c.running_mb)
            for selector in self._selectors.values():
                selector.replace(index, c)

    # -- what status and recovery ask ---------------------------------------------------

    def verdicts(self) -> list[Verdict]:
        """Every registry entry with what became of it (trusted, or excluded and why)."""
        with self._lock:
            return list(self._verdicts)

    def loads(self) -> dict[str, Load]:
        with self._lock:
            return dict(self._loads)

    def heard_within(self, seconds: float) -> bool:
        """Whether Nacos answered this view (list or push) in the last ``seconds``."""
        heard = self._heard_at
        return heard is not None and time.time() - heard <= seconds

    def registry_outage_s(self) -> float | None:
        """Seconds Nacos has not answered this view, while it counts as unreachable; else ``None``."""
        since = self._unreachable_since
        return None if since is None else time.time() - since

    # -- updates -----------------------------------------------------------------------

    def apply(self, instances: list[Instance], source: str) -> None:
        """Replace the membership with ``instances`` (a push or a full list: both are the whole service)."""
        with self._lock:
            before = {i.key for i in self._entries}
            self._entries = list(instances)
            self._heard_at = time.time()
        after = {i.key for i in instances}
        for key in sorted(after - before):
            log.info("instance %s joined service %s", key, self.service)
        for key in sorted(before - after):
            log.info("instance %s left service %s", key, self.service)
        self._nacos_ready.set()
        self._changed.set()  # a pass over the broker now, not at the next tick
        if log.isEnabledFor(logging.DEBUG):
            log.debug("view of %s from %s: %d instances", self.service, source, len(instances))

    def refresh(self) -> None:
        """One pass over the broker: claims, owners and loads; the verdicts and candidates follow."""
        started = time.time()
        with self._lock:
            entries = list(self._entries)
        outage = self._registry_unreachable(started)
        ids = sorted({i.key for i in entries})
        claims = ownership.claims(self.broker, ids)
        claims_only = ([c for c in ownership.live_claims(self.broker) if c.instance not in claims]
                       if outage else [])
        queues = sorted({c.queue for c in claims.values() if c} | {c.queue for c in claims_only})
        owners = ownership.owners(self.broker, queues)
        loads = self.ledger.loads(queues)
        verdicts = vet(entries, claims, owners, int(started * 1000), claims_only=claims_only)
        candidates = [Candidate(v.state, queued=load.queued, queued_mb=load.queued_mb, running=load.running,
                                running_mb=load.running_mb)
                      for v in verdicts if v.state is not None for load in (loads.get(v.state.queue, Load()),)]
        with self._lock:
            for queue in list(self._local):
                kept = [s for s in self._local[queue] if s[0] >= started]  # older sends are in these loads
                if kept:
                    self._local[queue] = kept
                else:
                    del self._local[queue]
            self._verdicts, self._loads = verdicts, loads
            self._current = [_plus(c, self._local.get(c.state.queue)) for c in candidates]
            self._positions = {c.state.queue: i for i, c in enumerate(self._current)}
            self._selectors.clear()
            self._polled_at = time.time()
        self._log_changes(verdicts)
        self._export(verdicts, loads, started)

    def _registry_unreachable(self, now: float) -> bool:
        heard = self._heard_at or self._started_at
        unreachable = now - heard > self._outage_after
        if unreachable and self._unreachable_since is None:
            self._unreachable_since = heard
            log.warning("Nacos has not answered for %.0f s: GPUs now prove themselves through the broker alone "
                        "(their leases, claims and readings); dispatch goes on", now - heard)
        elif not unreachable and self._unreachable_since is not None:
            log.warning("Nacos answers again after %.1f s", now - self._unreachable_since)
            self._unreachable_since = None
        return unreachable

    def _log_changes(self, verdicts: list[Verdict]) -> None:
        seen = {}
        for v in verdicts:
            seen[v.instance] = v.reason or ""
            if self._logged.get(v.instance) != seen[v.instance]:
                if v.reason:
                    log.warning("instance %s of service %s is not used: %s", v.instance, self.service, v.reason)
                elif v.note:
                    log.warning("instance %s of service %s: %s", v.instance, self.service, v.note)
        self._logged = seen

    def _follow_registry(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                if self._registry is None:
                    registry = self._registry_factory()
                    registry.subscribe(lambda instances: self.apply(instances, "push"))
                    self._registry = registry
                self.apply(self._registry.list_instances(healthy_only=False), "list")
                backoff = 0.5
                wait = self._reconcile_interval
            except Exception as exc:  # RegistryError, or the SDK failing to connect: keep the last view
                if self._heard_at is None or time.time() - self._heard_at < self._reconcile_interval * 1.5:
                    log.warning("Nacos did not answer (%s); dispatching from the last view of %s", exc, self.service)
                if self._registry is None:
                    wait, backoff = backoff, min(backoff * 2, CONNECT_BACKOFF_MAX)
                else:
                    wait = min(self._reconcile_interval, CONNECT_BACKOFF_MAX)
            self._stop.wait(wait)

    def _follow_broker(self) -> None:
        failing = False
        while not self._stop.is_set():
            if self._nacos_ready.is_set() or self._registry_unreachable(time.time()):
                try:
                    self.refresh()
                    if failing:
                        log.warning("broker answers again: view of %s current", self.service)
                    failing = False
                    self.ready.set()
                except redis.RedisError as exc:
                    if not failing:
                        log.warning("cannot read claims and loads from the broker (%s); deciding on the last ones",
                                    exc)
                    failing = True
            self._changed.wait(self._poll_interval)
            self._changed.clear()

    def _export(self, verdicts: list[Verdict], loads: dict[str, Load], now: float) -> None:
        now_ms = int(now * 1000)
        for v in verdicts:
            if v.state is None:
                continue
            age = v.state.age_s(now_ms)
            if age is not None:
                metrics.READING_AGE.labels(v.state.queue).set(age)
            load = loads.get(v.state.queue, Load())
            metrics.QUEUE_DEPTH.labels(v.state.queue).set(load.queued)
            metrics.RUNNING.labels(v.state.queue).set(load.running)
        kinds = Counter(v.kind for v in verdicts)
        for kind in metrics.VERDICT_KINDS:
            metrics.INSTANCES.labels(kind).set(kinds.get(kind, 0))
        if self._heard_at is not None:
            metrics.VIEW_AGE.set(now - self._heard_at)
        outage = self.registry_outage_s()
        metrics.REGISTRY_OUTAGE.set(outage or 0.0)


def _plus(candidate: Candidate, sent: list[tuple[float, int]] | None) -> Candidate:
    """``candidate`` with this process's sends since the pass added to what waits there."""
    if not sent:
        return candidate
    return Candidate(candidate.state, candidate.queued + len(sent), candidate.queued_mb + sum(mb for _, mb in sent),
                     candidate.running, candidate.running_mb)


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
    """This process's view once it has heard from Nacos and the broker, else ``None``.

    :param wait: seconds to wait for the view's first pass when it has none
        yet (default ``GPU_DISPATCH_NACOS_TIMEOUT``): only the first calls in
        a process ever wait.
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
