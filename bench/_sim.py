"""A discrete-event simulation of a shared GPU cluster, for comparing dispatch policies.

What is modelled (every constant is in :class:`ClusterConfig`, with its unit):

- **GPUs.**  ``gpus`` cards of ``memory_total_mb`` each.  A card runs up to
  ``slots`` of our requests at once while their memory fits beside the other
  tenants'; a request waits in the card's FIFO queue until then (strict FIFO:
  the head blocks the rest).  A request that needs more memory than the other
  tenants leave on the card even when none of our work runs there fails as
  **could not fit** (the worker would hit out-of-memory).
- **Speed.**  Processor sharing with a batching benefit: each of ``n``
  running requests decodes at ``tokens_per_s * speed / (1 + batch_slowdown *
  (n - 1))``, where ``speed = 1 - tenant_drag * tenant_util / 100`` — the
  card slows as our batch grows and as the other tenants compute.
- **Other tenants.**  Each card's other tenants hold one of
  :data:`TENANT_MEMORY_MB` and compute at one of :data:`TENANT_UTIL`; memory
  and compute each move to a neighbouring level after an exponentially
  distributed dwell (mean ``tenant_dwell_s``), independently — a tenant may
  hold much memory and compute little (a loaded, idle model) or the reverse.
  So some cards are nearly full, others idle, and which ones changes.
- **Requests.**  Poisson arrivals at ``load`` × the cluster's estimated
  capacity; lognormal work (tokens) and memory need (MB), the estimate equal
  to the real need.  Arrivals are dealt to ``dispatchers`` in turn.
- **Readings.**  Every ``refresh_s`` (random phase per card) each card
  publishes the seed article's metadata keys plus ours, which the simulation
  parses with the real :func:`scoring.parse_instance`; dispatchers see only
  the last reading, plus — for the scoring profiles — their own sends since
  it and the depth of each card's queue as counted every
  ``queue_depth_interval_s`` (what the dispatcher's pipelined ``LLEN`` gives).
  Reported ``gpu_util`` combines the tenant's with our own duty cycle
  (:data:`OUR_DUTY_PER_REQUEST` per running request), so it saturates near
  100 % on any busy card, as NVML's does.
- **Holding.**  A policy may decline to place a request (the scoring
  profiles raise :class:`scoring.NoEligibleGpu` when no card fits); the
  dispatcher then holds it and retries at every reading, for at most
  ``max_hold_s``, after which it counts as could not fit.

The trace (arrivals, tenant changes, refresh phases) depends only on the
configuration, load and seed, so every policy sees the identical trace; the
policies' own randomness comes from a generator seeded the same way.  A run
stops admitting work at ``duration_s`` and then drains, so a policy that
overloads a card pays for it in latency instead of leaving work uncounted.
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from scoring import (Candidate, GpuState, NoEligibleGpu, PowerOfTwoChoices, Profile, QueueDepth, Request,
                     choose, get_profile, parse_instance)

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
#: Tokens between the entries of :attr:`Trace.residual_tokens`.
RESIDUAL_STEP = 10

_ARRIVAL, _COMPLETE, _TENANT, _REFRESH = 0, 1, 2, 3


@dataclass(frozen=True)
class ClusterConfig:
    """The simulated cluster and workload; every default is the benchmark's.

    :param gpus: number of cards.
    :param memory_total_mb: memory per card, MB (80 GB).
    :param slots: most of our requests a card runs at once (published as ``max_concurrency``).
    :param tokens_per_s: decode speed of one request alone on an idle card, tokens/s.
    :param batch_slowdown: each extra running request slows every running one by this fraction.
    :param tenant_drag: fraction of a card's speed the other tenants take at 100 % utilisation.
    :param tenant_dwell_s: mean seconds a card's tenant stays at one level.
    :param refresh_s: seconds between a card's metadata readings.
    :param queue_depth_interval_s: seconds between the dispatchers' counts of the cards' broker
        queues (the dispatcher's default ``GPU_DISPATCH_QUEUE_DEPTH_INTERVAL``).
    :param duration_s: seconds of arrivals.
    :param warmup_s: seconds of arrivals left out of the statistics.
    :param max_hold_s: seconds a dispatcher holds a request no card will take before failing it.
    :param tokens_median: median work of a request, tokens (lognormal).
    :param tokens_sigma: lognormal sigma of the work.
    :param tokens_max: largest work, tokens.
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
    refresh_s: float = 5.0
    queue_depth_interval_s: float = 0.25
    duration_s: float = 7200.0
    warmup_s: float = 600.0
    max_hold_s: float = 60.0
    tokens_median: float = 250.0
    tokens_sigma: float = 0.8
    tokens_max: float = 4000.0
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
        memory = min(self.memory_max_mb, max(self.memory_min_mb,
                                             rng.lognormvariate(math.log(self.memory_median_mb), self.memory_sigma)))
        return tokens, memory


@dataclass(frozen=True)
class Trace:
    """Everything random about a run that is not a policy's own choice.

    :param arrivals: ``(time_s, tokens, memory_mb)`` in time order.
    :param initial_levels: each card's tenants' ``(memory level, compute level)`` at time 0.
    :param tenant_changes: ``(time_s, gpu, memory level, compute level)`` in time order.
    :param refresh_phase_s: each card's first reading time, in ``[0, refresh_s)``.
    :param capacity_rps: the cluster's estimated capacity, requests/s.
    :param mean_tokens: the mean work of a request, tokens.
    :param residual_tokens: entry ``i``: the expected work left of a request that has done
        ``i * RESIDUAL_STEP`` tokens (its mean residual life), tokens.
    """

    arrivals: list[tuple[float, float, float]]
    initial_levels: list[tuple[int, int]]
    tenant_changes: list[tuple[float, int, int, int]]
    refresh_phase_s: list[float]
    capacity_rps: float
    mean_tokens: float
    residual_tokens: tuple[float, ...]


def make_trace(config: ClusterConfig, load: float, seed: int) -> Trace:
    """The trace for ``load`` (fraction of estimated capacity) and ``seed``.

    Capacity is what the cluster would serve if every card always ran the
    largest batch its tenant leaves memory for (at the mean request memory,
    at most ``slots``), averaged over the trace's tenant levels and divided by
    the mean work of a request.  It is an estimate: load 0.9 means arrivals at
    90 % of it.
    """
    rng = random.Random(seed)
    top = len(TENANT_MEMORY_MB) - 1
    levels = [(rng.randint(0, top), rng.randint(0, top)) for _ in range(config.gpus)]
    end = config.duration_s * 3  # tenants keep changing while the run drains
    moves: list[tuple[float, int, int, int]] = []  # (time_s, gpu, which: 0 memory / 1 compute, step)
    for gpu in range(config.gpus):
        for which in (0, 1):
            t = rng.expovariate(1.0 / config.tenant_dwell_s)
            while t < end:
                moves.append((t, gpu, which, rng.choice((-1, 1))))
                t += rng.expovariate(1.0 / config.tenant_dwell_s)
    moves.sort()
    current = [list(pair) for pair in levels]
    changes = []
    for t, gpu, which, step in moves:
        current[gpu][which] = min(top, max(0, current[gpu][which] + step))
        changes.append((t, gpu, current[gpu][0], current[gpu][1]))
    phases = [rng.uniform(0.0, config.refresh_s) for _ in range(config.gpus)]

    sizes_rng = random.Random(0)
    sample = [config.sample_size(sizes_rng) for _ in range(_SIZE_SAMPLE)]
    mean_tokens = sum(s[0] for s in sample) / _SIZE_SAMPLE
    residual = _mean_residual_tokens(sorted(s[0] for s in sample), config.tokens_max)
    mean_memory = sum(s[1] for s in sample) / _SIZE_SAMPLE
    capacity = _capacity_tokens_per_s(config, levels, changes, mean_memory) / mean_tokens

    rate = load * capacity
    arrivals = []
    t = rng.expovariate(rate)
    while t < config.duration_s:
        tokens, memory = config.sample_size(rng)
        arrivals.append((t, tokens, memory))
        t += rng.expovariate(rate)
    return Trace(arrivals, levels, changes, phases, capacity, mean_tokens, residual)


def _mean_residual_tokens(tokens: list[float], most: float) -> tuple[float, ...]:
    suffix = [0.0] * (len(tokens) + 1)
    for i in range(len(tokens) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + tokens[i]
    table = []
    for done in range(0, int(most) + RESIDUAL_STEP, RESIDUAL_STEP):
        i = bisect_right(tokens, done)
        longer = len(tokens) - i
        table.append(suffix[i] / longer - done if longer else 1.0)
    return tuple(table)


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


@dataclass
class _Job:
    arrival_s: float
    tokens: float
    memory_mb: float
    dispatcher: int
    remaining: float = 0.0


@dataclass
class Gpu:
    """One simulated card, as the policies may inspect it (the oracle reads everything)."""

    index: int
    util_level: int
    speed: float
    tenant_mb: float
    running: list[_Job] = field(default_factory=list)
    queue: deque = field(default_factory=deque)
    #: ``(time_s, queue length)`` at each change, back to the last count the dispatchers could have made.
    depths: deque = field(default_factory=lambda: deque([(0.0, 0)]))
    used_mb: float = 0.0
    last_s: float = 0.0
    version: int = 0
    reading: GpuState | None = None

    @property
    def key(self) -> str:
        return f"10.0.0.{self.index + 1}:{8000 + self.index}"


class Dispatcher:
    """One dispatcher's private view: what it sent to each card since that card's reading."""

    def __init__(self, gpus: int) -> None:
        self.sent: list[deque] = [deque() for _ in range(gpus)]
        self.sent_mb = [0.0] * gpus
        self.round_robin = 0

    def record(self, gpu: int, now_s: float, memory_mb: float) -> None:
        self.sent[gpu].append((now_s, memory_mb))
        self.sent_mb[gpu] += memory_mb

    def forget_before(self, gpu: int, reading_s: float) -> None:
        sent = self.sent[gpu]
        while sent and sent[0][0] <= reading_s:
            self.sent_mb[gpu] -= sent.popleft()[1]
        if not sent:
            self.sent_mb[gpu] = 0.0


class Cluster:
    """The state a policy decides on."""

    def __init__(self, config: ClusterConfig, trace: Trace, dispatchers: int, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.mean_tokens = trace.mean_tokens
        self.residual_tokens = trace.residual_tokens
        self.now_s = 0.0
        self.gpus = [Gpu(i, util_level, config.speed(util_level), TENANT_MEMORY_MB[memory_level])
                     for i, (memory_level, util_level) in enumerate(trace.initial_levels)]
        self.dispatchers = [Dispatcher(config.gpus) for _ in range(dispatchers)]

    @property
    def now_ms(self) -> int:
        return EPOCH_MS + int(self.now_s * 1000)

    def candidates(self, dispatcher: Dispatcher) -> list[Candidate]:
        """The cards as ``dispatcher`` sees them: last readings, its own sends since, counted queue depths."""
        return [Candidate(g.reading, len(dispatcher.sent[g.index]), dispatcher.sent_mb[g.index],
                          self.counted_depth(g)) for g in self.gpus]

    def note_depth(self, gpu: Gpu) -> None:
        """Record ``gpu``'s queue length now, forgetting what no count can still see."""
        depths = gpu.depths
        depths.append((self.now_s, len(gpu.queue)))
        horizon = self.now_s - self.config.queue_depth_interval_s
        while len(depths) > 1 and depths[1][0] <= horizon:
            depths.popleft()

    def counted_depth(self, gpu: Gpu) -> int:
        """``gpu``'s queue length at the dispatchers' last count (every ``queue_depth_interval_s``)."""
        interval = self.config.queue_depth_interval_s
        counted_at = math.floor(self.now_s / interval) * interval
        for t, depth in reversed(gpu.depths):
            if t <= counted_at:
                return depth
        return gpu.depths[0][1]

    def rate(self, gpu: Gpu, n: int) -> float:
        """Tokens/s each of ``n`` running requests gets on ``gpu``."""
        return self.config.tokens_per_s * gpu.speed / (1.0 + self.config.batch_slowdown * (n - 1))


#: A policy: ``(cluster, dispatcher, job) -> card index``, or ``None`` to hold the job and retry later.
Policy = Callable[[Cluster, Dispatcher, _Job], "int | None"]


def random_policy(cluster: Cluster, dispatcher: Dispatcher, job: _Job) -> int:
    """Any card, uniformly."""
    return cluster.rng.randrange(len(cluster.gpus))


def round_robin_policy(cluster: Cluster, dispatcher: Dispatcher, job: _Job) -> int:
    """The next card in turn (each dispatcher keeps its own turn, all starting at the same card)."""
    dispatcher.round_robin += 1
    return dispatcher.round_robin % len(cluster.gpus)


def most_free_policy(cluster: Cluster, dispatcher: Dispatcher, job: _Job) -> int:
    """The card whose last reading showed the most free memory (the article's first demo)."""
    return max(cluster.gpus, key=lambda g: g.reading.memory_free_mb).index


def profile_policy(profile: Profile | str) -> Policy:
    """The real :func:`scoring.choose` with ``profile``; holds the job on :class:`scoring.NoEligibleGpu`."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    keys: dict[str, int] = {}

    def policy(cluster: Cluster, dispatcher: Dispatcher, job: _Job) -> int | None:
        if not keys:
            keys.update((g.key, g.index) for g in cluster.gpus)
        try:
            decision = choose(cluster.candidates(dispatcher), Request(MODEL, job.memory_mb), profile=profile,
                              rng=cluster.rng, now_ms=cluster.now_ms)
        except NoEligibleGpu:
            return None
        return keys[decision.chosen.state.key]

    return policy


#: Power of two choices on the counted broker queue depth, through the real scoring code.
P2C_QUEUE = Profile(name="p2c-queue", filters=(), scorers=((QueueDepth(), 1.0),), picker=PowerOfTwoChoices())


def oracle_policy(*, clairvoyant: bool = False) -> Policy:
    """The card where the job would finish first, from perfect, fresh knowledge of every card.

    Join the shortest expected delay: knows each card's true tenant memory
    and compute, running requests and queue at the moment of the decision,
    and plays each card forward with no further arrivals.  Greedy: the best
    card for this job, not a schedule for all.  Like any real dispatcher it
    does not know how many tokens a request will generate: it counts a
    waiting request as the mean request, and a running one as the expected
    rest of a request that has come this far (the workload's mean residual
    life); ``clairvoyant=True`` also knows every request's true length (a
    bound no dispatcher can reach).
    """
    def policy(cluster: Cluster, dispatcher: Dispatcher, job: _Job) -> int:
        best, best_s = 0, math.inf
        for gpu in cluster.gpus:
            finish = _finish_time(cluster, gpu, job, clairvoyant)
            if finish < best_s:
                best, best_s = gpu.index, finish
        if best_s == math.inf:  # fits nowhere: the roomiest card, where it will fail
            return min(cluster.gpus, key=lambda g: g.tenant_mb).index
        return best

    return policy


def _finish_time(cluster: Cluster, gpu: Gpu, job: _Job, clairvoyant: bool) -> float:
    """Seconds until ``job`` would complete on ``gpu``; infinite where it cannot fit."""
    config = cluster.config
    room = config.memory_total_mb - gpu.tenant_mb
    if job.memory_mb > room:
        return math.inf
    mean = cluster.mean_tokens
    gpu_rate = config.tokens_per_s * gpu.speed
    if clairvoyant:
        running = [[j.remaining, j.memory_mb, False] for j in gpu.running]
    else:
        residual = cluster.residual_tokens
        running = [[residual[min(len(residual) - 1, int((j.tokens - j.remaining) / RESIDUAL_STEP))], j.memory_mb,
                    False] for j in gpu.running]
    used = gpu.used_mb
    waiting = deque((j.tokens if clairvoyant else mean, j.memory_mb, False) for j in gpu.queue
                    if j.memory_mb <= room)
    waiting.append((job.tokens if clairvoyant else mean, job.memory_mb, True))
    t = 0.0
    while True:
        while waiting and len(running) < config.slots and waiting[0][1] <= room - used:
            tokens, memory, mine = waiting.popleft()
            running.append([tokens, memory, mine])
            used += memory
        rate = gpu_rate / (1.0 + config.batch_slowdown * (len(running) - 1))
        step = min(r[0] for r in running)
        t += step / rate
        still = []
        for r in running:
            r[0] -= step
            if r[0] <= 1e-9:
                if r[2]:
                    return t
                used -= r[1]
            else:
                still.append(r)
        running = still


@dataclass
class RunResult:
    """Latency statistics of one run, over the requests that arrived after the warm-up.

    :param latencies_s: arrival to completion of every completed request, sorted.
    :param not_fit: requests that failed: no card's memory could hold them.
    :param requests: requests counted (completed plus failed).
    """

    latencies_s: list[float]
    not_fit: int
    requests: int

    def percentile(self, q: float) -> float:
        """The ``q`` quantile (0–1) of latency, nearest rank; NaN when nothing completed."""
        if not self.latencies_s:
            return math.nan
        return self.latencies_s[min(len(self.latencies_s) - 1, max(0, math.ceil(q * len(self.latencies_s)) - 1))]

    @property
    def mean_s(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else math.nan


def simulate(config: ClusterConfig, trace: Trace, policy: Policy | None, *, dispatchers: int,
             seed: int) -> RunResult:
    """Run ``trace`` through ``policy``; ``None`` runs one shared queue that every card pulls from.

    The shared queue is Celery's default: one queue, each card's worker takes
    the next message whenever it has a free slot and is not already waiting
    for memory (prefetch 1, the most favourable setting), blind to memory and speed.
    """
    cluster = Cluster(config, trace, dispatchers, random.Random(seed))
    gpus = cluster.gpus
    events: list[tuple[float, int, int, int]] = []  # (time_s, kind, index, version)
    for i, (t, _, _) in enumerate(trace.arrivals):
        events.append((t, _ARRIVAL, i, 0))
    for i, (t, *_) in enumerate(trace.tenant_changes):
        events.append((t, _TENANT, i, 0))
    heapq.heapify(events)
    shared: deque[_Job] = deque()
    held: list[_Job] = []
    latencies: list[float] = []
    failed = 0
    counted = 0
    outstanding = 0

    def publish(gpu: Gpu) -> None:
        running = len(gpu.running)
        tenant_util = TENANT_UTIL[gpu.util_level] / 100.0
        duty = min(1.0, OUR_DUTY_PER_REQUEST * running)
        used = min(config.memory_total_mb, gpu.tenant_mb + gpu.used_mb)
        metadata = {
            "gpu_index": str(gpu.index), "memory_total_mb": str(config.memory_total_mb),
            "memory_used_mb": str(int(used)), "memory_free_mb": str(int(config.memory_total_mb - used)),
            "gpu_util": str(round(100.0 * (1.0 - (1.0 - tenant_util) * (1.0 - duty)))),
            "concurrent_requests": str(running), "model_name": MODEL, "queue": f"gpu.{gpu.key.replace(':', '.')}",
            "worker": f"gpu{gpu.index}@sim", "updated_at": str(cluster.now_ms), "source": "simulated",
            "max_concurrency": str(config.slots), "schema": "1",
        }
        ip, port = gpu.key.split(":")
        gpu.reading = parse_instance(ip, int(port), metadata, now_ms=cluster.now_ms)
        for d in cluster.dispatchers:
            d.forget_before(gpu.index, cluster.now_s)

    def advance(gpu: Gpu) -> None:
        if gpu.running:
            done = cluster.rate(gpu, len(gpu.running)) * (cluster.now_s - gpu.last_s)
            for job in gpu.running:
                job.remaining -= done
        gpu.last_s = cluster.now_s

    def fail(job: _Job) -> None:
        nonlocal failed, counted, outstanding
        outstanding -= 1
        if job.arrival_s >= config.warmup_s:
            failed += 1
            counted += 1

    def start_what_fits(gpu: Gpu) -> None:
        room = config.memory_total_mb - gpu.tenant_mb
        while gpu.queue and len(gpu.running) < config.slots:
            job = gpu.queue[0]
            if job.memory_mb > room:
                gpu.queue.popleft()
                fail(job)
            elif job.memory_mb <= room - gpu.used_mb:
                gpu.queue.popleft()
                job.remaining = job.tokens
                gpu.running.append(job)
                gpu.used_mb += job.memory_mb
            else:
                break
        cluster.note_depth(gpu)

    def pull(gpu: Gpu) -> None:
        while shared and not gpu.queue and len(gpu.running) < config.slots:
            gpu.queue.append(shared.popleft())
            start_what_fits(gpu)

    def reschedule(gpu: Gpu) -> None:
        gpu.version += 1
        if gpu.running:
            step = min(j.remaining for j in gpu.running) / cluster.rate(gpu, len(gpu.running))
            heapq.heappush(events, (cluster.now_s + max(step, 0.0), _COMPLETE, gpu.index, gpu.version))

    def place(job: _Job) -> bool:
        dispatcher = cluster.dispatchers[job.dispatcher]
        index = policy(cluster, dispatcher, job)
        if index is None:
            return False
        gpu = gpus[index]
        dispatcher.record(index, cluster.now_s, job.memory_mb)
        advance(gpu)
        gpu.queue.append(job)
        start_what_fits(gpu)
        reschedule(gpu)
        return True

    for gpu in gpus:
        publish(gpu)
        heapq.heappush(events, (trace.refresh_phase_s[gpu.index], _REFRESH, gpu.index, 0))

    while events:
        t, kind, index, version = heapq.heappop(events)
        cluster.now_s = t
        if kind == _ARRIVAL:
            _, tokens, memory = trace.arrivals[index]
            job = _Job(t, tokens, memory, index % dispatchers)
            outstanding += 1
            if policy is None:
                shared.append(job)
                idle = [g for g in gpus if not g.queue and len(g.running) < config.slots]
                if idle:
                    gpu = cluster.rng.choice(idle)
                    advance(gpu)
                    pull(gpu)
                    reschedule(gpu)
            elif not place(job):
                held.append(job)
        elif kind == _COMPLETE:
            gpu = gpus[index]
            if version != gpu.version:
                continue
            advance(gpu)
            still = []
            for job in gpu.running:
                if job.remaining <= 1e-6:
                    gpu.used_mb -= job.memory_mb
                    outstanding -= 1
                    if job.arrival_s >= config.warmup_s:
                        latencies.append(t - job.arrival_s)
                        counted += 1
                else:
                    still.append(job)
            gpu.running = still
            if not still:
                gpu.used_mb = 0.0
            start_what_fits(gpu)
            if policy is None:
                pull(gpu)
            reschedule(gpu)
        elif kind == _TENANT:
            _, gpu_index, memory_level, util_level = trace.tenant_changes[index]
            gpu = gpus[gpu_index]
            advance(gpu)
            gpu.util_level, gpu.speed = util_level, config.speed(util_level)
            gpu.tenant_mb = TENANT_MEMORY_MB[memory_level]
            start_what_fits(gpu)
            if policy is None:
                pull(gpu)
            reschedule(gpu)
        else:
            gpu = gpus[index]
            publish(gpu)
            if held:
                waiting, held = held, []
                for job in waiting:
                    if t - job.arrival_s > config.max_hold_s:
                        fail(job)
                    elif not place(job):
                        held.append(job)
            if outstanding or t < config.duration_s:
                heapq.heappush(events, (t + config.refresh_s, _REFRESH, index, 0))
        if not outstanding and t >= config.duration_s:
            break
    latencies.sort()
    return RunResult(latencies, failed, counted)

