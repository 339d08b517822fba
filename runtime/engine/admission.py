"""Admission by sequences and KV cells, with a bounded queue that is fair across principals.

A request is admitted only when a sequence is free and its prompt + max_tokens fits the cells not yet reserved; a
reservation is held until the request ends, so a running stream can never run out of cache. Otherwise it waits.
Waiting requests are served round-robin by principal (API key): one key flooding the queue delays itself, not the
others. The head of the round is never skipped for a smaller request behind it, so a large request cannot starve.
Past `queue_size` waiting requests, `submit` raises `Overloaded` with a Retry-After estimated from recent service times.

Thread-safe: request handlers submit and withdraw, the scheduler thread takes and releases.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Protocol

from sealbox.runtime.engine.base import ContextLengthExceeded, EngineUnavailable, Overloaded

DEFAULT_SERVICE_S = 2.0
"""Assumed time a request holds a sequence before any has finished; only feeds the first Retry-After estimates."""
MAX_RETRY_AFTER_S = 60


class Ticket(Protocol):
    principal: str
    cells: int
    admitted_at: float
    cancelled: bool


class Admission:
    def __init__(self, *, slots: int, cells: int, queue_size: int) -> None:
        self.slots = slots
        self.cells = cells
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._waiting: dict[str, deque[Ticket]] = {}
        self._round: deque[str] = deque()
        self._n_waiting = 0
        self._ready: list[Ticket] = []
        self._admitted = 0
        self._reserved = 0
        self._service_s = DEFAULT_SERVICE_S
        self._closed = False

    @property
    def waiting(self) -> int:
        return self._n_waiting

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def reserved_cells(self) -> int:
        return self._reserved

    def submit(self, ticket: Ticket) -> bool:
        """Admit at once (True) or queue (False).

        Raises:
            ContextLengthExceeded: the request needs more cells than the whole cache has.
            Overloaded: the queue is full.
            EngineUnavailable: the engine is stopping.
        """
        return self.submit_all([ticket])[0]

    def submit_all(self, tickets: list[Ticket]) -> list[bool]:
        """Submit several tickets at once (the choices of one request): all or none, and the scheduler takes those
        admitted in one go, so that the first choice's prompt is still being evaluated when the others are placed.

        Raises as `submit` does, with none of the tickets left admitted or queued.
        """
        for ticket in tickets:
            if ticket.cells > self.cells:
                raise ContextLengthExceeded(
                    f"the request needs {ticket.cells} KV cells; the whole cache has {self.cells}",
                    needed=ticket.cells,
                    limit=self.cells,
                )
        with self._lock:
            if self._closed:
                raise EngineUnavailable("the engine is stopping")
            if self._n_waiting == 0 and self._fits_all(tickets):
                for ticket in tickets:
                    self._admit(ticket)
                return [True] * len(tickets)
            if self._n_waiting + len(tickets) > self.queue_size:
                raise Overloaded(
                    f"{self._n_waiting} requests are already waiting (queue limit {self.queue_size})",
                    retry_after_s=self._retry_after(),
                )
            for ticket in tickets:
                queue = self._waiting.get(ticket.principal)
                if queue is None:
                    queue = self._waiting[ticket.principal] = deque()
                    self._round.append(ticket.principal)
                queue.append(ticket)
                self._n_waiting += 1
            self._promote()
            return [ticket.admitted_at > 0 for ticket in tickets]

    def withdraw(self, ticket: Ticket) -> bool:
        """Take a waiting ticket out of the queue (its client left); False if it is not waiting."""
        with self._lock:
            queue = self._waiting.get(ticket.principal)
            if queue is None:
                return False
            try:
                queue.remove(ticket)
            except ValueError:
                return False
            self._n_waiting -= 1
            if not queue:
                del self._waiting[ticket.principal]
                self._round.remove(ticket.principal)
            return True

    def take_ready(self) -> list[Ticket]:
        """Tickets admitted since the last call, in admission order, for the scheduler to place."""
        with self._lock:
            ready, self._ready = self._ready, []
            return ready

    def release(self, ticket: Ticket) -> None:
        """Give back an admitted ticket's sequence and cells, and admit whoever now fits."""
        with self._lock:
            self._admitted -= 1
            self._reserved -= ticket.cells
            held = time.monotonic() - ticket.admitted_at
            self._service_s = 0.8 * self._service_s + 0.2 * held
            self._promote()

    def close(self) -> list[Ticket]:
        """Refuse new tickets; return those admitted but not yet taken and those waiting, for the caller to fail."""
        with self._lock:
            self._closed = True
            left = self._ready
            self._ready = []
            for principal in self._round:
                left.extend(self._waiting[principal])
            self._waiting.clear()
            self._round.clear()
            self._n_waiting = 0
            return left

    def retry_after(self) -> int:
        with self._lock:
            return self._retry_after()

    def _fits(self, ticket: Ticket) -> bool:
        return self._admitted < self.slots and self._reserved + ticket.cells <= self.cells

    def _fits_all(self, tickets: list[Ticket]) -> bool:
        return (self._admitted + len(tickets) <= self.slots
                and self._reserved + sum(ticket.cells for ticket in tickets) <= self.cells)  # fmt: skip

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted_at = time.monotonic()
        self._admitted += 1
        self._reserved += ticket.cells
        self._ready.append(ticket)

    def _promote(self) -> None:
        while self._round:
            principal = self._round[0]
            queue = self._waiting[principal]
            ticket = queue[0]
            if not self._fits(ticket):
                return
            queue.popleft()
            self._n_waiting -= 1
            self._round.popleft()
            if queue:
                self._round.append(principal)
            else:
                del self._waiting[principal]
            self._admit(ticket)

    def _retry_after(self) -> int:
        # Requests ahead, served `slots` at a time, each holding a sequence for about the recent service time.
        wait = (self._n_waiting + 1) * self._service_s / self.slots
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wait)))
