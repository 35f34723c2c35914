"""Pure GPU selection: registry metadata in, a decision out.

No I/O, no Celery, no Nacos, standard library only — so the same code is
tested alone, benchmarked in ``bench/`` and called by the dispatcher.  A
decision runs in three steps, each made of small named pieces
(``docs/scoring.md``):

    filters (drop what cannot serve) → scorers (one signal each, in [0, 1],
    weighted) → picker (weighted roulette by default)

The API the dispatcher, the status view and the benchmark use:

``parse_instance(ip, port, metadata, *, healthy=True, enabled=True, now_ms) -> GpuState``
    One registry instance's metadata (all values strings) as a typed reading.
    Raises :class:`MalformedMetadata` (``.key``, ``.reason``) for anything
    missing, non-numeric, negative, inconsistent or absurd, and for an
    instance without a ``queue`` key ("not a gpu-dispatch worker").

``GpuState``
    Frozen reading: ``key`` (``"ip:port"``), ``queue``, memory in MB,
    ``gpu_util`` in %, ``concurrent_requests``, ``max_concurrency``,
    ``updated_at_ms`` …; ``age_s(now_ms)`` gives the reading's age (``None``
    when the worker sent no ``updated_at``).

``Candidate(state, sent_since_reading=0, sent_memory_mb=0.0, queue_depth=None)``
    A reading plus this dispatcher's own counts since it, and the live depth
    of the GPU's broker queue.

``Request(model=None, memory_mb=0.0)``
    The model the request needs (``None``: any) and its estimated memory, MB.

``choose(candidates, request, *, profile="default", rng=None, now_ms) -> Decision``
    The one entry point.  ``Decision.chosen`` is the candidate picked,
    ``Decision.fallbacks`` the other eligible ones best first (for retries),
    ``Decision.explanation`` a :class:`CandidateReport` per candidate (key,
    score or ``None``, probability, reason dropped or ``None``) and
    ``Decision.as_rows()`` the same as plain dicts.  Raises
    :class:`NoEligibleGpu` listing each GPU and why it was dropped (or "no GPU
    registered in service") — never an empty pick.

``explain(candidates, request, *, profile="default", now_ms) -> list[CandidateReport]``
    The same reports without picking, for a status view; never raises
    :class:`NoEligibleGpu`.

``PROFILES``, ``get_profile(name, max_reading_age_s=None) -> Profile``
    ``"default"`` (our best, see ``docs/bench-balance.md``), ``"seed"`` (the
    seed article's formula and roulette, exactly) and ``"p2c"`` (the default's
    scores, power-of-two-choices picker).  :class:`Profile` builds others.

Errors all derive from :class:`ScoringError`; :class:`InvalidParameter`
(also a ``ValueError``) names the parameter a constructor refused.
"""

from scoring.candidates import Candidate, Request
from scoring.decision import CandidateReport, Decision, choose, explain
from scoring.errors import InvalidParameter, MalformedMetadata, NoEligibleGpu, ScoringError
from scoring.filters import BelowMaxConcurrency, Filter, Fresh, Healthy, MemoryFits, ModelMatches
from scoring.pickers import Picker, PowerOfTwoChoices, WeightedRoulette, ranked
from scoring.profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from scoring.scorers import FreeMemory, InFlight, QueueDepth, Scorer, SeedFormula, Utilisation
from scoring.state import GpuState, parse_instance

__all__ = [
    "BelowMaxConcurrency", "Candidate", "CandidateReport", "DEFAULT_PROFILE", "Decision", "Filter",
    "FreeMemory", "Fresh", "GpuState", "Healthy", "InFlight", "InvalidParameter", "MalformedMetadata",
    "MemoryFits", "ModelMatches", "NoEligibleGpu", "PROFILES", "Picker", "PowerOfTwoChoices", "Profile",
    "QueueDepth", "Request", "ScoringError", "Scorer", "SeedFormula", "Utilisation", "WeightedRoulette",
    "choose", "explain", "get_profile", "parse_instance", "ranked",
]
