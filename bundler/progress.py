"""How long-running bundle steps report progress without knowing who listens (a rich bar, a test, nobody)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

ByteCounter = Callable[[int], None]


class Progress(Protocol):
    def step(self, description: str) -> None:
        """A short step with no byte count (resolving inputs, signing)."""

    def bytes(self, description: str, total: int) -> Iterator[ByteCounter]:
        """A context manager yielding a callable that is told how many more bytes are done (thread-safe)."""


class SilentProgress:
    def __enter__(self) -> SilentProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def step(self, description: str) -> None:
        pass

    @contextmanager
    def bytes(self, description: str, total: int) -> Iterator[ByteCounter]:
        yield lambda count: None
