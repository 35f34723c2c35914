"""Pure GPU selection: registry metadata and ledger load in, a decision out.

No I/O, no Celery, no Nacos: filters (drop what cannot serve) → scorers (one
signal each, in [0, 1], weighted) → picker (weighted roulette by default).
The one entry point is :func:`choose`; ``docs/scoring.md`` explains each piece
and the profiles.
"""

from scoring.candidates import Candidate, Request
from scoring.decision import CandidateReport, Decision, choose, explain
from scoring.errors import InvalidParameter, MalformedMetadata, NoEligibleGpu, ScoringError
from scoring.filters import BelowMaxConcurrency, Filter, Fresh, Healthy, MemoryFits, ModelMatches
from scoring.pickers import Picker, PowerOfTwoChoices, WeightedRoulette, ranked
from scoring.profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from scoring.selector import Selector
from scoring.scorers import ExpectedWait, FreeMemory, InFlight, QueueDepth, Scorer, SeedFormula, Utilisation
from scoring.state import GpuState, parse_instance

__all__ = [
    "BelowMaxConcurrency", "Candidate", "CandidateReport", "DEFAULT_PROFILE", "Decision", "ExpectedWait", "Filter",
    "FreeMemory", "Fresh", "GpuState", "Healthy", "InFlight", "InvalidParameter", "MalformedMetadata",
    "MemoryFits", "ModelMatches", "NoEligibleGpu", "PROFILES", "Picker", "PowerOfTwoChoices", "Profile",
    "QueueDepth", "Request", "ScoringError", "Scorer", "Selector", "SeedFormula", "Utilisation", "WeightedRoulette",
    "choose", "explain", "get_profile", "parse_instance", "ranked",
]
