""":func:`~scoring.decision.choose`, kept current: evaluated once over the candidates, then one at a time.

A dispatcher decides many times between two passes over the broker, and
between two of its own decisions only the GPU it just sent to has changed.
:class:`Selector` evaluates every candidate once (filters and scorers, as
:func:`choose` does), keeps each one's score and roulette weight, and after
:meth:`Selector.replace` re-evaluates only the candidate that changed: a
decision then costs one candidate's evaluation and one pass over the
weights in C (cumulative sums and a bisection), instead of every filter and
scorer over every candidate.  Every scorer scores a candidate on its own (no
scorer normalises over the others), so the scores are exactly :func:`choose`'s.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from itertools import accumulate
from typing import Sequence

from scoring.candidates import Candidate, Request
from scoring.decision import _RNG, Decision, _Dropped, _evaluate, within_bounded_load
from scoring.errors import NoEligibleGpu
from scoring.pickers import WeightedRoulette
from scoring.profiles import DEFAULT_PROFILE, Profile, get_profile


class Selector:
    """Decisions for one request shape over a set of candidates that change one at a time.

    :param candidates: the GPUs, as :func:`choose` takes them.
    :param request: the model and memory every decision is for.
    :param profile: a :class:`Profile` or its name.
    :param now_ms: the clock readings age against (the caller rebuilds a selector when it moves on).
    :param prefer_slack: ε of the bounded-load rule for a preferred GPU (:func:`within_bounded_load`).
    """

    def __init__(self, candidates: Sequence[Candidate], request: Request, *,
                 profile: Profile | str = DEFAULT_PROFILE, now_ms: int, prefer_slack: float = 0.25) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.request, self.now_ms, self.prefer_slack = request, now_ms, prefer_slack
        self._candidates = list(candidates)
        self._positions = {c.state.queue: i for i, c in enumerate(self._candidates)}
        n = len(self._candidates)
        self._scores: list[float | None] = [None] * n
        self._dropped_by: list = [None] * n
        eligible, scores, dropped = _evaluate(tuple(self._candidates), request, self.profile, now_ms)
        position = {id(c): i for i, c in enumerate(self._candidates)}
        for c, s in zip(eligible, scores):
            self._scores[position[id(c)]] = s
        for c, f in dropped.pairs:
            self._dropped_by[position[id(c)]] = f
        picker = self.profile.picker
        self._roulette = picker if isinstance(picker, WeightedRoulette) else None
        self._weights = [0.0 if s is None else self._weight(s) for s in self._scores]
        self._cumulative: list[float] | None = None

    def _weight(self, score: float) -> float:
        return score ** self._roulette.sharpness if self._roulette is not None else score

    def position(self, queue: str) -> int | None:
        """Where the GPU of ``queue`` is among the candidates, or ``None``."""
        return self._positions.get(queue)

    def replace(self, index: int, candidate: Candidate) -> None:
        """The candidate at ``index`` has changed (a request was sent to it): evaluate it alone, again."""
        self._candidates[index] = candidate
        eligible, scores, dropped = _evaluate((candidate,), self.request, self.profile, self.now_ms)
        self._scores[index] = scores[0] if eligible else None
        self._dropped_by[index] = dropped.pairs[0][1] if dropped.pairs else None
        self._weights[index] = self._weight(scores[0]) if eligible else 0.0
        self._cumulative = None

    def choose(self, rng: random.Random | None = None, prefer: str | None = None) -> Decision:
        """What :func:`choose` would decide over the current candidates.

        :raises NoEligibleGpu: every candidate dropped (or none); the message lists why.
        """
        rng = rng or _RNG
        scores = self._scores
        index = None
        if prefer is not None:
            index = self._preferred(prefer)
        if index is None:
            if self._roulette is not None:
                cumulative = self._cumulative
                if cumulative is None:
                    cumulative = self._cumulative = list(accumulate(self._weights))
                total = cumulative[-1] if cumulative else 0.0
                if total > 0.0:
                    index = min(bisect_right(cumulative, rng.random() * total), len(cumulative) - 1)
                    while self._weights[index] == 0.0:  # the draw rounded onto a zero-weight tail
                        index -= 1
            if index is None:
                eligible = [i for i, s in enumerate(scores) if s is not None]
                if not eligible:
                    raise self._no_eligible()
                index = eligible[self.profile.picker.pick([scores[i] for i in eligible], rng)]
        return self._decision(index)

    def _preferred(self, queue: str) -> int | None:
        index = self._positions.get(queue)
        if index is None or self._scores[index] is None:
            return None
        loads = [c.in_flight for c, s in zip(self._candidates, self._scores) if s is not None]
        rank = sum(1 for s in self._scores[:index] if s is not None)
        return index if within_bounded_load(loads, rank, self.prefer_slack) else None

    def _decision(self, index: int) -> Decision:
        # A copy of what was decided on (C-speed list copies); worded only if someone asks.
        candidates, scores, dropped_by = tuple(self._candidates), list(self._scores), list(self._dropped_by)
        chosen = candidates[index]

        def details():
            eligible = [c for c, s in zip(candidates, scores) if s is not None]
            dropped = _Dropped(self.request, self.now_ms)
            dropped.pairs = [(c, f) for c, f in zip(candidates, dropped_by) if f is not None]
            return (candidates, eligible, [s for s in scores if s is not None], dropped,
                    next(i for i, c in enumerate(eligible) if c is chosen))

        return Decision(self.profile, chosen, details)

    def _no_eligible(self) -> NoEligibleGpu:
        dropped = _Dropped(self.request, self.now_ms)
        dropped.pairs = [(c, f) for c, f in zip(self._candidates, self._dropped_by) if f is not None]
        reasons = dropped.reasons()
        return NoEligibleGpu({c.state.key: reasons[id(c)] for c in self._candidates}, self.request.describe())
