"""The async iterator a request handler reads: events of one request's choices, and their cancellation when closed
or dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sealbox.runtime.engine.base import Finished, GenerationEvent
from sealbox.runtime.engine.task import Failed, GenerationTask


class EventStream(AsyncIterator[GenerationEvent]):
    """Yields the events of a request's choices (they share one queue) up to the last choice's `Finished`; raises the
    engine's error if any choice failed.

    Closing it (`aclose`), cancelling the task that awaits it, or dropping it unread all cancel the request: a queued
    choice leaves the queue at once, a running one frees its sequence at the next scheduler step.
    """

    def __init__(self, tasks: list[GenerationTask], cancel: Callable[[GenerationTask], None]) -> None:
        self._tasks = tasks
        self._events = tasks[0].events
        self._cancel = cancel
        self._open = len(tasks)
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await self._events.get()
        except BaseException:  # CancelledError: whoever was reading is gone
            self.close()
            raise
        if isinstance(event, Failed):
            self.close()
            raise event.error
        if isinstance(event, Finished):
            self._open -= 1
            if self._open == 0:
                self._closed = True
        return event

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for task in self._tasks:
                self._cancel(task)

    def __del__(self) -> None:
        self.close()
