"""The supervised vLLM child, seen by the front as one more engine host.

The gateway's routing, failover and audit work from an engine's status (models, free sequences, queue). vLLM has no
such endpoint, so the status is read from what vLLM does answer (`/v1/models`, with the child's key) and completed
with what sealbox knows: the sequences the policy gave vLLM (`--max-num-seqs`), less the requests the front has in
flight on it; and the model's digest, from the release's signed manifest. A child that exits is out of rotation at
once; its next readiness puts it back.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import httpcore

from sealbox.runtime.gateway.engine_hosts import (
    UPSTREAM_ERRORS,
    EngineHost,
    EngineHostError,
    EngineHosts,
    EngineStatus,
    ModelStatus,
)
from sealbox.runtime.vllm.supervisor import ChildExit, RayHeadChild, VllmChild

log = logging.getLogger("sealbox.vllm")

MODELS_PATH = "/v1/models"
ENGINE_NAME = "vllm"
RAY_READY_TIMEOUT_S = 60.0
"""How long a vLLM start waits for the head's Ray; past it vLLM starts anyway, fails, and is retried."""


class VllmEngineHost(EngineHost):
    """An EngineHost whose status is derived from the child's `/v1/models` and the policy's capacity."""

    def __init__(self, *, url: str, api_key: str, pool: httpcore.AsyncConnectionPool, sequences: int,
                 model_sha256: str) -> None:  # fmt: skip
        super().__init__(name=ENGINE_NAME, url=url, fingerprint="", api_key=api_key, pool=pool)
        self.sequences = sequences
        self.model_sha256 = model_sha256
        self.child: VllmChild | None = None

    async def poll(self, timeout_s: float) -> None:
        timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        try:
            async with self.pool.stream("GET", self.url + MODELS_PATH, headers=self.headers(),
                                        extensions={"timeout": timeouts}) as response:  # fmt: skip
                body = await response.aread()
            if response.status != 200:
                raise EngineHostError(f"{MODELS_PATH} answered {response.status}: "
                                      f"{body[:200].decode('utf-8', 'replace')}")  # fmt: skip
            names = [str(item["id"]) for item in json.loads(body)["data"]]
        except (*UPSTREAM_ERRORS, EngineHostError, ValueError, KeyError, TypeError) as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        in_flight = dict(self.in_flight)
        models = {name: ModelStatus(id=name, sha256=self.model_sha256, sequences_total=self.sequences,
                                    free_sequences=self.sequences - in_flight.get(name, 0), queued=0,
                                    kv_cells_total=0, kv_cells_free=0) for name in names}  # fmt: skip
        self.status = EngineStatus(models=models, queue_size=0)
        self.in_flight_at_status = in_flight
        self.healthy, self.problem = True, None

    def child_exited(self, exit_: ChildExit) -> None:
        self.fail(f"the vLLM child {exit_.pid} exited with {exit_.returncode}; "
                  f"starting it again in {exit_.restart_in_s:.1f} s")  # fmt: skip

    def describe(self) -> dict[str, Any]:
        child = self.child
        extra = {"kind": "vllm", "pid": child.pid if child else None, "restarts": child.restarts if child else 0}
        return {**super().describe(), **extra}


class SupervisedEngines(EngineHosts):
    """The front's one engine host, the vLLM child: started before the first poll, stopped after the last.

    On a cluster's head node the Ray head is a second child: started before vLLM (each vLLM start waits, bounded, for
    its port), stopped after it; when it dies it is started again and vLLM, which lost its cluster, after it.
    """

    def __init__(self, host: VllmEngineHost, child: VllmChild, *, interval_s: float, timeout_s: float,
                 ray_head: RayHeadChild | None = None, ray_ready_timeout_s: float = RAY_READY_TIMEOUT_S) -> None:  # fmt: skip
        super().__init__(hosts=[host], interval_s=interval_s, timeout_s=timeout_s)
        self.child = child
        self.ray_head = ray_head
        self.ray_ready_timeout_s = ray_ready_timeout_s
        host.child = child
        child.on_ready = lambda pid: self.poll_soon()
        child.on_exit = host.child_exited
        if ray_head is not None:
            child.before_start = self._await_ray_head
            ray_head.on_exit = lambda exit_: child.interrupt()

    async def _await_ray_head(self) -> None:
        assert self.ray_head is not None
        if not await self.ray_head.wait_ready(self.ray_ready_timeout_s):
            log.error("the Ray head is not listening after %.0f s; starting vLLM without it",
                      self.ray_ready_timeout_s)  # fmt: skip

    async def start(self) -> None:
        if self.ray_head is not None:
            await self.ray_head.start()
        await self.child.start()
        await super().start()

    async def stop(self) -> None:
        try:
            await self.child.stop()
            if self.ray_head is not None:
                await self.ray_head.stop()
        finally:
            await super().stop()
