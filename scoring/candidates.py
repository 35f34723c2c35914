"""What one selection is made over: candidate GPUs and the request to place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scoring.errors import InvalidParameter
from scoring.state import GpuState


@dataclass(slots=True)
class Candidate:
    """A GPU as one dispatcher sees it: the last reading plus what it sent there since.

    The reading is shared by every dispatcher; the counts are this
    dispatcher's own, so two dispatchers that both just sent work to one GPU
    each know about their own share before the next reading shows the sum.

    :param state: the GPU's last metadata reading.
    :param sent_since_reading: requests this dispatcher sent to the GPU after
        the reading was taken (``updated_at``); default 0.
    :param sent_memory_mb: their estimated memory, MB; default 0.
    :param queue_depth: messages waiting in the GPU's broker queue, as the
        dispatcher last counted them (live, shared by all dispatchers);
        ``None`` when not counted.
    """

    state: GpuState
    sent_since_reading: int = 0
    sent_memory_mb: float = 0.0
    queue_depth: int | None = None

    @property
    def in_flight(self) -> int:
        """Requests on the GPU as far as this dispatcher knows: reported plus sent since the reading."""
        return self.state.concurrent_requests + self.sent_since_reading


@dataclass(frozen=True, slots=True)
class Request:
    """The work to place.

    :param model: the model the request needs; ``None`` when any GPU's model will do.
    :param memory_mb: the request's estimated GPU memory need, MB; default 0 (unknown).
    """

    model: str | None = None
    memory_mb: float = 0.0

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, str):
            raise InvalidParameter("model", f"{self.model!r} is not a model name (a string, or None for any)")
        if (isinstance(self.memory_mb, bool) or not isinstance(self.memory_mb, (int, float))
                or not math.isfinite(self.memory_mb) or self.memory_mb < 0):
            raise InvalidParameter("memory_mb", f"{self.memory_mb!r} is not a memory estimate in MB "
                                                "(a finite number ≥ 0; 0 when unknown)")

    def describe(self) -> str:
        """A short description for messages, e.g. ``"model 'llama-7b', 8192 MB"``."""
        model = "any model" if self.model is None else f"model {self.model!r}"
        return f"{model}, {self.memory_mb:g} MB"
