"""One model, one answer at a time: every caller of the pipeline takes a turn here.

The answer runner (:mod:`phi3v_app.runner`) takes a turn here around every use of the pipeline,
for the chat, its ``/chat`` API and the OpenAI-compatible endpoint alike. Turns are granted in
arrival order; a bounded number of callers may wait, and the next one is refused at once (so the
server never piles up work it cannot do). A waiting caller is told its place in the line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class QueueFull(Exception):
    """Too many callers are already waiting for the model."""


class TurnCancelled(Exception):
    """The caller gave up (Stop, a closed connection) before its turn came."""


class ModelTurns:
    """A FIFO lock around the model with at most ``max_waiting`` callers waiting."""

    POLL_SECONDS = 0.1  # how often a waiter looks at its cancel event

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._condition = threading.Condition()
        self._issued = 0  # tickets handed out; ticket n is the n-th caller
        self._serving = 0  # the ticket whose turn it is (or that holds it)
        self._skipped: set[int] = set()  # tickets given up while waiting

    @property
    def waiting(self) -> int:
        """Callers waiting for a turn, the one holding it excluded."""
        with self._condition:
            return self._waiting()

    @property
    def busy(self) -> bool:
        """Whether someone holds the turn or waits for it."""
        with self._condition:
            return self._issued > self._serving

    @contextmanager
    def turn(
        self,
        cancelled: threading.Event | None = None,
        waiting: Callable[[int], None] | None = None,
    ) -> Iterator[None]:
        """Hold the model for the ``with`` block. Raises :class:`QueueFull` at once when
        ``max_waiting`` callers already wait, :class:`TurnCancelled` when ``cancelled`` is set
        before the turn comes. While the caller waits, ``waiting(ahead)`` hears how many callers
        the model serves first (the one holding it included), each time that number changes."""
        told = None
        with self._condition:
            if self._issued > self._serving and self._waiting() >= self.max_waiting:
                raise QueueFull(f"{self._waiting()} requests are already waiting for the model")
            ticket, self._issued = self._issued, self._issued + 1
            while ticket != self._serving:
                if cancelled is not None and cancelled.is_set():
                    self._skipped.add(ticket)
                    raise TurnCancelled("cancelled while waiting for the model")
                ahead = (
                    ticket - self._serving - sum(self._serving < s < ticket for s in self._skipped)
                )
                if waiting is not None and ahead != told:
                    told = ahead
                    waiting(ahead)
                self._condition.wait(self.POLL_SECONDS)
        try:
            yield
        finally:
            with self._condition:
                self._serving += 1
                while self._serving in self._skipped:
                    self._skipped.discard(self._serving)
                    self._serving += 1
                self._condition.notify_all()

    def _ahead_of(self, ticket: int) -> int:
        """Callers served before ``ticket``: the holder and those waiting since earlier."""
        gone = sum(self._serving < skipped < ticket for skipped in self._skipped)
        return ticket - self._serving - gone

    def _waiting(self) -> int:
        holder = 1 if self._issued > self._serving else 0
        return self._issued - self._serving - holder - len(self._skipped)
