"""Starting `sealbox serve`: prepare everything that can refuse, then run.

Order matters and is the point: the offline variables and the egress guard go in before the web stack or llama.cpp
is imported, so nothing they load can reach the network; then `strict` runs the doctor; then keys, audit log,
models; only then does the socket open. `prepare` raises `ServeRefused` (with its exit code) for anything that
stops the start; the command line only translates options and refusals.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sealbox.runtime.egress.guard import EgressGuard, audit_log_reporter, guard_status_path, install_egress_guard
from sealbox.runtime.egress.offline_env import RemoteReferenceError, apply_offline_environment, require_local_reference
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy, PolicyError, is_loopback_host
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.server.model_registry import ActiveRelease, ModelSource, ReleaseError

if TYPE_CHECKING:
    from sealbox.runtime.api_keys import Authenticator
    from sealbox.runtime.audit.log import AuditLog
    from sealbox.runtime.server.model_registry import ModelRegistry



class ServeRefused(Exception):
    """The server will not start; the message says why, `exit_code` is the command's exit status."""

    def __init__(self, message: str, exit_code: int = ExitCode.REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class ServeOptions:
    """What the operator asked for; None means "the policy's value"."""

    root: Path | None = None
    models: tuple[str, ...] = ()
    policy_file: Path | None = None
    host: str | None = None
    port: int | None = None
    no_auth: bool = False
    strict: bool = False
    threads: int | None = None
    no_audit: bool = False


@dataclass
class PreparedServer:
    """Everything checked and opened; `run` serves until a signal, then closes what `prepare` opened."""

    appliance: HostRoot
    policy: Policy
    guard: EgressGuard
    host: str
    port: int
    sources: list[ModelSource]
    release_label: str | None
    authenticator: Authenticator | None
    audit: AuditLog | None
    threads: int | None
    report: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))

    def run(self) -> None:
        from sealbox.runtime.server.app import ServerConfig, create_app
        from sealbox.runtime.server.connection import BoundedConnection

        config = ServerConfig(policy=self.policy, sources=self.sources, authenticator=self.authenticator,
                              audit=self.audit, threads=self.threads, on_started=self._started,
                              on_stopping=self._stopping, listen=(self.host, self.port),
                              calibration_dir=self.appliance.calibration)  # fmt: skip
        limits = self.policy.server
        serve_until_stopped(
            self.host,
            self.port,
            lambda: create_app(config),
            release=self._release_state,  # also when start-up failed before the lifespan's `stopping` could run
            http=BoundedConnection.configured(header_timeout_s=limits.header_timeout_seconds,
                                              max_connections=limits.max_connections),
            ssl_certfile=limits.tls_cert or None,
            ssl_keyfile=limits.tls_key or None,
            **mutual_tls(limits.tls_client_ca),
            timeout_keep_alive=limits.keep_alive_timeout_seconds,
        )

    def _started(self, registry: ModelRegistry) -> None:
        self.guard.status().write(guard_status_path(self.appliance))
        for failed in registry.failed:
            self.report(f"model {failed.name} is not served: {failed.problem}")
        if self.audit is not None:
            self.audit.append(
                "server.start", pid=os.getpid(), config_digest=self.policy.digest(), release=self.release_label,
                listen=f"{self.host}:{self.port}", auth=self.authenticator is not None,
                transport="https" if self.policy.server.tls else "http",
                plain_http_beyond_loopback=self.plain_http_beyond_loopback,
                models=[{"name": m.name, "sha256": m.sha256 or None, "ready": m.ready, "problem": m.problem}
                        for m in registry.models.values()],
            )  # fmt: skip
        if self.plain_http_beyond_loopback:
            self.report(f"WARNING: plain HTTP on {self.host}, beyond loopback (allow_plain_http): API keys and prompts "
                        "cross the network in clear text")  # fmt: skip
        ready = ", ".join(m.name for m in registry.ready) or "none"
        scheme = "https" if self.policy.server.tls_cert else "http"
        self.report(f"sealbox serving {ready} on {scheme}://{self.host}:{self.port}/v1")

    @property
    def plain_http_beyond_loopback(self) -> bool:
        """The policy accepted clear-text HTTP on a network address (`allow_plain_http`): recorded and reported."""
        return not is_loopback_host(self.host) and not self.policy.server.tls

    def _release_state(self) -> None:
        """Withdraw the guard report doctor reads and close the log (a final signed checkpoint). Idempotent."""
        guard_status_path(self.appliance).unlink(missing_ok=True)
        if self.audit is not None:
            self.audit.close()

    def _stopping(self) -> None:
        record_stop(self.audit, "server.stop")
        self._release_state()


def prepare(options: ServeOptions) -> PreparedServer:
    """Check and open everything the server needs, in the order the module docstring gives.

    Raises:
        ServeRefused: the policy, the release, the doctor (`strict`), the keys, the models or the audit log say no.
    """
    apply_offline_environment()
    appliance = HostRoot.resolve(options.root)
    release: ActiveRelease | None = None
    release_error: ReleaseError | None = None
    if not options.models:  # read once: its policy is needed before the guard, its models only later
        try:
            release = ActiveRelease.load(appliance)
        except ReleaseError as exc:
            release_error = exc
    try:
        policy = _policy(options.policy_file, release)
    except PolicyError as exc:
        raise ServeRefused(str(exc), ExitCode.USAGE) from exc
    guard = install_egress_guard(policy.egress)
    if not policy.vllm.model_dir:  # a vLLM engine brings its own CUDA stack; llama.cpp's build is not loaded
        _check_accelerator()
    host = options.host or policy.server.host
    port = options.port or policy.server.port
    if options.no_auth and not is_loopback_host(host):
        raise ServeRefused(f"--no-auth serves anyone who can reach {host}; it is allowed on a loopback address only")
    if not is_loopback_host(host) and not policy.server.tls and not policy.server.allow_plain_http:
        raise ServeRefused(f"{host} is beyond loopback and the policy has no TLS certificate: API keys and prompts "
                           "would cross the network in clear text; set [server] tls_cert and tls_key (or, accepting "
                           "that risk, allow_plain_http = true)")  # fmt: skip
    if options.no_audit and options.strict:
        raise ServeRefused("--no-audit and --strict contradict each other")
    if options.strict:
        _run_doctor(appliance)
    authenticator = None if options.no_auth else authenticator_for(appliance)
    if policy.vllm.model_dir:  # the engine is a supervised vLLM child behind the gateway's front
        from sealbox.runtime.vllm.front import prepare_vllm_front

        return prepare_vllm_front(options, appliance, policy, release, guard=guard, host=host, port=port,  # type: ignore[return-value]
                                  authenticator=authenticator)  # fmt: skip
    if release is not None:
        sources, release_label = list(release.models), release.label
    elif release_error is not None:
        raise ServeRefused(str(release_error))
    else:
        try:
            sources = [_local_source(reference) for reference in options.models]
        except (RemoteReferenceError, ValueError) as exc:
            raise ServeRefused(str(exc)) from exc
        release_label = None
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise ServeRefused(f"two models share a name: {names}")
    if len(sources) == 1:  # one engine: its threads have the host's cores to themselves
        from sealbox.runtime.engine import dedicate_openmp_threads

        spin = dedicate_openmp_threads()
        if spin is not None:
            logging.getLogger(__name__).info("one engine on this host: llama.cpp's threads spin %s times at a barrier",
                                             spin)  # fmt: skip
    audit = None if options.no_audit else open_audit_log(appliance, policy, guard)
    return PreparedServer(appliance=appliance, policy=policy, guard=guard, host=host, port=port, sources=sources,
                          release_label=release_label, authenticator=authenticator, audit=audit,
                          threads=options.threads)  # fmt: skip


def _check_accelerator() -> None:
    """Before llama.cpp is imported (a CUDA-linked engine cannot be, without a driver): can it run here, and where."""
    from sealbox.runtime.engine import AcceleratorError, host_decision

    try:
        decision = host_decision().enforce()
    except AcceleratorError as exc:
        raise ServeRefused(f"the bundle's engine cannot run on this host: {exc}", AcceleratorError.exit_code) from exc
    for note in decision.notes:
        logging.getLogger(__name__).warning("%s", note)


def _run_doctor(appliance: HostRoot) -> None:
    from sealbox.runtime.doctor import DoctorFailedError, run_doctor

    try:
        run_doctor(appliance, strict=True)
    except DoctorFailedError as exc:
        # The summaries count problems; the details name them (which model, which file, which digest).
        details = [f"  {check.title}: {line}" for check in exc.report.failures for line in check.details]
        raise ServeRefused("\n".join([str(exc), *details])) from exc


def authenticator_for(appliance: HostRoot) -> Authenticator:
    from sealbox.runtime.api_keys import ApiKeyError, ApiKeyStore, Authenticator

    authenticator = Authenticator(ApiKeyStore(appliance.api_keys))
    try:
        if not authenticator.active_keys():
            raise ServeRefused(f"no API keys in {appliance.api_keys}: create one with `sealbox keys api create NAME`, "
                               "or use --no-auth on a loopback address")  # fmt: skip
    except ApiKeyError as exc:
        raise ServeRefused(str(exc)) from exc
    return authenticator


def open_audit_log(appliance: HostRoot, policy: Policy, guard: EgressGuard) -> AuditLog:
    """The appliance's audit log, also told every connection the guard blocks.

    Raises:
        ServeRefused: the log cannot be opened (or does not verify).
    """
    from sealbox.runtime.audit.errors import AuditError
    from sealbox.runtime.audit.log import AuditLog

    try:
        audit = AuditLog.open(appliance.audit, policy.audit)
    except AuditError as exc:
        raise ServeRefused(str(exc)) from exc
    guard.set_on_block(audit_log_reporter(audit))
    return audit


def record_stop(audit: AuditLog | None, event: str) -> None:
    """Record an orderly stop; a log that cannot take it any more does not stop the shutdown."""
    if audit is None:
        return
    from sealbox.runtime.audit.errors import AuditError

    try:
        audit.append(event, pid=os.getpid())
    except AuditError:
        pass


def mutual_tls(client_ca: str) -> dict[str, object]:
    """uvicorn's settings that make a client certificate signed by `client_ca` a condition of the handshake."""
    if not client_ca:
        return {}
    import ssl

    return {"ssl_ca_certs": client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}


def listen(host: str, port: int) -> socket.socket:
    """Bind before the models load: a taken port fails at once, and once "serving" is printed, connections queue.

    The socket says it is TCP (`IPPROTO_TCP`, as `getaddrinfo` would give): asyncio turns Nagle off (TCP_NODELAY) only
    on connections from such a listener, and without that a keep-alive client's next answer waits for a delayed ACK
    (about 40 ms) between the headers and the body.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


def serve_until_stopped(host: str, port: int, make_app: Callable[[], object], *, release: Callable[[], None],
                        **uvicorn_options: object) -> None:  # fmt: skip
    """The last start step of `serve` and `gateway`: log to stderr, bind the socket (a refusal when it cannot be had),
    then build the app and serve it until a signal; `release` runs however this ends.

    Raises:
        ServeRefused: the address cannot be bound.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import uvicorn

    try:
        listener = listen_or_refuse(host, port)
        config = uvicorn.Config(make_app(), log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                                **uvicorn_options)  # type: ignore[arg-type]  # fmt: skip
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        release()


def listen_or_refuse(host: str, port: int) -> socket.socket:
    """`listen`, with a socket that cannot be had (port taken, address not ours) as a refusal that names it.

    Raises:
        ServeRefused: the address cannot be bound.
    """
    try:
        return listen(host, port)
    except OSError as exc:
        raise ServeRefused(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _policy(policy_file: Path | None, release: ActiveRelease | None) -> Policy:
    """`--policy`, else the release's policy in force, else the built-in defaults."""
    if policy_file is not None:
        return Policy.load(policy_file)
    if release is not None and release.policy_path.is_file():
        return Policy.load(release.policy_path)
    return Policy.default()


def _local_source(reference: str) -> ModelSource:
    path = require_local_reference(reference).expanduser().absolute()
    if not path.is_file():
        raise ValueError(f"{path}: no such model file")
    return ModelSource(name=path.stem, path=path, sha256=None)
