"""The vLLM child under sealbox: started from the rendered launch, awaited through its `/health`, started again with
backoff when it dies, and stopped with sealbox.

The child gets its own session (its process group holds vLLM's worker processes too), so a stop reaches all of
them: SIGTERM to the group, then SIGKILL after a grace period. If sealbox itself dies without stopping it, the
kernel's parent-death signal (set by the child's bootstrap) ends it; under systemd the unit's cgroup does as well.
Its environment is exactly the launch's (plus PATH and the key), never sealbox's own: no variable of the operator's
shell reaches vLLM by accident.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from sealbox.runtime.background_task import cancel_and_wait
from sealbox.runtime.vllm.bootstrap import PARENT_VARIABLE
from sealbox.runtime.vllm.launch import VllmLaunch

log = logging.getLogger("sealbox.vllm")

API_KEY_VARIABLE = "VLLM_API_KEY"
"""vLLM's own variable for `--api-key`: every `/v1` request to the child must carry it (its /health need not)."""
HEALTH_PATH = "/health"
READY_POLL_S = 0.25
STOP_GRACE_S = 20.0
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ")


@dataclass
class Backoff:
    """The wait before the next start: `initial_s`, doubled after each start that never became ready, capped."""

    initial_s: float
    max_s: float
    _next_s: float = 0.0

    def __post_init__(self) -> None:
        self._next_s = self.initial_s

    def after(self, *, was_ready: bool) -> float:
        """The wait before restarting a child that just exited (ready before or not)."""
        if was_ready:
            self._next_s = self.initial_s
        wait = min(self._next_s, self.max_s)
        self._next_s = min(self._next_s * 2, self.max_s)
        return wait


@dataclass(frozen=True)
class ChildExit:
    pid: int
    returncode: int
    was_ready: bool
    restart_in_s: float


@dataclass(eq=False)
class VllmChild:
    """One supervised vLLM API server process, restarted until `stop`."""

    launch: VllmLaunch
    base_url: str
    api_key: str
    backoff: Backoff
    on_ready: Callable[[int], None] = lambda pid: None
    on_exit: Callable[[ChildExit], None] = lambda exit_: None
    stop_grace_s: float = STOP_GRACE_S
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    starts: int = 0
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def environment(self) -> dict[str, str]:
        inherited = {key: os.environ[key] for key in INHERITED if key in os.environ}
        return {**inherited, **self.launch.environment, API_KEY_VARIABLE: self.api_key,
                PARENT_VARIABLE: str(os.getpid())}  # fmt: skip

    async def start(self) -> None:
        """Start the child and the task that keeps it running (returns at once; readiness is reported by `on_ready`).

        Raises:
            OSError: the interpreter cannot be started at all.
        """
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="sealbox-vllm-supervisor")

    async def _spawn(self) -> None:
        self.ready = False
        self.process = await asyncio.create_subprocess_exec(
            *self.launch.argv, env=self.environment(), cwd="/", stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True)  # fmt: skip
        self.starts += 1
        log.info("vLLM child started (pid %d, start %d)", self.process.pid, self.starts)

    async def _supervise(self) -> None:
        while True:
            assert self.process is not None
            process = self.process
            waiter = asyncio.create_task(self._await_ready(process))
            returncode = await process.wait()
            await cancel_and_wait(waiter)
            _kill_group(process.pid, signal.SIGKILL)  # workers it left behind go with it
            if self._stopping:
                return
            exit_ = ChildExit(pid=process.pid, returncode=returncode, was_ready=self.ready,
                              restart_in_s=self.backoff.after(was_ready=self.ready))  # fmt: skip
            self.ready = False
            log.warning("vLLM child %d exited with %d; starting it again in %.1f s", exit_.pid, returncode,
                        exit_.restart_in_s)  # fmt: skip
            self.on_exit(exit_)
            await asyncio.sleep(exit_.restart_in_s)
            try:
                await self._spawn()
            except OSError as exc:
                log.error("vLLM child cannot be started again: %s", exc)
                self.process = None
                return

    async def _await_ready(self, process: asyncio.subprocess.Process) -> None:
        """Ask `/health` until it answers 200 (vLLM answers once its engine is up), then report the child ready."""
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            while process.returncode is None:
                try:
                    response = await client.get(self.base_url + HEALTH_PATH)
                    if response.status_code == 200:
                        self.ready = True
                        log.info("vLLM child %d is ready", process.pid)
                        self.on_ready(process.pid)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(READY_POLL_S)

    async def stop(self) -> None:
        """Stop supervising, then end the child's process group: SIGTERM, and SIGKILL after the grace period."""
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            _kill_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_grace_s
            try:
                await asyncio.wait_for(process.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("vLLM child %d ignored SIGTERM for %.0f s; killing it", process.pid, self.stop_grace_s)
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()
        await cancel_and_wait(self._task)
        if self.process is not None and self.process is not process:  # a restart was under way when stop came
            _kill_group(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if process is not None:
            _kill_group(process.pid, signal.SIGKILL)
            log.info("vLLM child %d stopped (%s)", process.pid, process.returncode)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    """Signal the child's process group (its session leader's pid); a group already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
