"""Admission by sequences and KV cells, and the fairness of its queue (pure Python: no model needed)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sealbox.runtime.engine.admission import Admission
from sealbox.runtime.engine.base import ContextLengthExceeded, EngineUnavailable, Overloaded


@dataclass(eq=False)
class Ticket:
    principal: str
    cells: int
    name: str = ""
    admitted_at: float = 0.0
    cancelled: bool = False


def names(tickets: list) -> list[str]:
    return [ticket.name for ticket in tickets]


def test_admits_at_once_while_sequences_and_cells_are_free() -> None:
    admission = Admission(slots=2, cells=100, queue_size=4)
    assert admission.submit(Ticket("a", 40, "a1")) is True
    assert admission.submit(Ticket("a", 40, "a2")) is True
    assert names(admission.take_ready()) == ["a1", "a2"]
    assert (admission.admitted, admission.reserved_cells, admission.waiting) == (2, 80, 0)


def test_a_request_that_does_not_fit_the_remaining_cells_waits_although_a_sequence_is_free() -> None:
    admission = Admission(slots=4, cells=100, queue_size=4)
    first = Ticket("a", 70, "first")
    assert admission.submit(first) is True
    assert admission.submit(Ticket("b", 40, "second")) is False
    assert admission.waiting == 1
    admission.take_ready()
    admission.release(first)
    assert names(admission.take_ready()) == ["second"]
    assert admission.reserved_cells == 40


def test_a_request_larger_than_the_whole_cache_is_refused_at_once() -> None:
    admission = Admission(slots=4, cells=100, queue_size=4)
    with pytest.raises(ContextLengthExceeded) as caught:
        admission.submit(Ticket("a", 101))
    assert (caught.value.needed, caught.value.limit) == (101, 100)
    assert admission.waiting == 0


def test_past_the_queue_limit_submit_raises_overloaded_with_a_retry_after() -> None:
    admission = Admission(slots=1, cells=100, queue_size=2)
    admission.submit(Ticket("a", 10))
    admission.submit(Ticket("a", 10))
    admission.submit(Ticket("a", 10))
    with pytest.raises(Overloaded) as caught:
        admission.submit(Ticket("a", 10))
    assert caught.value.retry_after_s >= 1
    assert admission.waiting == 2


def test_the_queue_serves_principals_round_robin_not_first_come() -> None:
    admission = Admission(slots=1, cells=100, queue_size=10)
    running = Ticket("flood", 10, "running")
    admission.submit(running)
    admission.take_ready()
    for i in range(3):
        admission.submit(Ticket("flood", 10, f"flood{i}"))
    admission.submit(Ticket("quiet", 10, "quiet0"))
    admission.submit(Ticket("other", 10, "other0"))
    served = []
    current = running
    for _ in range(5):
        admission.release(current)
        (current,) = admission.take_ready()
        served.append(current.name)
    assert served == ["flood0", "quiet0", "other0", "flood1", "flood2"]


def test_the_head_of_the_round_is_not_overtaken_by_a_smaller_request() -> None:
    admission = Admission(slots=4, cells=100, queue_size=10)
    big_running = Ticket("x", 60, "running")
    admission.submit(big_running)
    admission.take_ready()
    admission.submit(Ticket("a", 50, "large"))
    admission.submit(Ticket("b", 10, "small"))
    assert admission.take_ready() == []  # "small" would fit, but "large" is first in the round
    admission.release(big_running)
    assert names(admission.take_ready()) == ["large", "small"]


def test_a_withdrawn_ticket_leaves_the_queue_at_once() -> None:
    admission = Admission(slots=1, cells=100, queue_size=10)
    admission.submit(Ticket("a", 10))
    waiting = Ticket("b", 10, "gone")
    admission.submit(waiting)
    assert admission.withdraw(waiting) is True
    assert admission.waiting == 0
    assert admission.withdraw(waiting) is False


def test_close_returns_every_unplaced_ticket_and_refuses_new_ones() -> None:
    admission = Admission(slots=1, cells=100, queue_size=10)
    admission.submit(Ticket("a", 10, "ready"))
    admission.submit(Ticket("b", 10, "waiting"))
    assert sorted(names(admission.close())) == ["ready", "waiting"]
    with pytest.raises(EngineUnavailable):
        admission.submit(Ticket("c", 10))
