"""Refusals of unauthenticated requests, counted and recorded once per client address, reason and interval.

Writing (and fsyncing) one audit record for every request a stranger sends would give anyone who can reach the port a
lever to fill the disk. The tally keeps a count per (client address, reason) in memory and appends one `auth.failure`
record for each at the end of every interval and at shutdown: failures stay visible with their numbers, the records
written grow with the number of distinct senders, not with the number of requests. The distinct senders held per
interval are bounded too; beyond that, refusals are counted under one `(other addresses)` entry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sealbox.runtime.audit.errors import AuditError
from sealbox.runtime.background_task import cancel_and_wait
from sealbox.runtime.audit.log import AuditLog

log = logging.getLogger("sealbox.audit")

EVENT = "auth.failure"
MAX_SENDERS = 1024
"""(address, reason) pairs held per interval; more distinct senders are counted together."""
OTHER_ADDRESSES = "(other addresses)"
MAX_ENDPOINTS = 8


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Count:
    status: int
    first_seen: float
    last_seen: float
    count: int = 0
    endpoints: set[str] = field(default_factory=set)


class RefusalTally:
    def __init__(self, audit: AuditLog | None, *, interval_s: float, max_senders: int = MAX_SENDERS) -> None:
        self.audit = audit
        self.interval_s = interval_s
        self.max_senders = max_senders
        self._counts: dict[tuple[str, str], _Count] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, *, client: str, reason: str, status: int, endpoint: str) -> None:
        """Count one refusal (no I/O: this runs for every stranger's request)."""
        key = (client, reason)
        if key not in self._counts and len(self._counts) >= self.max_senders:
            key = (OTHER_ADDRESSES, reason)
        now = time.time()
        entry = self._counts.get(key)
        if entry is None:
            entry = self._counts[key] = _Count(status=status, first_seen=now, last_seen=now)
        entry.count += 1
        entry.last_seen = now
        if len(entry.endpoints) < MAX_ENDPOINTS:
            entry.endpoints.add(endpoint)

    @property
    def pending(self) -> int:
        return sum(entry.count for entry in self._counts.values())

    def start(self) -> None:
        """Flush at the end of every interval, from the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._every_interval(), name="refusal-tally")

    async def stop(self) -> None:
        """Stop the interval timer and record what was counted since the last flush."""
        await cancel_and_wait(self._task)
        self._task = None
        await self.flush()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.flush()

    async def flush(self) -> None:
        """One record per (address, reason) counted since the last flush. A log that cannot write is already failing
        closed (every API request is answered 503); the counts are then only logged."""
        counts, self._counts = self._counts, {}
        for (client, reason), entry in counts.items():
            fields = {
                "client": client,
                "reason": reason,
                "status": entry.status,
                "count": entry.count,
                "first_seen": _iso(entry.first_seen),
                "last_seen": _iso(entry.last_seen),
                "interval_s": self.interval_s,
                "endpoints": sorted(entry.endpoints),
            }
            if self.audit is None:
                continue
            try:
                await self.audit.append_async(EVENT, **fields)
            except AuditError as exc:
                log.error("%d refusals from %s (%s) not recorded: %s", entry.count, client, reason, exc)
