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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import httpx

from sealbox.runtime.background_task import cancel_and_wait
from sealbox.runtime.vllm.bootstrap import PARENT_VARIABLE
from sealbox.runtime.vllm.launch import VllmLaunch
from sealbox.runtime.vllm.listening import is_listening

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
class SupervisedChild:
    """One supervised process group, restarted with backoff until `stop`; subclasses say what it runs and when it
    is ready."""

    backoff: Backoff
    on_ready: Callable[[int], None] = lambda pid: None
    on_exit: Callable[[ChildExit], None] = lambda exit_: None
    before_start: Callable[[], Awaitable[None]] | None = None
    """Awaited before every start (the head's vLLM waits here for its Ray head)."""
    stop_grace_s: float = STOP_GRACE_S
    process: asyncio.subprocess.Process | None = None
    ready: bool = False
    starts: int = 0
    label: ClassVar[str] = "child"
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    _ready_event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def argv(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        raise NotImplementedError

    async def probe_ready(self) -> bool:
        """One readiness check of the running child."""
        raise NotImplementedError

    async def start(self) -> None:
        """Start the child and the task that keeps it running (returns at once; readiness is reported by `on_ready`).

        A child with a `before_start` is started by that task, after it: the caller does not wait on it.

        Raises:
            OSError: the program cannot be started at all (without a `before_start`).
        """
        if self.before_start is None:
            await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name=f"sealbox-{self.label}-supervisor")

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the running child to be ready; False when it was not by then."""
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _spawn(self) -> None:
        self._set_ready(False)
        if self.before_start is not None:
            await self.before_start()
        self.process = await asyncio.create_subprocess_exec(
            *self.argv(), env=self.environment(), cwd="/", stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True)  # fmt: skip
        self.starts += 1
        log.info("%s started (pid %d, start %d)", self.label, self.process.pid, self.starts)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    async def _supervise(self) -> None:
        if self.process is None and not await self._respawn():
            return
        while True:
            assert self.process is not None
            process = self.process
            waiter = asyncio.create_task(self._await_ready(process))
            returncode = await process.wait()
            await cancel_and_wait(waiter)
            _kill_group(process.pid, signal.SIGKILL)  # workers it left behind go with it
            if self._stopping:
                return
            was_ready = self.ready
            exit_ = ChildExit(pid=process.pid, returncode=returncode, was_ready=was_ready,
                              restart_in_s=self.backoff.after(was_ready=was_ready))  # fmt: skip
            self._set_ready(False)
            log.warning("%s %d exited with %d; starting it again in %.1f s", self.label, exit_.pid, returncode,
                        exit_.restart_in_s)  # fmt: skip
            self.on_exit(exit_)
            await asyncio.sleep(exit_.restart_in_s)
            if not await self._respawn():
                return

    async def _respawn(self) -> bool:
        try:
            await self._spawn()
        except OSError as exc:
            log.error("%s cannot be started: %s", self.label, exc)
            self.process = None
            return False
        return True

    async def _await_ready(self, process: asyncio.subprocess.Process) -> None:
        while process.returncode is None:
            if await self.probe_ready():
                self._set_ready(True)
                log.info("%s %d is ready", self.label, process.pid)
                self.on_ready(process.pid)
                return
            await asyncio.sleep(READY_POLL_S)

    def interrupt(self) -> None:
        """SIGTERM the running child's group: its supervisor starts it again (with backoff, after `before_start`)."""
        if self.pid is not None:
            _kill_group(self.pid, signal.SIGTERM)

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
                log.warning("%s %d ignored SIGTERM for %.0f s; killing it", self.label, process.pid, self.stop_grace_s)
                _kill_group(process.pid, signal.SIGKILL)
                await process.wait()
        await cancel_and_wait(self._task)
        if self.process is not None and self.process is not process:  # a restart was under way when stop came
            _kill_group(self.process.pid, signal.SIGKILL)
            await self.process.wait()
        if process is not None:
            _kill_group(process.pid, signal.SIGKILL)
            log.info("%s %d stopped (%s)", self.label, process.pid, process.returncode)


def _child_environment(launch: VllmLaunch) -> dict[str, str]:
    """The launch's environment plus PATH and the locale: nothing else of sealbox's own reaches the child."""
    inherited = {key: os.environ[key] for key in INHERITED if key in os.environ}
    return {**inherited, **launch.environment, PARENT_VARIABLE: str(os.getpid())}


@dataclass(eq=False, kw_only=True)
class VllmChild(SupervisedChild):
    """One supervised vLLM API server process, ready once its `/health` answers 200."""

    launch: VllmLaunch
    base_url: str
    api_key: str
    label: ClassVar[str] = "vLLM child"

    def argv(self) -> list[str]:
        return self.launch.argv

    def environment(self) -> dict[str, str]:
        return {**_child_environment(self.launch), API_KEY_VARIABLE: self.api_key}

    async def probe_ready(self) -> bool:
        """vLLM answers `/health` once its engine is up."""
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            try:
                return (await client.get(self.base_url + HEALTH_PATH)).status_code == 200
            except httpx.HTTPError:
                return False


@dataclass(eq=False, kw_only=True)
class RayHeadChild(SupervisedChild):
    """`ray start --head --block` on the cluster's head node (the launch's `ray_argv`, behind the same guard),
    ready once its GCS port listens on `node_ip`."""

    launch: VllmLaunch
    address: str
    port: int
    label: ClassVar[str] = "Ray head"

    def argv(self) -> list[str]:
        assert self.launch.ray_argv is not None
        return self.launch.ray_argv

    def environment(self) -> dict[str, str]:
        return _child_environment(self.launch)

    async def probe_ready(self) -> bool:
        """A listening socket, read from the kernel's tables: a connection would pass sealbox's own egress guard,
        which has no reason to allow Ray's port."""
        return is_listening(self.address, self.port)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    """Signal the child's process group (its session leader's pid); a group already gone is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
