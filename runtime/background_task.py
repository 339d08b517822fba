"""Stopping a background asyncio task: cancel it and wait until it has ended, so that none of it runs after `stop`."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task[object] | None) -> None:
    """Cancel `task` (when there is one) and wait for it; its cancellation is the expected end, not an error."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
