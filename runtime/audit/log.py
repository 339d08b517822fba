"""The audit log writer: append a record, get its sequence number once it is on disk.

The interface the server, `bundle install`, the trust store and the egress guard code against::

    from sealbox.runtime.audit.log import AuditLog, AuditUnavailableError

    log = AuditLog.open(directory, policy.audit)   # creates the directory and host audit key if missing,
                                                   # sets aside a torn tail (recorded as `audit.torn_tail`)
    seq = log.append("api.request", request_id=..., principal=..., client=..., purpose=..., model=...,
                     model_sha256=..., prompt_tokens=..., completion_tokens=..., latency_ms=..., status=...)
    seq = await log.append_async("api.request", ...)   # the same, without blocking the event loop on the disk
    log.close()                                        # writes a final signed checkpoint

`append` is thread-safe and returns only when the record is durable; it raises `AuditUnavailableError` when the
log cannot write (disk full, I/O error, closed, failed before), and from then on the log refuses every append:
callers fail closed. The outage ends by itself: every `recovery_retry_seconds` the writer thread reloads the tail and
tries to write an `audit.outage` record (started, ended, refused_requests, error); once that is durable the log
accepts appends again. `refusal()` is the server's per-request check, and counts the requests it refuses.
Events: `api.request`, `auth.failure`, `api.rate_limited`, `server.start` (config_digest, models), `server.stop`,
`bundle.install`, `bundle.activate`, `bundle.rollback`, `bundle.refused`, `trust.add`, `trust.remove`,
`egress.blocked`; the log itself writes `audit.torn_tail`, `audit.retention`, `audit.outage`, and the export
command `audit.export`. Fields are any JSON; the field `content` (prompt/completion text) is dropped unless
`policy.log_content` is true, and while it is, every record carries `"content_logged": true`.

Group commit and what a power cut can lose: one writer thread takes every queued record as one group, writes it
with one `write()` and makes it durable with one `fsync()`; `append` returns after that fsync. The writer does not
linger for a group to fill (an idle writer writes at once, which is the lowest latency; groups form from what
arrives during the previous fsync), so `group_commit_ms` is an upper bound that is always met, not a delay.
At most `policy.group_commit_records` records are unsynced at any moment (an append waits for room), so a power cut
loses at most that many records, every one of them unacknowledged: no `append` that returned is ever lost, provided
the disk honours fsync. A half-written group is set aside at the next open.

Checkpoints are signed every `checkpoint_every_records` records or `checkpoint_every_seconds`, at each segment
rotation (the anchor retention relies on) and at close. Several processes may write one log at once (`tail.py`).
Retention runs at open and after each rotation; pass the policy in force, since it deletes by
`retention_days` (or `retention=False` from a command that only reads or adds a record).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sealbox.runtime.audit.checkpoint import Checkpoint
from sealbox.runtime.audit.errors import AuditUnavailableError
from sealbox.runtime.audit.record import CONTENT_FIELD, canonical, check_event_name, encode_fields, format_time
from sealbox.runtime.audit.retention import apply_retention
from sealbox.runtime.audit.segment import SEGMENT_MAX_BYTES, SEGMENT_MAX_RECORDS
from sealbox.runtime.audit.tail import ChainTail, PendingRecord
from sealbox.runtime.audit.verify import TailBound
from sealbox.runtime.policy import AuditPolicy, Policy

__all__ = ["AuditLog", "AuditUnavailableError"]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False, slots=True)
class _Waiter:
    record: PendingRecord
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[int] | None = None
    seq: int | None = None
    error: AuditUnavailableError | None = None


class AuditLog:
    """An open audit log: a writer thread over the chain's tail. Open with `AuditLog.open`."""

    def __init__(self, tail: ChainTail, policy: AuditPolicy, *, retention: bool) -> None:
        self._tail = tail
        self._policy = policy
        self._retention = retention
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer thread waits here for async records or timers
        self._done = threading.Condition(self._lock)  # callers wait here for their group, the lead, or room
        self._queue: list[_Waiter] = []
        self._unsynced = 0  # queued + being written: never above group_commit_records
        self._failure: AuditUnavailableError | None = None
        self._outage_started: str | None = None  # when the current failure began
        self._refused = 0  # requests and appends refused since then
        self._leading = False  # a thread is writing a group now
        self._writer_idle = False  # the writer thread sleeps with no timer set
        self._closing = False
        self._closed = False
        self._checkpoint_mark = (tail.checkpointed, time.monotonic())
        self._writer = threading.Thread(target=self._run, name=f"audit-writer:{tail.directory}", daemon=True)

    @classmethod
    def open(
        cls,
        directory: Path,
        policy: AuditPolicy | Policy,
        *,
        clock: Callable[[], datetime] = utc_now,
        segment_max_bytes: int = SEGMENT_MAX_BYTES,
        segment_max_records: int = SEGMENT_MAX_RECORDS,
        retention: bool = True,
    ) -> "AuditLog":
        """Open (creating if missing) the log in `directory`; recover a torn tail and record it; apply retention.

        `clock` stamps records (tests of retention move it); `retention=False` leaves segment removal to the
        process that holds the policy in force.

        Raises:
            AuditUnavailableError: the directory, key or segments cannot be opened, or recovery found damage.
        """
        if isinstance(policy, Policy):  # accept the whole policy too: only its [audit] section matters here
            policy = policy.audit
        tail = ChainTail.open(
            directory,
            clock=clock,
            segment_max_bytes=segment_max_bytes,
            segment_max_records=segment_max_records,
            bound=TailBound(policy.max_unsigned_records, policy.max_unsigned_seconds),
        )
        try:
            tail.write([])  # records a torn tail found at open now, not with the first append
            if retention:
                apply_retention(tail, days=policy.retention_days)
            tail.rotated = False
        except BaseException:
            tail.close()
            raise
        log = cls(tail, policy, retention=retention)
        log._writer.start()
        return log

    # -- appending -----------------------------------------------------------------------------------------------

    def append(self, event: str, **fields: Any) -> int:
        """Record an event; returns its sequence number once it is durable.

        Raises:
            AuditUnavailableError: the log cannot write (disk full, I/O error) or is closed: fail closed.
            AuditFieldError: the event name or a field cannot be recorded (a caller's bug; nothing is written).
        """
        waiter = _Waiter(self._prepare(event, fields))
        with self._lock:
            self._admit(waiter)
            while waiter.seq is None and waiter.error is None:
                if self._leading:
                    self._done.wait()
                else:
                    self._lead()
        if waiter.error is not None:
            raise waiter.error
        return waiter.seq  # type: ignore[return-value]

    async def append_async(self, event: str, **fields: Any) -> int:
        """`append` for the event loop: queues at once and awaits the group's fsync without blocking the loop.

        Raises the same errors as `append`.
        """
        record = self._prepare(event, fields)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(record, loop, loop.create_future())
        with self._lock:
            self._refuse_if_unavailable()
            room = self._unsynced < self._policy.group_commit_records
            if room:
                self._enqueue(waiter)
                self._work.notify()  # the writer thread leads groups for the event loop
        if not room:  # rare: the disk is behind; wait for room on a worker thread, not on the loop
            return await asyncio.to_thread(self.append, event, **fields)
        return await waiter.future  # type: ignore[misc]

    def _prepare(self, event: str, fields: dict[str, Any]) -> PendingRecord:
        if not self._policy.log_content:
            fields.pop(CONTENT_FIELD, None)  # data minimisation: the text never reaches the disk
        return PendingRecord(check_event_name(event), encode_fields(fields), self._policy.log_content)

    def _refuse_if_unavailable(self) -> None:
        if self._failure is not None:
            self._refused += 1
            raise AuditUnavailableError(
                f"{self._failure} (earlier failure; the log retries every {self._policy.recovery_retry_seconds:g} s)"
            )
        if self._closing:
            raise AuditUnavailableError(f"audit log {self._tail.directory} is closed")

    def _admit(self, waiter: _Waiter) -> None:
        # The cap on unsynced records is the documented bound on what a power cut can lose.
        while True:
            self._refuse_if_unavailable()
            if self._unsynced < self._policy.group_commit_records:
                break
            self._done.wait()
        self._enqueue(waiter)

    def _enqueue(self, waiter: _Waiter) -> None:
        self._queue.append(waiter)
        self._unsynced += 1

    # -- group commit --------------------------------------------------------------------------------------------

    def _lead(self) -> None:
        """Write everything queued as one group. Called with the lock held and no other leader; releases the lock
        for the write and fsync, so the next group queues meanwhile (that is what makes groups).

        Leader/follower: a blocked caller writes its group itself (no hand-off to another thread for a lone
        writer); whoever is waiting when it finishes leads the next group. The writer thread leads for async
        callers and does the periodic work (timed checkpoints, retention), which never delays a caller.
        """
        self._leading = True
        batch, self._queue = self._queue, []
        error: AuditUnavailableError | None = None
        seqs: list[int] = []
        self._lock.release()
        signing_error: AuditUnavailableError | None = None
        try:
            seqs = self._tail.write([waiter.record for waiter in batch])
            # Every N records, signed by the leader before it lets go: checkpoints fall on exact multiples.
            if self._tail.head.seq - self._tail.checkpointed >= self._policy.checkpoint_every_records:
                try:
                    self._tail.checkpoint()
                except AuditUnavailableError as exc:
                    signing_error = exc  # the group itself is durable: acknowledge it, then fail closed
        except AuditUnavailableError as exc:
            error = exc
        except BaseException as exc:  # a bug must fail the log closed, not leave followers waiting forever
            error = AuditUnavailableError(f"audit log {self._tail.directory}: writer failed: {exc!r}")
        finally:
            self._lock.acquire()
            self._leading = False
        if error is not None:
            self._fail_locked(error, batch)
            return
        for waiter, seq in zip(batch, seqs, strict=True):
            waiter.seq = seq
            if waiter.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                    waiter.loop.call_soon_threadsafe(_resolve, waiter)
        self._unsynced -= len(batch)
        self._done.notify_all()
        if signing_error is not None:
            self._fail_locked(signing_error, [])
        else:
            # Wake the writer thread for async records, periodic work, or to set its timer: it may sleep without one
            # while the head is signed, and now it is not.
            unsigned = self._tail.head.seq > self._tail.checkpointed
            if self._queue or self._maintenance_due() or (self._writer_idle and unsigned):
                self._work.notify()

    def _fail_locked(self, error: AuditUnavailableError, batch: list[_Waiter]) -> None:
        if self._failure is None:
            self._outage_started = format_time(self._tail.clock())
        self._failure = error
        self._refused += len(batch) + len(self._queue)
        failed, self._queue = batch + self._queue, []
        for waiter in failed:
            waiter.error = error
            if waiter.loop is not None:
                with contextlib.suppress(RuntimeError):
                    waiter.loop.call_soon_threadsafe(_resolve, waiter)
        self._unsynced = 0
        self._done.notify_all()
        self._work.notify()

    # -- the writer thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with self._lock:
            while True:
                if self._queue and not self._leading and self._failure is None:
                    self._lead()
                    continue
                if self._closing and not self._queue and not self._leading:
                    return
                if self._failure is not None:
                    self._work.wait(self._policy.recovery_retry_seconds)
                    if self._failure is not None and not self._closing and not self._leading:
                        self._recover_locked()
                    continue
                if self._maintenance_due() and not self._leading:
                    self._lock.release()
                    try:
                        self._maintain()
                    except AuditUnavailableError as exc:
                        error: AuditUnavailableError | None = exc
                    else:
                        error = None
                    finally:
                        self._lock.acquire()
                    if error is not None:
                        self._fail_locked(error, [])
                    continue
                # While a caller leads, it wakes this thread when it is done; else sleep until a timed checkpoint.
                timeout = None if self._leading else self._checkpoint_due_in()
                self._writer_idle = timeout is None
                self._work.wait(timeout)
                self._writer_idle = False

    def _recover_locked(self) -> None:
        """Try to end the outage: reload the tail (setting aside what a failed write left) and make an `audit.outage`
        record durable. Holds the log's lock throughout, so no request is refused uncounted between the record and
        the reopening; a failed try costs one refused write, and the log stays closed."""
        failure = self._failure
        fields = {
            "started": self._outage_started,
            "ended": format_time(self._tail.clock()),
            "refused_requests": self._refused,
            "error": str(failure),
        }
        record = PendingRecord(canonical("audit.outage"), canonical(fields), False)
        try:
            with self._tail.locked():
                self._tail.reload()
                self._tail.write([record])
        except AuditUnavailableError as exc:
            self._failure = exc
            return
        except BaseException as exc:  # a bug keeps the log closed rather than kill the thread that would retry
            self._failure = AuditUnavailableError(f"audit log {self._tail.directory}: recovery failed: {exc!r}")
            return
        self._failure, self._outage_started, self._refused = None, None, 0
        self._done.notify_all()

    def _checkpoint_due_in(self) -> float | None:
        """Seconds until a checkpoint falls due by time (<= 0: due now); None while the head is signed."""
        tail = self._tail
        if tail.checkpointed != self._checkpoint_mark[0]:  # signed meanwhile (rotation, close, another process)
            self._checkpoint_mark = (tail.checkpointed, time.monotonic())
        if tail.head.seq <= tail.checkpointed:
            return None
        return self._checkpoint_mark[1] + self._policy.checkpoint_every_seconds - time.monotonic()

    def _maintenance_due(self) -> bool:
        tail = self._tail
        if tail.rotated or tail.head.seq - tail.checkpointed >= self._policy.checkpoint_every_records:
            return True
        due_in = self._checkpoint_due_in()
        return due_in is not None and due_in <= 0

    def _maintain(self) -> None:
        tail = self._tail
        due_in = self._checkpoint_due_in()
        if due_in is not None and (
            due_in <= 0 or tail.head.seq - tail.checkpointed >= self._policy.checkpoint_every_records
        ):
            tail.checkpoint()
        if tail.rotated:
            tail.rotated = False
            if self._retention:
                apply_retention(tail, days=self._policy.retention_days)

    # -- the rest ------------------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._tail.directory

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest durable record this process knows of."""
        return self._tail.head.seq, self._tail.head.hash

    @property
    def public_key_pem(self) -> str:
        return self._tail.key.public_pem()

    @property
    def failure(self) -> AuditUnavailableError | None:
        """Why the log refuses appends, or None while it accepts them (the server's health check reads this)."""
        return self._failure

    def refusal(self) -> AuditUnavailableError | None:
        """Why a request must be refused now (fail closed), or None; each refusal is counted for the outage record."""
        if self._failure is None:
            return None
        with self._lock:
            failure = self._failure
            if failure is not None:
                self._refused += 1
            return failure

    def sign_statement(self, statement: dict[str, Any]) -> str:
        """Sign an export statement with the host audit key (see `runtime.audit.export`)."""
        return self._tail.key.sign_statement(statement)

    def checkpoint(self) -> Checkpoint | None:
        """Sign the head now (for an export that must be covered). Returns the checkpoint, or None if already signed.

        Raises:
            AuditUnavailableError: the log has failed or the checkpoint cannot be written.
        """
        with self._lock:
            self._refuse_if_unavailable()
            while self._unsynced:
                self._done.wait()
        return self._tail.checkpoint()

    def close(self) -> None:
        """Write what is queued, sign a final checkpoint, release the files. Idempotent.

        Raises:
            AuditUnavailableError: the final checkpoint cannot be written (the records themselves are durable).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = self._closing = True
            self._work.notify()
        self._writer.join()
        with self._lock:  # a caller admitted before the close may still be leading its own group
            while self._leading or self._queue:
                if self._leading:
                    self._done.wait()
                else:
                    self._lead()
        try:
            if self._failure is None:
                self._tail.checkpoint()
        finally:
            self._tail.close()

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve(waiter: _Waiter) -> None:
    future = waiter.future
    if future is None or future.done():
        return
    if waiter.error is not None:
        future.set_exception(waiter.error)
    else:
        future.set_result(waiter.seq)  # type: ignore[arg-type]
