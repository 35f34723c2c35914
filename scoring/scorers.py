"""Scorers: each turns one signal into a score per candidate, higher is better.

Every scorer but :class:`SeedFormula` returns scores normalised to [0, 1], so
a profile can weigh signals against each other with plain weights.  Each is
O(n) in the number of candidates and one list comprehension long.

Free memory is normalised by the card's own total, not by the best card's:
a fraction means the same on every reading, whereas "relative to the
roomiest card" turns tiny differences between nearly full cards into the
whole range.  In-flight requests and queue depth fall off hyperbolically
(``1 / (1 + n / half_at)``): one extra request matters more on an idle GPU
than on a busy one, and no count ever drives a score to exactly zero.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

from scoring.candidates import Candidate, Request
from scoring.errors import number

#: Default for :class:`InFlight`: requests in flight at which its score halves.
DEFAULT_IN_FLIGHT_HALF_AT = 4.0
#: Default for :class:`QueueDepth`: waiting messages at which its score halves.
DEFAULT_QUEUE_HALF_AT = 1.0
#: Default for :class:`ExpectedWait`: rounds of waiting at which its score halves.
DEFAULT_WAIT_HALF_AT = 1.0
#: The seed article's weight on free memory, per MB.
SEED_MEMORY_WEIGHT = 1.0
#: The seed article's weight on idle compute, per percentage point below 100 % utilisation.
SEED_IDLE_WEIGHT = 0.3
#: The seed article's penalty per reported concurrent request.
SEED_CONCURRENCY_PENALTY = 50.0
#: The seed article's floor on a score, so every healthy GPU keeps some chance.
SEED_FLOOR = 1.0


class Scorer(ABC):
    """Scores candidates on one signal."""

    #: Short name used in profiles and reports.
    name: ClassVar[str]

    @abstractmethod
    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        """One score per candidate, in their order."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FreeMemory(Scorer):
    """Memory left after this request and those ahead of it, as a fraction of the card's total.

    ``(free_mb - queued_mb - request.memory_mb) / memory_total_mb``, floored
    at 0: memory free now (see :attr:`Candidate.free_mb`), less what the
    requests waiting there will take, less what this one needs.  0 means the
    request would wait for memory there.
    """

    name = "free_memory"

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        need = request.memory_mb
        return [x if (x := (c.free_mb - c.queued_mb - need) / c.state.memory_total_mb) > 0.0
                else 0.0 for c in candidates]


class Utilisation(Scorer):
    """Idle compute: ``1 - gpu_util / 100``."""

    name = "utilisation"

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        return [1.0 - c.state.gpu_util * 0.01 for c in candidates]


class _Halving(Scorer):
    """A scorer of the form ``1 / (1 + n / half_at)``: the count ``n`` at which its score halves, validated."""

    #: What ``half_at`` counts, for messages.
    unit: ClassVar[str]

    def __init__(self, half_at: float) -> None:
        self.half_at = number("half_at", half_at, f"a positive number of {self.unit}; it is the count at "
                                                  "which the score halves, e.g. 4")
        self._per = 1.0 / self.half_at

    def __repr__(self) -> str:
        return f"{type(self).__name__}(half_at={self.half_at:g})"


class InFlight(_Halving):
    """Fewer requests in flight is better: ``1 / (1 + n / half_at)``.

    ``n`` is :attr:`Candidate.in_flight`: running there now, plus waiting for it.

    :param half_at: requests at which the score is 0.5; default
        :data:`DEFAULT_IN_FLIGHT_HALF_AT`.
    """

    name = "in_flight"
    unit = "requests"

    def __init__(self, half_at: float = DEFAULT_IN_FLIGHT_HALF_AT) -> None:
        super().__init__(half_at)

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        k = self._per
        return [1.0 / (1.0 + ((c.state.concurrent_requests if c.running is None else c.running) + c.queued) * k)
                for c in candidates]


class QueueDepth(_Halving):
    """A shorter line is better: ``1 / (1 + queued / half_at)``.

    ``queued`` is :attr:`Candidate.queued`: requests sent to the GPU and not
    running yet, as the ledger counts them (every dispatcher's).

    :param half_at: waiting messages at which the score is 0.5; default
        :data:`DEFAULT_QUEUE_HALF_AT`.
    """

    name = "queue_depth"
    unit = "messages"

    def __init__(self, half_at: float = DEFAULT_QUEUE_HALF_AT) -> None:
        super().__init__(half_at)

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        k = self._per
        return [1.0 / (1.0 + c.queued * k) for c in candidates]



class SeedFormula(Scorer):
    """The seed article's score, exactly; not normalised.

    ``max(1, memory_free_mb * 1.0 + (100 - gpu_util) * 0.3 - concurrent_requests * 50)``,
    from the reading alone (the article's client knew nothing of its own
    recent sends).  In MB, the memory term swamps the other two.
    """

    name = "seed"

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        return [s if (s := SEED_MEMORY_WEIGHT * c.state.memory_free_mb
                      + SEED_IDLE_WEIGHT * (100.0 - c.state.gpu_util)
                      - SEED_CONCURRENCY_PENALTY * c.state.concurrent_requests) > SEED_FLOOR
                else SEED_FLOOR for c in candidates]


class ExpectedWait(_Halving):
    """A shorter expected wait is better: the requests on the GPU, in rounds of what it can run at once.

    From the ledger and the reading.  ``n`` requests are there — running and
    waiting, plus this one — needing ``mb`` MB together (running_mb +
    queued_mb + this one's).  In one round the GPU runs ``parallel`` of them:
    ``max_concurrency`` (unknown: all), or fewer when the memory its other
    tenants leave (:attr:`GpuState.room_mb`) holds fewer requests of their
    mean size (``floor(room_mb / (mb / n))``), at least 1.  The request
    waits ``rounds = n / parallel - 1`` rounds (one round: the time one batch
    takes) — also when the memory free now, less what waits there, cannot
    hold it (``mb > room_mb``: fewer than ``n`` fit).  Score
    ``1 / (1 + rounds / half_at)``: 1 where it starts at once.

    Unlike :class:`QueueDepth`, a line of three on a GPU that holds one of
    our requests at a time (its other tenants hold most of its memory)
    counts as three rounds; on one that holds three, as one.

    :param half_at: rounds of waiting at which the score is 0.5; default :data:`DEFAULT_WAIT_HALF_AT`.
    """

    name = "expected_wait"
    unit = "rounds"

    def __init__(self, half_at: float = DEFAULT_WAIT_HALF_AT) -> None:
        super().__init__(half_at)

    def scores(self, candidates: Sequence[Candidate], request: Request) -> list[float]:
        need, k = request.memory_mb, self._per
        out = []
        append = out.append
        for c in candidates:
            state = c.state
            n = (state.concurrent_requests if c.running is None else c.running) + c.queued + 1
            mb = (state.held_mb if c.running_mb is None else c.running_mb) + c.queued_mb + need
            parallel = state.max_concurrency or n
            if mb > 0.0 and (fit := int(state.room_mb * n / mb)) < parallel:
                parallel = fit if fit > 1 else 1
            append(1.0 / (1.0 + (n - parallel) * k / parallel) if n > parallel else 1.0)
        return out

