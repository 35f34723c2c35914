"""The errors the dispatcher raises on purpose.

Both reach the caller: :class:`InvalidRequest` from ``delay()`` itself,
:class:`NoGpuAvailable` from ``AsyncResult.get()``.  Celery stores a task's
exception in the result backend as its type and arguments (JSON), and
rebuilds it in the caller as ``cls(*args)``; so each class here is built
from its message alone, and the message says everything.
"""

from __future__ import annotations

from typing import Mapping

from scoring import NoEligibleGpu


class InvalidRequest(ValueError):
    """``dispatch_inference`` was called with a prompt or option it cannot send; nothing was queued."""


class NoGpuAvailable(NoEligibleGpu):
    """No GPU could take the request for the whole bounded wait (``GPU_DISPATCH_NO_GPU_WAIT``).

    A :class:`scoring.NoEligibleGpu`; the message lists each GPU and why it was
    dropped at the last attempt.

    :param message: the full message.
    :param reasons: each GPU's key mapped to why it was dropped (not carried
        through the result backend: read the message there).
    """

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None) -> None:
        Exception.__init__(self, message)
        self.reasons = dict(reasons or {})


class InferenceTimeLimitExceeded(RuntimeError):
    """The inference ran longer than ``GPU_DISPATCH_MAX_INFERENCE_SECONDS``; its late result is discarded."""
