"""rich progress bars for long bundle steps, on stderr so `--json` output on stdout stays clean.

rich is imported only when stderr is a terminal: a scripted run (`--json`, a log file, CI) never draws a bar, and
not importing rich saves about 25 ms of a 0.13 s `bundle verify` start.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from sealbox.bundler.progress import ByteCounter, SilentProgress

if TYPE_CHECKING:
    from rich.console import Console


def stderr_progress() -> RichProgress | SilentProgress:
    """Bars when a person watches stderr, nothing otherwise."""
    return RichProgress() if sys.stderr.isatty() else SilentProgress()


class RichProgress:
    """Implements `bundler.progress.Progress` with one bar per byte-counted step; silent when stderr is not a TTY."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

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
            from rich.markup import escape

            self._bars.console.log(escape(description))

    @contextmanager
    def bytes(self, description: str, total: int) -> Iterator[ByteCounter]:
        from rich.markup import escape

        task = self._bars.add_task(escape(description), total=total)
        try:
            yield lambda count: self._bars.advance(task, count)
        finally:
            self._bars.update(task, completed=total)
