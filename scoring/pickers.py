"""Pickers: choose one candidate from its score, with randomness from the caller.

Randomising the choice, instead of always taking the best score, is what keeps
many dispatchers that share one stale reading from all sending to the same
GPU until the next refresh (the "thundering herd" the seed article warns of).

Each picker has :meth:`Picker.pick` (the choice) and
:meth:`Picker.probabilities` (each candidate's chance of being picked, for the
status view); :func:`ranked` orders the rest for retries.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from bisect import bisect_left, bisect_right
from itertools import accumulate
from typing import ClassVar, Sequence

from scoring.errors import number


class Picker(ABC):
    """Chooses an index into a list of scores (all ≥ 0, at least one)."""

    #: Short name used in profiles and reports.
    name: ClassVar[str]

    @abstractmethod
    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        """The index chosen."""

    @abstractmethod
    def probabilities(self, scores: Sequence[float]) -> list[float]:
        """Each index's probability of being chosen by :meth:`pick`; they sum to 1."""


class WeightedRoulette(Picker):
    """Roulette-wheel selection: index ``i`` with probability ``w_i / Σ w``, ``w_i = score_i ** sharpness``.

    The wheel is laid out by cumulative sums and a uniform draw in
    ``[0, Σ w)`` is located by bisection — O(n) to lay out, O(log n) to draw
    — as in the seed article's client, whose order of candidates therefore
    never changes a candidate's probability.  Sharpness 1 is the plain
    roulette; above 1 concentrates the choice on the best scores (towards
    "always the best"), below 1 spreads it (towards uniform).  When every
    weight is 0 the choice is uniform: no candidate is better than another.

    :param sharpness: exponent applied to the scores, > 0; default 1.
    """

    name = "roulette"

    def __init__(self, sharpness: float = 1.0) -> None:
        self.sharpness = number("sharpness", sharpness, "a positive number; 1 is the plain roulette, higher "
                                                        "favours the best scores more")

    def _weights(self, scores: Sequence[float]) -> Sequence[float]:
        if self.sharpness == 1.0:
            return scores
        k = self.sharpness
        return [s ** k for s in scores]

    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        n = len(scores)
        if n == 1:
            return 0
        cumulative = list(accumulate(self._weights(scores)))
        total = cumulative[-1]
        if total <= 0.0:
            return min(int(rng.random() * n), n - 1)
        index = bisect_right(cumulative, rng.random() * total)
        if index < n:
            return index
        # The draw rounded up to the total: take the last candidate with any weight.
        return bisect_left(cumulative, total)

    def probabilities(self, scores: Sequence[float]) -> list[float]:
        weights = self._weights(scores)
        total = math.fsum(weights)
        if total <= 0.0:
            return [1.0 / len(weights)] * len(weights)
        return [w / total for w in weights]

    def __repr__(self) -> str:
        return f"WeightedRoulette(sharpness={self.sharpness:g})"


class PowerOfTwoChoices(Picker):
    """Power of two choices: draw two distinct candidates uniformly, keep the better score.

    Mitzenmacher's "power of two choices" (2001): exponentially shorter
    maximum queues than one random choice, while the randomness still keeps
    dispatchers with the same view from herding.  O(1) per pick; a tie is
    settled by a fair coin, so order never matters.
    """

    name = "p2c"

    def pick(self, scores: Sequence[float], rng: random.Random) -> int:
        n = len(scores)
        if n == 1:
            return 0
        i = min(int(rng.random() * n), n - 1)
        j = min(int(rng.random() * (n - 1)), n - 2)
        if j >= i:
            j += 1
        if scores[i] > scores[j]:
            return i
        if scores[j] > scores[i]:
            return j
        return i if rng.random() < 0.5 else j

    def probabilities(self, scores: Sequence[float]) -> list[float]:
        n = len(scores)
        if n == 1:
            return [1.0]
        # Candidate i is drawn into the pair with probability 2 / n; its rival is one of the other n - 1,
        # equally likely; it wins against every lower score and half its ties.
        order = sorted(scores)
        probabilities = []
        for s in scores:
            lower = bisect_left(order, s)
            tied = bisect_right(order, s) - lower - 1
            probabilities.append(2.0 / n * (lower + 0.5 * tied) / (n - 1))
        return probabilities


def ranked(scores: Sequence[float], keys: Sequence[str], *, skip: int) -> list[int]:
    """Indices by score, best first, without ``skip`` (the one already chosen): the order to retry in.

    Ties go to the smaller key, so the order is reproducible.  O(n log n).
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], keys[i]))
    return [i for i in order if i != skip]
