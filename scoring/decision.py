"""The one entry point: candidates and a request in, a decision out.

:func:`choose` runs the profile's filters, scores what is left, and lets the
picker choose; :func:`explain` runs the same steps without choosing, for a
status view.  Both are pure: the only randomness is the ``rng`` passed in.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

from scoring.candidates import Candidate, Request
from scoring.errors import NoEligibleGpu
from scoring.filters import Filter
from scoring.pickers import Picker, ranked
from scoring.profiles import DEFAULT_PROFILE, Profile, get_profile

#: Generator used when the caller passes none (seeded from the OS at import).
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class CandidateReport:
    """What became of one candidate.

    :param key: the GPU, ``"<ip>:<port>"``.
    :param score: its combined score; ``None`` when it was dropped.
    :param probability: its chance of being picked (0 when dropped).
    :param dropped: why a filter dropped it; ``None`` when it was scored.
    """

    key: str
    score: float | None
    probability: float
    dropped: str | None


class Decision:
    """The outcome of :func:`choose`.

    ``chosen`` is set at once; ``fallbacks`` and ``explanation`` are computed
    on first use (the dispatcher needs them only to retry or to report), from
    the same scores the choice was made on.

    :ivar profile: the profile that decided.
    :ivar chosen: the candidate picked.
    """

    def __init__(self, profile: Profile, chosen: Candidate,
                 details: Callable[[], tuple[tuple[Candidate, ...], list[Candidate], list[float], "_Dropped", int]]
                 ) -> None:
        self.profile = profile
        self.chosen = chosen
        #: () -> (candidates, eligible, their scores, who dropped the rest, index of the chosen in eligible):
        #: the rest of what was decided on, for fallbacks and explanations only.
        self._details = details

    @cached_property
    def fallbacks(self) -> list[Candidate]:
        """The other eligible candidates, best score first (ties by key): where to retry, in order."""
        _, eligible, scores, _, index = self._details()
        keys = [c.state.key for c in eligible]
        return [eligible[i] for i in ranked(scores, keys, skip=index)]

    @cached_property
    def explanation(self) -> list[CandidateReport]:
        """One report per candidate, in the order they were given."""
        candidates, eligible, scores, dropped, _ = self._details()
        return _reports(candidates, eligible, scores, dropped, self.profile.picker)

    def as_rows(self) -> list[dict[str, object]]:
        """The explanation as plain dicts (``key``, ``score``, ``probability``, ``dropped``, ``chosen``)."""
        chosen = self.chosen.state.key
        return [{"key": r.key, "score": r.score, "probability": r.probability, "dropped": r.dropped,
                 "chosen": r.key == chosen and r.dropped is None} for r in self.explanation]


def choose(candidates: Sequence[Candidate], request: Request, *, profile: Profile | str = DEFAULT_PROFILE,
           rng: random.Random | None = None, now_ms: int, prefer: str | None = None,
           prefer_slack: float = 0.25) -> Decision:
    """Choose the GPU for ``request``.

    :param candidates: every GPU the registry lists that parsed, with this
        dispatcher's counts; their order never changes a probability.
    :param request: the model and estimated memory to place.
    :param profile: a :class:`Profile`, or the name of one in
        :data:`~scoring.profiles.PROFILES`; default ``"default"``.
    :param rng: the source of randomness; a module-level generator when ``None``.
        Pass a seeded ``random.Random`` to reproduce a run.
    :param now_ms: the caller's clock, Unix ms, against which readings age.
    :param prefer: the queue of a GPU this request has affinity with (it served the same prompt prefix
        recently, so its model server has it cached): chosen when eligible and not overloaded — see
        :func:`within_bounded_load`; otherwise the picker decides as usual.
    :param prefer_slack: how far above the average load the preferred GPU may be (ε).
    :raises NoEligibleGpu: when there are no candidates or every one was
        filtered out; its message lists each GPU and why. Never an empty pick.
    :raises InvalidParameter: when ``profile`` names no profile.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    candidates = tuple(candidates)
    eligible, scores, dropped = _evaluate(candidates, request, profile, now_ms)
    if not eligible:
        reasons = dropped.reasons()
        raise NoEligibleGpu({c.state.key: reasons[id(c)] for c in candidates}, request.describe())
    index = _preferred(eligible, prefer, prefer_slack) if prefer is not None else None
    if index is None:
        index = profile.picker.pick(scores, rng or _RNG)
    return Decision(profile, eligible[index], lambda: (candidates, eligible, scores, dropped, index))


#: Requests a preferred GPU may hold above the bounded-load rule's ceiling: at the loads of a few
#: requests the ceiling alone moves a prefix for one request's difference (a count a moment old, at
#: that), while a prompt-cache hit saves the whole prefill (docs/real-model.md measures it).
PREFER_HEADROOM = 2


def within_bounded_load(loads: Sequence[int], index: int, slack: float, headroom: int = PREFER_HEADROOM) -> bool:
    """Whether the GPU at ``index`` may take one more request and stay within the bound.

    Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, SODA 2018): a key goes to
    its preferred server unless that server's load, counting this request, would exceed
    ``ceil((1 + slack) × average) + headroom``, the average counting this request too.  With ``slack``
    0.25 no GPU takes more than 25 % above the mean (plus ``headroom`` requests) because of affinity,
    however popular one prefix is.  O(n).
    """
    total = sum(loads) + 1
    bound = math.ceil((1.0 + slack) * total / len(loads)) + headroom
    return loads[index] + 1 <= bound


def _preferred(eligible: list[Candidate], queue: str, slack: float) -> int | None:
    for i, c in enumerate(eligible):
        if c.state.queue == queue:
            return i if within_bounded_load([e.in_flight for e in eligible], i, slack) else None
    return None


def explain(candidates: Sequence[Candidate], request: Request, *, profile: Profile | str = DEFAULT_PROFILE,
            now_ms: int) -> list[CandidateReport]:
    """What :func:`choose` would see, without choosing: one report per candidate, in order.

    Unlike :func:`choose` it does not raise when every candidate is dropped:
    the reports then say why each one was.

    :raises InvalidParameter: when ``profile`` names no profile.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    candidates = tuple(candidates)
    eligible, scores, dropped = _evaluate(candidates, request, profile, now_ms)
    return _reports(candidates, eligible, scores, dropped, profile.picker)


class _Dropped:
    """The candidates the filters dropped, each with the filter that dropped it first.

    Only who dropped what is kept on the hot path; the reasons are worded
    (:meth:`Filter.why`) when someone asks for them: an explanation, or the
    message of :class:`NoEligibleGpu`.
    """

    __slots__ = ("pairs", "request", "now_ms", "_reasons")

    def __init__(self, request: Request, now_ms: int) -> None:
        self.pairs: list[tuple[Candidate, Filter]] = []
        self.request = request
        self.now_ms = now_ms
        self._reasons: dict[int, str] | None = None

    def reasons(self) -> dict[int, str]:
        """``id(candidate)`` → why it was dropped, worded once."""
        if self._reasons is None:
            self._reasons = {id(c): f.why(c, self.request, self.now_ms) for c, f in self.pairs}
        return self._reasons


def _evaluate(candidates: tuple[Candidate, ...], request: Request, profile: Profile,
              now_ms: int) -> tuple[list[Candidate], list[float], _Dropped]:
    """Filter, then score: the eligible candidates, their scores, and which filter dropped each other one."""
    eligible: Sequence[Candidate] = candidates
    dropped = _Dropped(request, now_ms)
    for item in profile.filters:
        kept = item.keep(eligible, request, now_ms)
        if len(kept) != len(eligible):
            passed = {id(c) for c in kept}
            dropped.pairs.extend((c, item) for c in eligible if id(c) not in passed)
        eligible = kept
    eligible = list(eligible)
    if not eligible:
        return eligible, [], dropped
    weighted = profile.weighted
    (scorer, weight), rest = weighted[0], weighted[1:]
    scores = scorer.scores(eligible, request)
    if rest:  # fold the first weight into the first sum: one pass fewer on the hot path
        (second, weight2), rest = rest[0], rest[1:]
        scores = [weight * a + weight2 * b for a, b in zip(scores, second.scores(eligible, request))]
    elif weight != 1.0:
        scores = [weight * a for a in scores]
    for scorer, weight in rest:
        scores = [a + weight * b for a, b in zip(scores, scorer.scores(eligible, request))]
    return eligible, scores, dropped


def _reports(candidates: tuple[Candidate, ...], eligible: list[Candidate], scores: list[float],
             dropped: _Dropped, picker: Picker) -> list[CandidateReport]:
    probabilities = picker.probabilities(scores) if scores else []
    scored = {id(c): (s, p) for c, s, p in zip(eligible, scores, probabilities)}
    reasons = dropped.reasons() if dropped.pairs else {}
    reports = []
    for c in candidates:
        entry = scored.get(id(c))
        if entry is None:
            reports.append(CandidateReport(c.state.key, None, 0.0, reasons[id(c)]))
        else:
            reports.append(CandidateReport(c.state.key, entry[0], entry[1], None))
    return reports
