"""Filters: each drops the candidates that cannot serve a request, for one reason.

A filter is a small named type with a validated constructor and two methods:
:meth:`Filter.keep` decides, over the whole list at once (one list
comprehension: selection must stay under 100 µs for 256 candidates), and
:meth:`Filter.why` words the reason for a candidate ``keep`` dropped, so the
status view and :class:`~scoring.errors.NoEligibleGpu` can say it.  Filters
run in the profile's order; a candidate is reported with the first reason
that dropped it.  Each is O(n) in the number of candidates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Sequence

from scoring.candidates import Candidate, Request
from scoring.errors import number

#: Default for :class:`Fresh`: a reading older than this many seconds is not trusted
#: (three missed refreshes at the workers' default 5 s period).
DEFAULT_MAX_AGE_S = 15.0


class Filter(ABC):
    """Drops the candidates that cannot serve a request."""

    #: Short name shown in profiles and reports.
    name: ClassVar[str]

    @abstractmethod
    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        """The candidates that pass, in their order."""

    @abstractmethod
    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        """Why :meth:`keep` dropped ``candidate``, in words an operator can act on."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Healthy(Filter):
    """Keeps instances the registry marks both healthy and enabled (all the seed article's client checked)."""

    name = "healthy"

    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        return [c for c in candidates if c.state.healthy and c.state.enabled]

    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        if not candidate.state.healthy:
            return "unhealthy in the registry"
        return "disabled in the registry"


class ModelMatches(Filter):
    """Keeps GPUs serving the request's model; a request with no model keeps them all."""

    name = "model"

    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        model = request.model
        if model is None:
            return list(candidates)
        return [c for c in candidates if c.state.model_name == model]

    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        return f"serves model {candidate.state.model_name!r}, the request needs {request.model!r}"


class MemoryFits(Filter):
    """Keeps GPUs that could hold the request at all: total memory less other tenants' use at the reading.

    Fails open on purpose.  Whether the request fits *now* depends on our own
    requests, which come and go faster than readings: a GPU where it must
    wait is a worse candidate (the free-memory scorer says so), not an
    impossible one — the request waits in that GPU's queue, and the worker
    admits its requests to memory in arrival order, so a large one is never
    overtaken for ever by small ones.  Only a GPU whose other tenants leave
    too little even with none of our work running is dropped.
    """

    name = "memory"

    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        need = request.memory_mb
        return [c for c in candidates if c.state.room_mb >= need]

    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        state = candidate.state
        return (f"needs {request.memory_mb:g} MB; even with none of our work running it has {state.room_mb:g} MB "
                f"({state.memory_total_mb:g} MB total − {state.tenant_mb:g} MB used by other tenants at the reading)")


class Fresh(Filter):
    """Keeps GPUs whose reading is at most ``max_age_s`` old; a reading of unknown age is stale.

    :param max_age_s: seconds; default :data:`DEFAULT_MAX_AGE_S`.
    """

    name = "fresh"

    def __init__(self, max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.max_age_s = number("max_age_s", max_age_s, "a positive number of seconds; give the oldest "
                                                        "reading to trust, e.g. 3 refresh periods")
        self._max_age_ms = self.max_age_s * 1000.0

    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        oldest = now_ms - self._max_age_ms
        return [c for c in candidates if (c.state.updated_at_ms or 0) >= oldest]  # None: unknown age, stale

    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        age = candidate.state.age_s(now_ms)
        if age is None:
            return "no `updated_at` in its metadata: the reading's age is unknown, so it is treated as stale"
        return f"reading is {age:.1f} s old; the limit is {self.max_age_s:g} s (max_age_s)"

    def __repr__(self) -> str:
        return f"Fresh(max_age_s={self.max_age_s:g})"


class BelowMaxConcurrency(Filter):
    """Keeps GPUs with a free slot: requests running or waiting there below ``max_concurrency``.

    A GPU that does not publish ``max_concurrency`` passes.  Not in the
    ``default`` profile: a GPU's broker queue exists to hold work beyond its
    slots, and the in-flight and queue-depth scorers already steer away from
    full GPUs; with this filter every busy moment would be a ``NoEligibleGpu``.
    """

    name = "max_concurrency"

    def keep(self, candidates: Sequence[Candidate], request: Request, now_ms: int) -> list[Candidate]:
        return [c for c in candidates if (limit := c.state.max_concurrency) is None or c.in_flight < limit]

    def why(self, candidate: Candidate, request: Request, now_ms: int) -> str:
        return (f"{candidate.running_now} running + {candidate.queued} waiting = {candidate.in_flight} in flight; "
                f"max_concurrency is {candidate.state.max_concurrency}")
