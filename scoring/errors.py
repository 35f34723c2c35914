"""The errors scoring raises on purpose; everything else would be a bug.

Every error derives from :class:`ScoringError`, so a caller that must never
crash (the dispatcher) can catch that one base and log the message, which
always says what was wrong and what to change.
"""

from __future__ import annotations

import math
from typing import Mapping


class ScoringError(Exception):
    """Base of every error that scoring raises on purpose."""


class InvalidParameter(ScoringError, ValueError):
    """A filter, scorer, picker or profile was built with a value it cannot use.

    :param parameter: the parameter's name, e.g. ``"max_age_s"``.
    :param message: what was wrong with its value and what would do instead.
    """

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class MalformedMetadata(ScoringError):
    """One registry instance's metadata cannot be read as a GPU of ours.

    The dispatcher skips that instance, reports ``key`` and ``reason``, and
    goes on with the others: one malformed instance never affects the rest.

    :param key: the instance, ``"<ip>:<port>"``.
    :param reason: what is wrong with its metadata, in words an operator can act on.
    """

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"GPU instance {key}: {reason}")
        self.key = key
        self.reason = reason


class NoEligibleGpu(ScoringError):
    """Every candidate was filtered out, or there were none.

    :param reasons: each candidate's key mapped to why it was dropped, in the
        order the candidates came; empty when no GPU is registered at all.
    :param request: a short description of the request, e.g. ``"model 'llama-7b', 8192 MB"``.
    """

    def __init__(self, reasons: Mapping[str, str], request: str) -> None:
        self.reasons = dict(reasons)
        if not self.reasons:
            message = f"no eligible GPU for request ({request}): no GPU registered in service"
        else:
            listed = "; ".join(f"{key}: {why}" for key, why in self.reasons.items())
            message = f"no eligible GPU for request ({request}): every GPU was dropped — {listed}"
        super().__init__(message)


def number(parameter: str, value: object, message: str, *, zero_allowed: bool = False) -> float:
    """``value`` as a float if it is a finite number above 0 (or ≥ 0 with ``zero_allowed``).

    :raises InvalidParameter: naming ``parameter``, ``value`` and ``message`` (what it should be).
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or (value == 0 and not zero_allowed)):
        raise InvalidParameter(parameter, f"{value!r} is not {message}")
    return float(value)
