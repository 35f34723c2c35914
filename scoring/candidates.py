"""What one selection is made over: candidate GPUs and the request to place."""

from __future__ import annotations

from dataclasses import dataclass

from scoring.errors import InvalidParameter, number
from scoring.state import GpuState


@dataclass(slots=True)
class Candidate:
    """A GPU as a dispatcher sees it: its last reading plus the live load the request ledger counts.

    The reading says what the card and its other tenants were doing when it
    was taken; the load says what our own requests do *now*, exactly and the
    same for every dispatcher (the ledger is shared), so nothing has to be
    guessed between readings.

    :param state: the GPU's last metadata reading.
    :param queued: requests sent to the GPU that are not running yet (waiting in its queue, or
        for memory on it); default 0.
    :param queued_mb: their declared memory, MB; default 0.
    :param running: requests running on it now; ``None`` (unknown) takes the reading's
        ``concurrent_requests``.
    :param running_mb: the memory they hold, MB; ``None`` takes the reading's ``held_mb``.
    """

    state: GpuState
    queued: int = 0
    queued_mb: float = 0.0
    running: int | None = None
    running_mb: float | None = None

    @property
    def running_now(self) -> int:
        """Requests running now: the ledger's count, or the reading's when the ledger is unknown."""
        return self.state.concurrent_requests if self.running is None else self.running

    @property
    def in_flight(self) -> int:
        """Requests on the GPU now, running or waiting for it."""
        return self.running_now + self.queued

    @property
    def free_mb(self) -> float:
        """Memory free now, MB: the reading's free memory, plus what our requests held at the
        reading, less what they hold now (other tenants as at the reading)."""
        held_now = self.state.held_mb if self.running_mb is None else self.running_mb
        return self.state.room_mb - held_now


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
        number("memory_mb", self.memory_mb, "a memory estimate in MB (a finite number ≥ 0; 0 when unknown)",
               zero_allowed=True)

    def describe(self) -> str:
        """A short description for messages, e.g. ``"model 'llama-7b', 8192 MB"``."""
        model = "any model" if self.model is None else f"model {self.model!r}"
        return f"{model}, {self.memory_mb:g} MB"
