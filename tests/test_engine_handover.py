"""A step's tokens are written out before the next decode: the engine waits for the event loops to take them, and a
loop that is busy elsewhere holds the engine back no longer than `HANDOVER_WAIT_S`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from sealbox.runtime.engine.base import Finished
from sealbox.runtime.engine.scheduler import HANDOVER_WAIT_S, Scheduler
from engine_support import running_engine


@contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def idle_scheduler(model: Path) -> Scheduler:
    """A started engine's scheduler with its loop ended, for a test to drive by hand."""

    async def stopped() -> Scheduler:
        async with running_engine(model, "tiny-handover", n_seq_max=1, queue_size=1, n_threads=1) as engine:
            scheduler = engine._scheduler
            assert scheduler is not None
            return scheduler

    return asyncio.run(stopped())


def listener(loop: asyncio.AbstractEventLoop) -> SimpleNamespace:
    """What `flush` needs of a task: its loop and its event queue."""
    return SimpleNamespace(loop=loop, events=asyncio.Queue(), cancelled=False)


def test_the_next_decode_waits_until_the_loop_has_taken_the_last_steps_events(tiny_model: Path) -> None:
    scheduler = idle_scheduler(tiny_model)
    with loop_in_thread() as loop:
        task = listener(loop)
        scheduler._outbox.append((task, Finished("stop", prompt_tokens=1, completion_tokens=1)))
        scheduler.flush()
        handed = list(scheduler._handed)
        scheduler._await_handover()
    assert len(handed) == 1 and handed[0].is_set()
    assert task.events.qsize() == 1
    assert scheduler._handed == []


def test_a_loop_busy_elsewhere_holds_the_engine_back_only_briefly(tiny_model: Path) -> None:
    scheduler = idle_scheduler(tiny_model)
    release = threading.Event()
    with loop_in_thread() as loop:
        loop.call_soon_threadsafe(release.wait, 30)  # a callback that keeps the loop from anything else
        task = listener(loop)
        scheduler._outbox.append((task, Finished("stop", prompt_tokens=1, completion_tokens=1)))
        scheduler.flush()
        handed = list(scheduler._handed)
        started = time.monotonic()
        scheduler._await_handover()
        waited = time.monotonic() - started
        release.set()
    assert not handed[0].is_set()  # the loop had not taken the events when the engine went on
    assert HANDOVER_WAIT_S * 0.9 <= waited < 5.0
    assert scheduler._handed == []
