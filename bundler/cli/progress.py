"""rich progress bars for long bundle steps, on stderr so `--json` output on stdout stays clean."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bundler.progress import ByteCounter


class RichProgress:
    """Implements `bundler.progress.Progress` with one bar per byte-counted step; silent when stderr is not a TTY."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not self.console.is_terminal,
        )

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def step(self, description: str) -> None:
        if self.console.is_terminal:
            self._bars.console.log(escape(description))

    @contextmanager
    def bytes(self, description: str, total: int) -> Iterator[ByteCounter]:
        task = self._bars.add_task(escape(description), total=total)
        try:
            yield lambda count: self._bars.advance(task, count)
        finally:
            self._bars.update(task, completed=total)
