"""A discrete-event simulation of a shared GPU cluster, for comparing dispatch policies.

What is modelled (every constant is in :class:`ClusterConfig` or below, with its unit):

- **GPUs.**  ``gpus`` cards of ``memory_total_mb`` each.  A card runs at most
  ``slots`` of our requests at once (its worker's inference slots).  Requests
  sent to a card wait in its FIFO line; the head is admitted to the card's
  memory when it fits beside the other tenants' and our running requests'
  (strict FIFO: the head blocks the rest), as :mod:`workers.admission` does.
  Admission fails open — the head is admitted when none of ours runs, even
  if it does not fit.  Admitted with none of ours running and still not
  fitting means the other tenants leave too little even for it alone (they
  grew since the reading the dispatcher decided on): the worker **hands it
  back**, and recovery re-dispatches it ``handback_delay_s`` later (its sweep
  period), to any card but that one.  A request handed back more than
  ``max_handbacks`` times fails as **could not fit**.
- **Speed.**  Processor sharing with a batching benefit: each of ``n``
  running requests decodes at ``tokens_per_s * speed / (1 + batch_slowdown *
  (n - 1))``, where ``speed = 1 - tenant_drag * tenant_util / 100`` — the
  card slows as our batch grows and as the other tenants compute.
- **Other tenants.**  Each card's other tenants hold one of
  :data:`TENANT_MEMORY_MB` and compute at one of :data:`TENANT_UTIL`.  With
  ``tenant_coupled`` both move together (one level: a tenant that loads a
  bigger model also computes more), jumping to another level, any one, after
  an exponential dwell of mean ``tenant_dwell_s``; otherwise memory and
  compute each step to a neighbouring level after their own dwell.
- **Requests.**  Poisson arrivals at ``load`` × the cluster's estimated
  capacity; lognormal work (tokens); memory need lognormal or uniform, the
  dispatcher's estimate equal to the real need.  Arrivals are dealt to the
  ``dispatchers`` in turn.
- **What a dispatcher knows** (as :class:`dispatcher.view.RegistryView` does):
  every ``queue_depth_interval_s`` (a random phase per dispatcher) it polls
  the request ledger, which all dispatchers share, for each card's requests
  queued (sent, not running yet — in the card's line) with their declared
  memory, and running with their memory, and takes each card's last
  metadata reading (published every ``refresh_s``, a random phase per card:
  the seed article's keys plus ``held_mb``, our own requests' memory at the
  reading, parsed with the real :func:`scoring.parse_instance`).  Between
  polls it adds its own sends since the last one to the queued counts.  So a
  decision is made on ``Candidate(reading, queued=ledger + own sends since,
  queued_mb, running, running_mb)`` and the real :func:`scoring.choose`.
  Reported ``gpu_util`` combines the tenants' with our own duty cycle
  (:data:`OUR_DUTY_PER_REQUEST` per running request), so it saturates near
  100 % on any busy card, as NVML's does.
- **No eligible GPU.**  When ``choose`` raises :class:`scoring.NoEligibleGpu`
  the request is retried as ``dispatch_inference`` retries it
  (:func:`dispatcher.tasks.backoff`: 0.5 s doubling up to 5 s) and fails
  with ``NoGpuAvailable`` once the waits reach ``no_gpu_wait_s``
  (``GPU_DISPATCH_NO_GPU_WAIT``).  Such a failure is **false** when at that
  moment some card could really hold the request (its total memory less its
  other tenants' true use is at least the need).
- **Shared-queue pull** (Celery's default): one queue; a card's worker takes
  the next message whenever it has a free slot and nothing waiting for
  memory (prefetch 1, the most favourable setting); blind to memory and
  speed.  Its requests are handed back like any other.
- **Oracles** read the true state of every card at the moment of decision.

The trace (arrivals, tenant changes, reading and polling phases) depends only
on the workload, the number of cards, the load and the seed — not on the
refresh period nor the number of dispatchers — so every policy and every
setting sees the identical trace; the policies' own randomness comes from a
generator seeded the same way.  A run stops admitting work at ``duration_s``
and then drains, so a policy that overloads a card pays for it in latency
instead of leaving work uncounted.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import celeryconfig
from dispatcher.tasks import backoff, waited_after
from gpu_dispatch.contract import METADATA_SCHEMA
from scoring import Candidate, NoEligibleGpu, Profile, Request, choose, get_profile, parse_instance

#: Memory levels the other tenants of a card move between, MB (idle … nearly full).
TENANT_MEMORY_MB = (2048, 20480, 40960, 61440, 75776)
#: Compute levels the other tenants of a card move between, % utilisation.
TENANT_UTIL = (5.0, 25.0, 50.0, 75.0, 90.0)
#: Fraction of the card's time one of our running requests keeps its kernels busy (reported utilisation).
OUR_DUTY_PER_REQUEST = 0.35
#: Unix ms of simulated time 0 (readings carry real-looking ``updated_at`` stamps).
EPOCH_MS = 1_700_000_000_000
#: Model every simulated card serves.
MODEL = "llama-7b"
#: Requests sampled to estimate the mean work and memory of a request (fixed seed).
_SIZE_SAMPLE = 50_000
#: Most dispatchers a trace has polling phases for.
MAX_DISPATCHERS = 16

_ARRIVAL, _COMPLETE, _TENANT, _REFRESH, _RETRY, _REDISPATCH = range(6)


def _default(env: str) -> float:
    """A setting's declared default (not the environment's value: runs reproduce anywhere)."""
    return float(celeryconfig.SETTINGS[env].default)


@dataclass(frozen=True)
class ClusterConfig:
    """The simulated cluster and workload; every default is the ``long`` workload family's.

    :param gpus: number of cards.
    :param memory_total_mb: memory per card, MB (80 GB).
    :param slots: most of our requests a card runs at once (published as ``max_concurrency``).
    :param tokens_per_s: decode speed of one request alone on an idle card, tokens/s.
    :param batch_slowdown: each extra running request slows every running one by this fraction.
    :param tenant_drag: fraction of a card's speed the other tenants take at 100 % utilisation.
    :param tenant_dwell_s: mean seconds a card's tenants stay at one level.
    :param tenant_coupled: the tenants' memory and compute move together, to any level;
        otherwise each steps to a neighbouring level on its own.
    :param refresh_s: seconds between a card's metadata readings.
    :param queue_depth_interval_s: seconds between a dispatcher's polls of the request ledger
        (``GPU_DISPATCH_QUEUE_DEPTH_INTERVAL``).
    :param no_gpu_backoff_s: first wait before retrying a request no card took (``GPU_DISPATCH_NO_GPU_BACKOFF``).
    :param no_gpu_backoff_max_s: longest wait between retries (``GPU_DISPATCH_NO_GPU_BACKOFF_MAX``).
    :param no_gpu_wait_s: waits after which the request fails with ``NoGpuAvailable`` (``GPU_DISPATCH_NO_GPU_WAIT``).
    :param handback_delay_s: seconds from a hand-back to its re-dispatch (``GPU_DISPATCH_RESCUE_INTERVAL``).
    :param max_handbacks: hand-backs after which a request fails as could not fit.
    :param duration_s: seconds of arrivals.
    :param warmup_s: seconds of arrivals left out of the statistics.
    :param tokens_median: median work of a request, tokens (lognormal).
    :param tokens_sigma: lognormal sigma of the work.
    :param tokens_max: largest work, tokens.
    :param memory_uniform: memory need uniform in ``[memory_min_mb, memory_max_mb]``; otherwise lognormal.
    :param memory_median_mb: median memory need of a request, MB (lognormal).
    :param memory_sigma: lognormal sigma of the memory need.
    :param memory_min_mb: smallest memory need, MB.
    :param memory_max_mb: largest memory need, MB.
    """

    gpus: int = 8
    memory_total_mb: int = 81920
    slots: int = 8
    tokens_per_s: float = 30.0
    batch_slowdown: float = 0.15
    tenant_drag: float = 0.7
    tenant_dwell_s: float = 600.0
    tenant_coupled: bool = False
    refresh_s: float = 5.0
    queue_depth_interval_s: float = _default("GPU_DISPATCH_QUEUE_DEPTH_INTERVAL")
    no_gpu_backoff_s: float = _default("GPU_DISPATCH_NO_GPU_BACKOFF")
    no_gpu_backoff_max_s: float = _default("GPU_DISPATCH_NO_GPU_BACKOFF_MAX")
    no_gpu_wait_s: float = _default("GPU_DISPATCH_NO_GPU_WAIT")
    handback_delay_s: float = _default("GPU_DISPATCH_RESCUE_INTERVAL")
    max_handbacks: int = 3
    duration_s: float = 7200.0
    warmup_s: float = 600.0
    tokens_median: float = 250.0
    tokens_sigma: float = 0.8
    tokens_max: float = 4000.0
    memory_uniform: bool = False
    memory_median_mb: float = 2048.0
    memory_sigma: float = 0.8
    memory_min_mb: float = 256.0
    memory_max_mb: float = 24576.0

    def speed(self, util_level: int) -> float:
        """Fraction of an idle card's speed left by tenants computing at ``util_level``."""
        return 1.0 - self.tenant_drag * TENANT_UTIL[util_level] / 100.0

    def sample_size(self, rng: random.Random) -> tuple[float, float]:
        """One request's (work in tokens, memory need in MB)."""
        tokens = min(self.tokens_max, max(1.0, rng.lognormvariate(math.log(self.tokens_median), self.tokens_sigma)))
        if self.memory_uniform:
            memory = rng.uniform(self.memory_min_mb, self.memory_max_mb)
        else:
            memory = min(self.memory_max_mb, max(self.memory_min_mb,
                                                 rng.lognormvariate(math.log(self.memory_median_mb),
                                                                    self.memory_sigma)))
        return tokens, memory


@dataclass(frozen=True)
class Family:
    """A workload family: what changes in :class:`ClusterConfig` from its defaults, and why."""

    name: str
    description: str
    overrides: dict

    def config(self, **more) -> ClusterConfig:
        return ClusterConfig(**{**self.overrides, **more})


#: The workload families of the benchmark.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("long", "median 8.3 s alone (250 tokens, σ 0.8), 0.25–24 GB (median 2 GB); tenants' memory and "
                   "compute step independently, dwell 10 min", {}),
    Family("short", "median 2 s alone (60 tokens, σ 0.6), 2–10 GB uniform; tenants' memory and compute "
                    "jump together, dwell 60 s",
           dict(tokens_median=60.0, tokens_sigma=0.6, tokens_max=1200.0, memory_uniform=True,
                memory_min_mb=2048.0, memory_max_mb=10240.0, tenant_coupled=True, tenant_dwell_s=60.0,
                warmup_s=120.0)),
    Family("short-tail", "median 2 s alone (60 tokens, σ 1.2: 1 % over 33 s), 2–10 GB (median 4 GB); "
                         "tenants' memory and compute jump together, dwell 60 s",
           dict(tokens_median=60.0, tokens_sigma=1.2, tokens_max=2400.0, memory_median_mb=4096.0,
                memory_sigma=0.6, memory_min_mb=2048.0, memory_max_mb=10240.0, tenant_coupled=True,
                tenant_dwell_s=60.0, warmup_s=120.0)),
)}


@dataclass(frozen=True)
class Trace:
    """Everything random about a run that is not a policy's own choice.

    :param arrivals: ``(time_s, tokens, memory_mb)`` in time order.
    :param initial_levels: each card's tenants' ``(memory level, compute level)`` at time 0.
    :param tenant_changes: ``(time_s, gpu, memory level, compute level)`` in time order.
    :param refresh_phase: each card's first reading, as a fraction of the refresh period.
    :param poll_phase: each dispatcher's first ledger poll, as a fraction of the poll period.
    :param capacity_rps: the cluster's estimated capacity, requests/s.
    :param mean_tokens: the mean work of a request, tokens.
    :param residual_tokens: entry ``i``: the expected work left of a request that has done ``i``
        tokens (its mean residual life), tokens.
    """

    arrivals: list[tuple[float, float, float]]
    initial_levels: list[tuple[int, int]]
    tenant_changes: list[tuple[float, int, int, int]]
    refresh_phase: list[float]
    poll_phase: list[float]
    capacity_rps: float
    mean_tokens: float
    residual_tokens: tuple[float, ...]


@lru_cache(maxsize=16)
def _size_stats(config: ClusterConfig) -> tuple[float, float, tuple[float, ...]]:
    """(mean tokens, mean memory MB, mean residual tokens by tokens done) of the workload."""
    rng = random.Random(0)
    sample = [config.sample_size(rng) for _ in range(_SIZE_SAMPLE)]
    tokens = sorted(s[0] for s in sample)
    suffix = [0.0] * (len(tokens) + 1)
    for i in range(len(tokens) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + tokens[i]
    residual = []
    for done in range(int(config.tokens_max) + 1):
        i = bisect_right(tokens, done)
        longer = len(tokens) - i
        residual.append(suffix[i] / longer - done if longer else 1.0)
    return suffix[0] / len(tokens), sum(s[1] for s in sample) / len(sample), tuple(residual)


def _sizes_key(config: ClusterConfig) -> ClusterConfig:
    """The part of ``config`` request sizes depend on (so the statistics are cached per workload)."""
    return ClusterConfig(tokens_median=config.tokens_median, tokens_sigma=config.tokens_sigma,
                         tokens_max=config.tokens_max, memory_uniform=config.memory_uniform,
                         memory_median_mb=config.memory_median_mb, memory_sigma=config.memory_sigma,
                         memory_min_mb=config.memory_min_mb, memory_max_mb=config.memory_max_mb)


def make_trace(config: ClusterConfig, load: float, seed: int) -> Trace:
    """The trace for ``load`` (fraction of estimated capacity) and ``seed``.

    Capacity is what the cluster would serve if every card always ran the
    largest batch its tenants leave memory for (at the mean request memory,
    at most ``slots``), averaged over the trace's tenant levels and divided by
    the mean work of a request.  It is an estimate: load 0.9 means arrivals at
    90 % of it.
    """
    rng = random.Random(seed)
    top = len(TENANT_MEMORY_MB) - 1
    end = config.duration_s * 3  # tenants keep changing while the run drains
    changes: list[tuple[float, int, int, int]] = []
    if config.tenant_coupled:
        levels = []
        for gpu in range(config.gpus):
            level = rng.randint(0, top)
            levels.append((level, level))
            t = rng.expovariate(1.0 / config.tenant_dwell_s)
            while t < end:
                level = rng.choice([x for x in range(top + 1) if x != level])
                changes.append((t, gpu, level, level))
                t += rng.expovariate(1.0 / config.tenant_dwell_s)
        changes.sort()
    else:
        levels = [(rng.randint(0, top), rng.randint(0, top)) for _ in range(config.gpus)]
        moves: list[tuple[float, int, int, int]] = []  # (time_s, gpu, which: 0 memory / 1 compute, step)
        for gpu in range(config.gpus):
            for which in (0, 1):
                t = rng.expovariate(1.0 / config.tenant_dwell_s)
                while t < end:
                    moves.append((t, gpu, which, rng.choice((-1, 1))))
                    t += rng.expovariate(1.0 / config.tenant_dwell_s)
        moves.sort()
        current = [list(pair) for pair in levels]
        for t, gpu, which, step in moves:
            current[gpu][which] = min(top, max(0, current[gpu][which] + step))
            changes.append((t, gpu, current[gpu][0], current[gpu][1]))
    refresh_phase = [rng.random() for _ in range(config.gpus)]
    poll_phase = [rng.random() for _ in range(MAX_DISPATCHERS)]

    mean_tokens, mean_memory, residual = _size_stats(_sizes_key(config))
    capacity = _capacity_tokens_per_s(config, levels, changes, mean_memory) / mean_tokens

    rate = load * capacity
    arrivals = []
    t = rng.expovariate(rate)
    while t < config.duration_s:
        tokens, memory = config.sample_size(rng)
        arrivals.append((t, tokens, memory))
        t += rng.expovariate(rate)
    return Trace(arrivals, levels, changes, refresh_phase, poll_phase, capacity, mean_tokens, residual)


def _capacity_tokens_per_s(config: ClusterConfig, levels: list[tuple[int, int]],
                           changes: list[tuple[float, int, int, int]], mean_memory_mb: float) -> float:
    def throughput(memory_level: int, util_level: int) -> float:
        room = config.memory_total_mb - TENANT_MEMORY_MB[memory_level]
        n = max(1, min(config.slots, int(room // mean_memory_mb)))
        return n * config.tokens_per_s * config.speed(util_level) / (1.0 + config.batch_slowdown * (n - 1))

    total = 0.0
    current = list(levels)
    since = [0.0] * config.gpus
    for t, gpu, memory_level, util_level in changes:
        if t >= config.duration_s:
            break
        total += throughput(*current[gpu]) * (t - since[gpu])
        current[gpu], since[gpu] = (memory_level, util_level), t
    for gpu in range(config.gpus):
        total += throughput(*current[gpu]) * (config.duration_s - since[gpu])
    return total / config.duration_s


class Job:
    """One request on its way through the cluster."""

    __slots__ = ("arrival_s", "tokens", "memory_mb", "dispatcher", "remaining", "retries", "handbacks",
                 "exclude", "counted", "sent_s", "started_s", "gpu")

    def __init__(self, arrival_s: float, tokens: float, memory_mb: float, dispatcher: int, counted: bool) -> None:
        self.arrival_s = arrival_s
        self.tokens = tokens
        self.memory_mb = memory_mb
        self.dispatcher = dispatcher
        self.remaining = tokens
        self.retries = 0  # retries of the current wait for an eligible GPU
        self.handbacks = 0
        self.exclude = -1  # the card that handed it back, for its re-dispatch
        self.counted = counted
        self.sent_s = self.started_s = math.nan  # last sent to a card; admitted there
        self.gpu = -1  # the card it was last sent to


class Gpu:
    """One simulated card, as the policies may inspect it (the oracles read everything)."""

    __slots__ = ("index", "key", "util_level", "speed", "tenant_mb", "running", "line", "line_mb", "used_mb",
                 "last_s", "version", "ledger", "readings")

    def __init__(self, index: int, util_level: int, speed: float, tenant_mb: float) -> None:
        self.index = index
        self.key = f"10.0.{index // 250}.{index % 250 + 1}:{8000 + index}"
        self.util_level = util_level
        self.speed = speed
        self.tenant_mb = tenant_mb
        self.running: list[Job] = []
        self.line: deque[Job] = deque()  # sent to the card, not admitted yet
        self.line_mb = 0.0
        self.used_mb = 0.0  # memory of our running requests
        self.last_s = 0.0
        self.version = 0
        #: ``(time_s, queued, queued_mb, running, running_mb)`` at each change, back to what a poll can still see.
        self.ledger: deque = deque([(0.0, 0, 0.0, 0, 0.0)])
        #: ``(time_s, GpuState)`` of the readings a poll can still see.
        self.readings: deque = deque()


class Dispatcher:
    """One dispatcher's view: the ledger and readings at its last poll, plus its own sends since."""

    __slots__ = ("phase_s", "polled_at", "snapshot", "pending", "own", "turn")

    def __init__(self, phase_s: float) -> None:
        self.phase_s = phase_s
        self.polled_at = -math.inf
        self.snapshot: list[Candidate] = []
        self.pending: deque = deque()  # (time_s, gpu, MB) sent since the last poll
        self.own: dict[int, list] = {}  # gpu -> [count, MB] of those sends
        self.turn = 0


@dataclass
class RunResult:
    """What became of the requests that arrived after the warm-up.

    Latency is from arrival to completion.  A request that failed has no
    latency; quantiles count it as infinitely late (it sorts after every
    completed one), the mean is over completed requests only.

    :param latencies_s: latency of every completed request, sorted.
    :param requests: requests counted (completed plus failed).
    :param no_gpu: failed with ``NoGpuAvailable`` (no eligible GPU for ``no_gpu_wait_s``).
    :param false_no_gpu: of those, failed while some card could really hold them.
    :param could_not_fit: failed after more than ``max_handbacks`` hand-backs.
    :param handbacks: hand-backs (a request may be handed back more than once).
    """

    latencies_s: list[float]
    requests: int
    no_gpu: int = 0
    false_no_gpu: int = 0
    could_not_fit: int = 0
    handbacks: int = 0

    @property
    def failed(self) -> int:
        return self.no_gpu + self.could_not_fit

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0–1) over every counted request, nearest rank; failures are infinite."""
        if not self.requests:
            return math.nan
        rank = min(self.requests, max(1, math.ceil(q * self.requests)))
        return self.latencies_s[rank - 1] if rank <= len(self.latencies_s) else math.inf

    @property
    def mean_s(self) -> float:
        """Mean latency of the completed requests."""
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else math.nan

    @staticmethod
    def pooled(results: list["RunResult"]) -> "RunResult":
        return RunResult(sorted(x for r in results for x in r.latencies_s), sum(r.requests for r in results),
                         sum(r.no_gpu for r in results), sum(r.false_no_gpu for r in results),
                         sum(r.could_not_fit for r in results), sum(r.handbacks for r in results))


# -- policies --------------------------------------------------------------------------------------------


class Policy:
    """Chooses a card for a request; ``None`` when it sees none that can take it (the request is retried)."""

    #: Set for the shared queue: the card's slots; its requests are pulled, not sent.
    pull_slots: int | None = None

    def decide(self, sim: "Simulation", dispatcher: Dispatcher, job: Job, exclude: int) -> int | None:
        raise NotImplementedError


class RandomPolicy(Policy):
    """Any card, uniformly."""

    def decide(self, sim, dispatcher, job, exclude):
        n = len(sim.gpus)
        if exclude < 0:
            return sim.rng.randrange(n)
        i = sim.rng.randrange(n - 1)
        return i + (i >= exclude)


class RoundRobinPolicy(Policy):
    """The next card in turn (each dispatcher keeps its own turn, all starting at the same card)."""

    def decide(self, sim, dispatcher, job, exclude):
        n = len(sim.gpus)
        dispatcher.turn += 1
        if dispatcher.turn % n == exclude:
            dispatcher.turn += 1
        return dispatcher.turn % n


class ProfilePolicy(Policy):
    """The real :func:`scoring.choose` with a scoring profile, on what the dispatcher knows."""

    def __init__(self, profile: Profile | str) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile

    def decide(self, sim, dispatcher, job, exclude):
        try:
            decision = choose(sim.candidates(dispatcher, exclude), Request(MODEL, job.memory_mb),
                              profile=self.profile, rng=sim.rng, now_ms=sim.now_ms)
        except NoEligibleGpu:
            return None
        return decision.chosen.state.gpu_index


class PullPolicy(Policy):
    """One shared queue every card's worker pulls from when it has a free slot (Celery's default)."""

    def __init__(self, slots: int) -> None:
        self.pull_slots = slots


class OraclePolicy(Policy):
    """The card where the request would finish first, from perfect, fresh knowledge of every card.

    Join the shortest expected delay: knows each card's true tenant memory
    and compute, running requests and line at the moment of the decision,
    and plays each card forward with no further arrivals, among the cards
    whose other tenants leave room for the request (none: it is retried).
    Greedy: the best card for this request, not a schedule for all.  Like any
    real dispatcher it does not know how many tokens a request will generate:
    it counts a waiting request as the mean request, and a running one as the
    expected rest of a request that has come this far (the workload's mean
    residual life); ``clairvoyant=True`` also knows every request's true
    length (a bound no dispatcher can reach).
    """

    def __init__(self, *, clairvoyant: bool = False) -> None:
        self.clairvoyant = clairvoyant

    def decide(self, sim, dispatcher, job, exclude):
        config = sim.config
        total, need = config.memory_total_mb, job.memory_mb
        estimate = job.tokens if self.clairvoyant else sim.mean_tokens
        fits = [g for g in sim.gpus if g.index != exclude and total - g.tenant_mb >= need]
        fits.sort(key=lambda g: -g.speed)
        best, best_s = None, math.inf
        for gpu in fits:
            if estimate / (config.tokens_per_s * gpu.speed) >= best_s:
                break  # the soonest it could finish even alone there: no card from here on is better
            finish = self._finish_time(sim, gpu, job, estimate, best_s)
            if finish < best_s:
                best, best_s = gpu.index, finish
        return best

    def _finish_time(self, sim: "Simulation", gpu: Gpu, job: Job, estimate: float, bound: float) -> float:
        """Seconds until ``job`` would complete on ``gpu`` with no further arrivals; ``inf`` past ``bound``.

        Every running request gets the same rate, so they finish in the order of the work they have
        left: a heap of "work done on the card when it finishes" plays the card forward.
        """
        config = sim.config
        room = config.memory_total_mb - gpu.tenant_mb
        gpu_rate = config.tokens_per_s * gpu.speed
        slowdown, slots = config.batch_slowdown, config.slots
        if self.clairvoyant:
            running = [(j.remaining, j.memory_mb, False) for j in gpu.running]
            waiting = deque((j.tokens, j.memory_mb) for j in gpu.line if j.memory_mb <= room)
        else:
            residual, last = sim.residual_tokens, len(sim.residual_tokens) - 1
            running = [(residual[min(last, int(j.tokens - j.remaining))], j.memory_mb, False) for j in gpu.running]
            mean = sim.mean_tokens
            waiting = deque((mean, j.memory_mb) for j in gpu.line if j.memory_mb <= room)
        heapq.heapify(running)
        waiting.append((estimate, job.memory_mb))
        mine_at = len(waiting)
        used = gpu.used_mb
        done = t = 0.0
        admitted = 0
        while True:
            while waiting and len(running) < slots and (waiting[0][1] <= room - used or not running):
                tokens, memory = waiting.popleft()
                admitted += 1
                heapq.heappush(running, (done + tokens, memory, admitted == mine_at))
                used += memory
            n = len(running)
            at, memory, mine = heapq.heappop(running)
            t += (at - done) * (1.0 + slowdown * (n - 1)) / gpu_rate
            if mine:
                return t
            if t >= bound:
                return math.inf
            done = at
            used -= memory


# -- the simulation ----------------------------------------------------------------------------------------


class Simulation:
    """One run of a trace through a policy; the state a policy decides on."""

    def __init__(self, config: ClusterConfig, trace: Trace, policy: Policy, *, dispatchers: int, seed: int) -> None:
        if not 1 <= dispatchers <= MAX_DISPATCHERS:
            raise ValueError(f"dispatchers: {dispatchers} is not within 1–{MAX_DISPATCHERS}")
        self.config = config
        self.trace = trace
        self.policy = policy
        self.rng = random.Random(seed)
        self.mean_tokens = trace.mean_tokens
        self.residual_tokens = trace.residual_tokens
        self.slots = policy.pull_slots or config.slots
        self.now_s = 0.0
        self.gpus = [Gpu(i, util_level, config.speed(util_level), TENANT_MEMORY_MB[memory_level])
                     for i, (memory_level, util_level) in enumerate(trace.initial_levels)]
        interval = config.queue_depth_interval_s
        self.dispatchers = [Dispatcher(trace.poll_phase[i] * interval) for i in range(dispatchers)]
        self.shared: deque[Job] = deque()
        self._events: list = []
        self._seq = 0
        self._outstanding = 0
        self._latencies: list[float] = []
        self._counted = 0
        self._no_gpu = self._false_no_gpu = self._could_not_fit = self._handbacks = 0
        #: Set to a list to keep every counted request that completed (for analysis).
        self.completed: list[Job] | None = None

    @property
    def now_ms(self) -> int:
        return EPOCH_MS + int(self.now_s * 1000)

    # -- what a dispatcher sees ------------------------------------------------------------------------

    def candidates(self, dispatcher: Dispatcher, exclude: int = -1) -> list[Candidate]:
        """The cards as ``dispatcher`` sees them now: ledger and readings at its last poll, its own sends since."""
        self._poll(dispatcher)
        out = dispatcher.snapshot
        if dispatcher.own:
            out = list(out)
            for index, (count, mb) in dispatcher.own.items():
                c = out[index]
                out[index] = Candidate(c.state, c.queued + count, c.queued_mb + mb, c.running, c.running_mb)
        if exclude >= 0:
            out = out[:exclude] + out[exclude + 1:]
        return out

    def _poll(self, dispatcher: Dispatcher) -> None:
        interval = self.config.queue_depth_interval_s
        phase = dispatcher.phase_s
        polled_at = phase + math.floor((self.now_s - phase) / interval) * interval
        if polled_at == dispatcher.polled_at:
            return
        dispatcher.polled_at = polled_at
        pending, own = dispatcher.pending, dispatcher.own
        while pending and pending[0][0] <= polled_at:  # in the ledger now
            _, index, mb = pending.popleft()
            entry = own[index]
            entry[0] -= 1
            entry[1] -= mb
            if not entry[0]:
                del own[index]
        snapshot = []
        for gpu in self.gpus:
            load = gpu.ledger[0]
            for entry in reversed(gpu.ledger):
                if entry[0] <= polled_at:
                    load = entry
                    break
            reading = gpu.readings[0][1]
            for t, state in reversed(gpu.readings):
                if t <= polled_at:
                    reading = state
                    break
            snapshot.append(Candidate(reading, load[1], load[2], load[3], load[4]))
        dispatcher.snapshot = snapshot

    def _note(self, gpu: Gpu) -> None:
        """Record ``gpu``'s ledger load now, forgetting what no poll can still see."""
        ledger = gpu.ledger
        ledger.append((self.now_s, len(gpu.line), gpu.line_mb, len(gpu.running), gpu.used_mb))
        horizon = self.now_s - self.config.queue_depth_interval_s
        while len(ledger) > 1 and ledger[1][0] <= horizon:
            ledger.popleft()

    def _publish(self, gpu: Gpu) -> None:
        config = self.config
        running = len(gpu.running)
        tenant_util = TENANT_UTIL[gpu.util_level] / 100.0
        duty = min(1.0, OUR_DUTY_PER_REQUEST * running)
        used = min(config.memory_total_mb, gpu.tenant_mb + gpu.used_mb)
        metadata = {
            "gpu_index": str(gpu.index), "memory_total_mb": str(config.memory_total_mb),
            "memory_used_mb": str(int(used)), "memory_free_mb": str(int(config.memory_total_mb - used)),
            "gpu_util": str(round(100.0 * (1.0 - (1.0 - tenant_util) * (1.0 - duty)))),
            "concurrent_requests": str(running), "held_mb": str(int(min(gpu.used_mb, used))),
            "model_name": MODEL, "queue": f"gpu.{gpu.key.replace(':', '.')}", "worker": f"gpu{gpu.index}@sim",
            "incarnation": f"sim{gpu.index}", "updated_at": str(self.now_ms), "source": "simulated",
            "max_concurrency": str(self.slots), "schema": METADATA_SCHEMA,
        }
        ip, port = gpu.key.split(":")
        readings = gpu.readings
        readings.append((self.now_s, parse_instance(ip, int(port), metadata, now_ms=self.now_ms)))
        horizon = self.now_s - config.queue_depth_interval_s
        while len(readings) > 1 and readings[1][0] <= horizon:
            readings.popleft()

    # -- the cards -------------------------------------------------------------------------------------

    def rate(self, gpu: Gpu, n: int) -> float:
        """Tokens/s each of ``n`` running requests gets on ``gpu``."""
        return self.config.tokens_per_s * gpu.speed / (1.0 + self.config.batch_slowdown * (n - 1))

    def _push(self, t: float, kind: int, a: object, b: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, a, b))

    def _advance(self, gpu: Gpu) -> None:
        if gpu.running:
            done = self.rate(gpu, len(gpu.running)) * (self.now_s - gpu.last_s)
            for job in gpu.running:
                job.remaining -= done
        gpu.last_s = self.now_s

    def _reschedule(self, gpu: Gpu) -> None:
        gpu.version += 1
        if gpu.running:
            step = min(j.remaining for j in gpu.running) / self.rate(gpu, len(gpu.running))
            self._push(self.now_s + max(step, 0.0), _COMPLETE, gpu.index, gpu.version)

    def _admit(self, gpu: Gpu) -> None:
        """Admit the head of the line while it fits (strict FIFO); hand back what can never fit there."""
        room = self.config.memory_total_mb - gpu.tenant_mb
        line, running = gpu.line, gpu.running
        while line and len(running) < self.slots:
            job = line[0]
            if job.memory_mb <= room - gpu.used_mb:
                line.popleft()
                gpu.line_mb -= job.memory_mb
                job.started_s = self.now_s
                running.append(job)
                gpu.used_mb += job.memory_mb
            elif not running:  # fail open: admitted with none of ours running, and it still does not fit
                line.popleft()
                gpu.line_mb -= job.memory_mb
                self._hand_back(job, gpu)
            else:
                break
        if not line:
            gpu.line_mb = 0.0

    def _pull(self, gpu: Gpu) -> None:
        shared = self.shared
        while shared and not gpu.line and len(gpu.running) < self.slots:
            if shared[0].exclude != gpu.index:
                job = shared.popleft()
            else:
                at = next((i for i, j in enumerate(shared) if j.exclude != gpu.index), None)
                if at is None:
                    break
                job = shared[at]
                del shared[at]
            job.exclude = -1
            job.sent_s, job.gpu = self.now_s, gpu.index
            gpu.line.append(job)
            gpu.line_mb += job.memory_mb
            self._admit(gpu)

    def _pull_by_an_idle_card(self, exclude: int = -1) -> None:
        idle = [g for g in self.gpus if not g.line and len(g.running) < self.slots and g.index != exclude]
        if idle:
            gpu = self.rng.choice(idle)
            self._advance(gpu)
            self._pull(gpu)
            self._reschedule(gpu)

    # -- requests --------------------------------------------------------------------------------------

    def _dispatch(self, job: Job, exclude: int = -1) -> None:
        dispatcher = self.dispatchers[job.dispatcher]
        index = self.policy.decide(self, dispatcher, job, exclude)
        if index is None:
            self._retry(job)
            return
        job.retries = 0
        gpu = self.gpus[index]
        dispatcher.pending.append((self.now_s, index, job.memory_mb))
        entry = dispatcher.own.setdefault(index, [0, 0.0])
        entry[0] += 1
        entry[1] += job.memory_mb
        self._advance(gpu)
        job.sent_s, job.gpu = self.now_s, index
        gpu.line.append(job)
        gpu.line_mb += job.memory_mb
        self._admit(gpu)
        self._note(gpu)
        self._reschedule(gpu)

    def _retry(self, job: Job) -> None:
        """As ``dispatch_inference.wait_for_gpu``: retry after the backoff, or fail once the waits are spent."""
        config = self.config
        first, longest, bound = config.no_gpu_backoff_s, config.no_gpu_backoff_max_s, config.no_gpu_wait_s
        waited = min(waited_after(job.retries, first, longest), bound)
        if waited >= bound:
            total = config.memory_total_mb
            could = any(total - g.tenant_mb >= job.memory_mb for g in self.gpus)
            self._fail(job, no_gpu=True, false=could)
            return
        countdown = min(backoff(job.retries, first, longest), bound - waited)
        job.retries += 1
        self._push(self.now_s + countdown, _RETRY, job)

    def _hand_back(self, job: Job, gpu: Gpu) -> None:
        job.handbacks += 1
        if job.counted:
            self._handbacks += 1
        if job.handbacks > self.config.max_handbacks:
            self._fail(job)
        else:
            self._push(self.now_s + self.config.handback_delay_s, _REDISPATCH, job, gpu.index)

    def _fail(self, job: Job, *, no_gpu: bool = False, false: bool = False) -> None:
        self._outstanding -= 1
        if job.counted:
            self._counted += 1
            if no_gpu:
                self._no_gpu += 1
                self._false_no_gpu += false
            else:
                self._could_not_fit += 1

    def run(self) -> RunResult:
        config, trace, gpus = self.config, self.trace, self.gpus
        pulling = self.policy.pull_slots is not None
        for i, (t, _, _) in enumerate(trace.arrivals):
            self._push(t, _ARRIVAL, i)
        for i, change in enumerate(trace.tenant_changes):
            self._push(change[0], _TENANT, i)
        for gpu in gpus:
            self._publish(gpu)
            self._push(trace.refresh_phase[gpu.index] * config.refresh_s, _REFRESH, gpu.index)
        events = self._events
        while events:
            t, _, kind, a, b = heapq.heappop(events)
            self.now_s = t
            if kind == _ARRIVAL:
                _, tokens, memory = trace.arrivals[a]
                job = Job(t, tokens, memory, a % len(self.dispatchers), t >= config.warmup_s)
                self._outstanding += 1
                if pulling:
                    self.shared.append(job)
                    self._pull_by_an_idle_card()
                else:
                    self._dispatch(job)
            elif kind == _COMPLETE:
                gpu = gpus[a]
                if b != gpu.version:
                    continue
                self._advance(gpu)
                still = []
                for job in gpu.running:
                    if job.remaining <= 1e-6:
                        gpu.used_mb -= job.memory_mb
                        self._outstanding -= 1
                        if job.counted:
                            self._latencies.append(t - job.arrival_s)
                            self._counted += 1
                            if self.completed is not None:
                                self.completed.append(job)
                    else:
                        still.append(job)
                gpu.running = still
                if not still:
                    gpu.used_mb = 0.0
                self._admit(gpu)
                if pulling:
                    self._pull(gpu)
                self._note(gpu)
                self._reschedule(gpu)
            elif kind == _TENANT:
                _, index, memory_level, util_level = trace.tenant_changes[a]
                gpu = gpus[index]
                self._advance(gpu)
                gpu.util_level, gpu.speed = util_level, config.speed(util_level)
                gpu.tenant_mb = TENANT_MEMORY_MB[memory_level]
                self._admit(gpu)
                if pulling:
                    self._pull(gpu)
                self._note(gpu)
                self._reschedule(gpu)
            elif kind == _REFRESH:
                gpu = gpus[a]
                self._publish(gpu)
                if self._outstanding or t < config.duration_s:
                    self._push(t + config.refresh_s, _REFRESH, a)
            elif kind == _RETRY:
                self._dispatch(a)
            else:  # _REDISPATCH: recovery re-dispatches a request handed back by card b
                if pulling:
                    a.exclude = b
                    self.shared.appendleft(a)
                    self._pull_by_an_idle_card(exclude=b)
                else:
                    a.retries = 0
                    self._dispatch(a, exclude=b)
            if not self._outstanding and t >= config.duration_s:
                break
        self._latencies.sort()
        return RunResult(self._latencies, self._counted, self._no_gpu, self._false_no_gpu, self._could_not_fit,
                         self._handbacks)


def simulate(config: ClusterConfig, trace: Trace, policy: Policy, *, dispatchers: int, seed: int) -> RunResult:
    """Run ``trace`` through ``policy`` with ``dispatchers`` independent dispatchers."""
    return Simulation(config, trace, policy, dispatchers=dispatchers, seed=seed).run()
