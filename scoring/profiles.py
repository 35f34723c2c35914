"""Profiles: a named combination of filters, weighted scorers and a picker.

The combination is configuration, not code: the dispatcher names a profile
(:data:`PROFILES`), and a new one is a :class:`Profile` built from the
pieces in :mod:`scoring.filters`, :mod:`scoring.scorers` and
:mod:`scoring.pickers`.  A candidate's score is the weighted mean of its
scorers' scores, so with normalised scorers it stays in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

from scoring.errors import InvalidParameter, number
from scoring.filters import Filter, Fresh, Healthy, MemoryFits, ModelMatches
from scoring.pickers import Picker, PowerOfTwoChoices, WeightedRoulette
from scoring.scorers import ExpectedWait, InFlight, Scorer, SeedFormula, Utilisation

#: Name of the profile used when none is named.
DEFAULT_PROFILE = "default"


@dataclass(frozen=True)
class Profile:
    """Filters, then weighted scorers, then a picker.

    :param name: how the profile is named in configuration and reports.
    :param filters: applied in order; a candidate is reported with the first
        reason that dropped it.  May be empty.
    :param scorers: ``(scorer, weight)`` pairs, at least one; weights are
        finite, ≥ 0, and not all 0.  They are relative: only their ratios matter.
    :param picker: chooses among the scores.
    :raises InvalidParameter: naming the parameter at fault.
    """

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[tuple[Scorer, float], ...]
    picker: Picker
    #: ``(scorer, weight / Σ weights)`` for the scorers with a weight above 0, computed once.
    weighted: tuple[tuple[Scorer, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidParameter("name", f"{self.name!r} is not a profile name (a non-empty string)")
        filters = tuple(self.filters)
        for item in filters:
            if not isinstance(item, Filter):
                raise InvalidParameter("filters", f"{item!r} is not a Filter from scoring.filters")
        scorers = tuple(self.scorers)
        if not scorers:
            raise InvalidParameter("scorers", "no scorer given; name at least one (scorer, weight) pair")
        for pair in scorers:
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], Scorer)):
                raise InvalidParameter("scorers", f"{pair!r} is not a (Scorer, weight) pair")
            number("scorers", pair[1], f"a weight for {pair[0].name!r}: weights are finite numbers ≥ 0",
                   zero_allowed=True)
        total = math.fsum(weight for _, weight in scorers)
        if total <= 0:
            raise InvalidParameter("scorers", "every weight is 0; give at least one scorer a positive weight")
        if not isinstance(self.picker, Picker):
            raise InvalidParameter("picker", f"{self.picker!r} is not a Picker from scoring.pickers")
        object.__setattr__(self, "filters", filters)
        object.__setattr__(self, "scorers", scorers)
        object.__setattr__(self, "weighted", tuple((s, w / total) for s, w in scorers if w > 0))

    def describe(self) -> str:
        """One line for logs and the status view."""
        filters = ", ".join(repr(f) for f in self.filters) or "none"
        score = " + ".join(f"{w:.3g}·{s!r}" for s, w in self.weighted)
        return f"{self.name}: filters {filters}; score {score}; picker {self.picker!r}"


#: The seed article, exactly: healthy instances only, its raw formula floored at 1, plain roulette.
SEED = Profile(
    name="seed",
    filters=(Healthy(),),
    scorers=((SeedFormula(), 1.0),),
    picker=WeightedRoulette(),
)

#: Filters of the profiles built on normalised signals.
_SIGNAL_FILTERS = (Healthy(), ModelMatches(), Fresh(), MemoryFits())
#: Weighted signals of the profiles built on normalised signals, tuned with the simulation of
#: ``python -m bench.balance`` on seeds it does not report (docs/bench-balance.md): the expected wait
#: (the ledger's line in rounds of what the GPU's memory lets it run at once) carries most of the
#: weight; work in flight (smaller batches run faster) and idle compute break its ties.
_SIGNAL_SCORERS = ((ExpectedWait(half_at=1.0), 4.0), (InFlight(), 1.0), (Utilisation(), 1.0))

#: Our best (see docs/bench-balance.md): fresh readings where the request could fit at all, scored
#: on the expected wait, work in flight and idle compute, picked by a sharpened roulette — nearly
#: "shortest expected wait", yet random among GPUs that score alike.
DEFAULT = Profile(
    name="default",
    filters=_SIGNAL_FILTERS,
    scorers=_SIGNAL_SCORERS,
    picker=WeightedRoulette(sharpness=32.0),
)

#: The default's filters and scores, picked by power of two choices instead of the roulette.
P2C = Profile(
    name="p2c",
    filters=_SIGNAL_FILTERS,
    scorers=_SIGNAL_SCORERS,
    picker=PowerOfTwoChoices(),
)

#: Every profile by name.
PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (DEFAULT, SEED, P2C)})


def get_profile(name: str, max_reading_age_s: float | None = None) -> Profile:
    """The profile called ``name``, its freshness filter set to ``max_reading_age_s`` seconds when given.

    :raises InvalidParameter: naming the known profiles when there is none by that name.
    """
    profile = PROFILES.get(name) if isinstance(name, str) else None
    if profile is None:
        raise InvalidParameter("profile", f"no scoring profile called {name!r}; "
                                          f"choose one of {', '.join(sorted(PROFILES))}")
    if max_reading_age_s is None or not any(isinstance(f, Fresh) for f in profile.filters):
        return profile
    filters = tuple(Fresh(max_reading_age_s) if isinstance(f, Fresh) else f for f in profile.filters)
    return replace(profile, filters=filters)
