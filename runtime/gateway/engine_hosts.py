"""The engine hosts a gateway fronts: their addresses, pinned certificates, what they last reported, and whether
they are in rotation.

An engine is in rotation only while its authenticated status endpoint answers; a failed request takes it out at
once, and the next good status poll puts it back. The gateway routes by what the engines report (free sequences,
free KV cells, queue depth), corrected by the requests it has sent or finished since that report.

Each engine has one pool of kept-alive mutual-TLS connections (httpcore, the transport under httpx, over asyncio's
own TLS streams: `engine_network`). The gateway forwards bytes and needs none of httpx's request and response
models, whose per-request and per-chunk work cost more CPU than the forwarding itself. Idle connections are dropped
before the engine's own keep-alive timeout would close them under a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore

from sealbox.runtime.background_task import cancel_and_wait
from sealbox.runtime.gateway.engine_network import EngineNetwork
from sealbox.runtime.policy import EngineHostPolicy, GatewayPolicy

log = logging.getLogger("sealbox.gateway")

STATUS_PATH = "/v1/engine/status"
MAX_CONNECTIONS_PER_ENGINE = 512
MAX_IDLE_CONNECTIONS_PER_ENGINE = 64
KEEPALIVE_EXPIRY_S = 3.0
"""Below uvicorn's (and so the engine's and vLLM's) 5 s keep-alive timeout: the gateway lets an idle connection go
before the engine does, rather than send a request on a connection the engine is closing."""

UPSTREAM_ERRORS: tuple[type[Exception], ...] = (
    httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
    httpcore.ConnectionNotAvailable, OSError,
)  # fmt: skip
"""What a request to an engine can raise when the engine, or the link to it, fails."""


class EngineHostError(Exception):
    """An engine host cannot be used: unreachable, refused, an unexpected certificate, or a status it cannot parse."""


class FingerprintMismatch(EngineHostError):
    """The engine presented a certificate other than the one the policy pins."""


@dataclass(frozen=True)
class ModelStatus:
    id: str
    sha256: str
    sequences_total: int
    free_sequences: int
    queued: int
    kv_cells_total: int
    kv_cells_free: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelStatus:
        return cls(id=str(data["id"]), sha256=str(data["sha256"]), sequences_total=int(data["sequences_total"]),
                   free_sequences=int(data["free_sequences"]), queued=int(data["queued"]),
                   kv_cells_total=int(data["kv_cells_total"]), kv_cells_free=int(data["kv_cells_free"]))  # fmt: skip


@dataclass(frozen=True)
class EngineStatus:
    models: dict[str, ModelStatus]
    queue_size: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineStatus:
        try:
            models = {m.id: m for m in (ModelStatus.from_dict(item) for item in data["models"])}
            return cls(models=models, queue_size=int(data["queue_size"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineHostError(f"the engine's status is not readable: {exc!r}") from exc


@dataclass(eq=False)
class EngineHost:
    """One engine host: its connection pool (mutual TLS), its last status, and the gateway's live count of its
    requests."""

    name: str
    url: str
    fingerprint: str
    api_key: str
    pool: httpcore.AsyncConnectionPool
    healthy: bool = False
    problem: str | None = "not polled yet"
    status: EngineStatus | None = None
    in_flight: dict[str, int] = field(default_factory=dict)
    """Requests the gateway has open on this engine, per model."""
    in_flight_at_status: dict[str, int] = field(default_factory=dict)
    served: int = 0
    connect_timeout_s: float = 3.0
    """Connecting, sending a request, and waiting for a pooled connection; reading an answer has no limit (a long
    generation is not a failure)."""
    _forwarding: list[tuple[bytes, bytes]] = field(init=False, repr=False)
    _pinned_streams: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet, repr=False)
    """Connections whose peer certificate matched the pin (a TLS connection's peer cannot change: renegotiation
    is refused by `engine_ssl_context`)."""

    def __post_init__(self) -> None:
        self._forwarding = [(b"host", urlsplit(self.url).netloc.encode()),
                            *((k.encode(), v.encode()) for k, v in self.headers().items())]  # fmt: skip

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def forwarding_headers(self) -> list[tuple[bytes, bytes]]:
        """`headers()` with the Host, encoded once: what every forwarded request to this engine starts with."""
        return list(self._forwarding)

    def timeouts(self) -> dict[str, float | None]:
        limit = self.connect_timeout_s
        return {"connect": limit, "read": None, "write": limit, "pool": limit}

    def model(self, name: str) -> ModelStatus | None:
        return self.status.models.get(name) if self.status is not None else None

    def free_sequences(self, model: str) -> int:
        """Free sequences as reported, less the requests sent since the report (plus those finished since)."""
        status = self.model(model)
        if status is None:
            return 0
        delta = self.in_flight.get(model, 0) - self.in_flight_at_status.get(model, 0)
        return status.free_sequences - delta

    def queue_room(self, model: str) -> int:
        status = self.model(model)
        if status is None or self.status is None:
            return 0
        overflow = max(0, -self.free_sequences(model))
        return self.status.queue_size - status.queued - overflow

    def begin(self, model: str) -> None:
        self.in_flight[model] = self.in_flight.get(model, 0) + 1

    def end(self, model: str) -> None:
        self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)

    def fail(self, reason: str) -> None:
        """Out of rotation until a status poll succeeds."""
        if self.healthy:
            log.warning("engine %s out of rotation: %s", self.name, reason)
        self.healthy, self.problem = False, reason

    def check_certificate(self, response: httpcore.Response) -> None:
        """Raises FingerprintMismatch unless the connection's peer certificate is the pinned one (when pinned)."""
        if not self.fingerprint:
            return
        stream = response.extensions.get("network_stream")
        if stream is not None and stream in self._pinned_streams:
            return
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            raise FingerprintMismatch(f"{self.name}: no peer certificate to check against the pinned fingerprint")
        seen = "sha256:" + hashlib.sha256(der).hexdigest()
        if seen != self.fingerprint:
            raise FingerprintMismatch(f"{self.name}: the engine presented certificate {seen}, "
                                      f"the policy pins {self.fingerprint}")  # fmt: skip
        self._pinned_streams.add(stream)

    async def poll(self, timeout_s: float) -> None:
        """Read the status; in rotation if it answers, out of rotation with the reason if not."""
        timeouts = {"connect": timeout_s, "read": timeout_s, "write": timeout_s, "pool": timeout_s}
        try:
            async with self.pool.stream("GET", self.url + STATUS_PATH, headers=self.headers(),
                                        extensions={"timeout": timeouts}) as response:  # fmt: skip
                self.check_certificate(response)  # before a byte of the answer is read
                body = await response.aread()
            if response.status != 200:
                raise EngineHostError(f"status answered {response.status}: {body[:200].decode('utf-8', 'replace')}")
            status = EngineStatus.from_dict(json.loads(body))
        except (*UPSTREAM_ERRORS, EngineHostError, ValueError) as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
            return
        self.status = status
        self.in_flight_at_status = dict(self.in_flight)
        if not self.healthy:
            log.info("engine %s in rotation: %s", self.name, ", ".join(status.models) or "no models")
        self.healthy, self.problem = True, None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "healthy": self.healthy, "problem": self.problem,
                "in_flight": sum(self.in_flight.values()), "served": self.served,
                "models": {name: m.sha256 for name, m in (self.status.models.items() if self.status else [])}}  # fmt: skip


def engine_ssl_context(policy: GatewayPolicy) -> ssl.SSLContext:
    """Verify engines against `engine_ca` (hostname included) and present the gateway's client certificate."""
    context = ssl.create_default_context(cafile=policy.engine_ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # a connection's pinned peer stays the peer it was checked as
    if policy.client_cert:
        context.load_cert_chain(policy.client_cert, policy.client_key)
    return context


def read_api_key(path: str) -> str:
    """The engine key file: a regular file (no FIFO or symlink games), one line."""
    if not path:
        return ""
    import os
    import stat

    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise EngineHostError(f"{path}: cannot open the engine's API key file: {exc.strerror}") from exc
    with os.fdopen(descriptor, "rb") as stream:
        if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
            raise EngineHostError(f"{path}: the engine's API key file is not a regular file")
        key = stream.read(4096).decode("utf-8", "replace").strip()
    if not key or not key.isprintable():
        raise EngineHostError(f"{path}: the engine's API key file holds no key")
    return key


@dataclass
class EngineHosts:
    """All engine hosts of one gateway, and the task that polls them."""

    hosts: list[EngineHost]
    interval_s: float
    timeout_s: float
    _task: asyncio.Task[None] | None = None
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_policy(cls, policy: GatewayPolicy) -> EngineHosts:
        context = engine_ssl_context(policy)
        hosts = []
        for engine in policy.engines:
            hosts.append(_host(engine, context, policy.connect_timeout_s))
        return cls(hosts=hosts, interval_s=policy.health_interval_s, timeout_s=policy.connect_timeout_s)

    def get(self, name: str) -> EngineHost | None:
        return next((host for host in self.hosts if host.name == name), None)

    @property
    def healthy(self) -> list[EngineHost]:
        return [host for host in self.hosts if host.healthy]

    async def poll_all(self) -> None:
        await asyncio.gather(*(host.poll(self.timeout_s) for host in self.hosts))

    async def start(self) -> None:
        await self.poll_all()
        self._task = asyncio.create_task(self._run(), name="sealbox-engine-health")

    def poll_soon(self) -> None:
        """A request just failed: poll now rather than at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.poll_all()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        for host in self.hosts:
            await host.pool.aclose()


def engine_pool(context: ssl.SSLContext | None, max_connections: int = MAX_CONNECTIONS_PER_ENGINE) -> httpcore.AsyncConnectionPool:
    """The connection pool the gateway keeps to one engine (`context` None: plain HTTP, for a child on loopback)."""
    return httpcore.AsyncConnectionPool(ssl_context=context, max_connections=max_connections,
                                        max_keepalive_connections=min(max_connections, MAX_IDLE_CONNECTIONS_PER_ENGINE),
                                        keepalive_expiry=KEEPALIVE_EXPIRY_S, retries=0,
                                        network_backend=EngineNetwork())  # fmt: skip


def _host(engine: EngineHostPolicy, context: ssl.SSLContext, connect_timeout_s: float) -> EngineHost:
    pool = engine_pool(context)
    return EngineHost(name=engine.name, url=engine.url, fingerprint=engine.fingerprint,
                      api_key=read_api_key(engine.api_key_file), pool=pool,
                      connect_timeout_s=connect_timeout_s)  # fmt: skip


def certificate_fingerprint(path: Path) -> str:
    """`sha256:<hex>` of a PEM certificate's DER bytes: the value `[[gateway.engines]] fingerprint` pins."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return "sha256:" + hashlib.sha256(certificate.public_bytes(Encoding.DER)).hexdigest()
