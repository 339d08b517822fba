"""The async iterator a request handler reads: events of one request, and its cancellation when closed or dropped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sealbox.runtime.engine.base import Finished, GenerationEvent
from sealbox.runtime.engine.task import Failed, GenerationTask


class EventStream(AsyncIterator[GenerationEvent]):
    """Yields a request's events up to and including `Finished`; raises the engine's error if it failed.

    Closing it (`aclose`), cancelling the task that awaits it, or dropping it unread all cancel the request: a queued
    request leaves the queue at once, a running one frees its sequence at the next scheduler step.
    """

    def __init__(self, task: GenerationTask, cancel: Callable[[GenerationTask], None]) -> None:
        self._task = task
        self._cancel = cancel
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._closed:
            raise StopAsyncIteration
        try:
            event = await self._task.events.get()
        except BaseException:  # CancelledError: whoever was reading is gone
            self.close()
            raise
        if isinstance(event, Failed):
            self._closed = True
            raise event.error
        if isinstance(event, Finished):
            self._closed = True
        return event

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._cancel(self._task)

    def __del__(self) -> None:
        self.close()
