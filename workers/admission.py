"""Admission of a GPU worker's requests to its GPU's memory: one at a time, in arrival order.

Dispatchers do not refuse a request because a GPU is busy *now* (its memory
comes and goes with our own requests, faster than readings): they send it
to the best GPU, and the request waits here until its memory is free.  The
line is strict FIFO — a large request at the head is never overtaken by
small ones behind it — and fails open: a request is admitted whenever none
of ours runs, even if the GPU's other tenants leave it too little (it then
runs, or fails with the model's own out-of-memory error, rather than waiting
for ever).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from workers.gpu import InFlight

#: Seconds between re-checks of the GPU's free memory while the head of the line waits
#: (other tenants free memory without telling us).
RECHECK_S = 0.25


class Ticket:
    """One request's place in the line."""

    __slots__ = ("memory_mb", "admitted")

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self.admitted = False


class Admission:
    """The worker's line for GPU memory (thread-safe).

    :param room_mb: memory our requests may still take on the GPU now, MB.
    :param inflight: the requests holding memory; admission adds to it, :meth:`leave` takes away.
    """

    def __init__(self, room_mb: Callable[[], float], inflight: InFlight) -> None:
        self._room_mb = room_mb
        self._inflight = inflight
        self._line: deque[Ticket] = deque()
        self._changed = threading.Condition()
        self._closed = False

    def enter(self, memory_mb: int) -> Ticket:
        ticket = Ticket(memory_mb)
        with self._changed:
            self._line.append(ticket)
        return ticket

    def try_admit(self, ticket: Ticket) -> bool:
        """Admit ``ticket`` now if it is at the head of the line and its memory is free; never waits."""
        with self._changed:
            return self._admit_if_due(ticket)

    def wait(self, ticket: Ticket) -> bool:
        """Block until ``ticket`` is admitted (``True``) or the line is closed (``False``)."""
        with self._changed:
            while not self._admit_if_due(ticket):
                if self._closed:
                    return False
                self._changed.wait(RECHECK_S)
            return True

    def leave(self, ticket: Ticket) -> None:
        """Give back the memory of an admitted ticket, or its place in the line."""
        with self._changed:
            if ticket.admitted:
                ticket.admitted = False
                self._inflight.release(ticket.memory_mb)
            else:
                try:
                    self._line.remove(ticket)
                except ValueError:
                    pass
            self._changed.notify_all()

    def close(self) -> None:
        """Admit nothing more: every waiting request gives up its place (warm shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._line)

    def _admit_if_due(self, ticket: Ticket) -> bool:
        if ticket.admitted:
            return True
        if self._closed or not self._line or self._line[0] is not ticket:
            return False
        if self._inflight.count and self._room_mb() < ticket.memory_mb:
            return False
        self._line.popleft()
        ticket.admitted = True
        self._inflight.take(ticket.memory_mb)
        self._changed.notify_all()  # the next one in line may fit too
        return True
