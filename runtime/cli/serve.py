"""`sealbox serve`: the locked-down OpenAI-compatible server over the active release (or `--model` files).

Order matters and is the point: the offline variables and the egress guard go in before the web stack or llama.cpp
is imported, so nothing they load can reach the network; then `--strict` runs the doctor; then keys, audit log,
models; only then does the socket open.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from runtime.egress.guard import audit_log_reporter, guard_status_path, install_egress_guard
from runtime.egress.offline_env import RemoteReferenceError, apply_offline_environment, require_local_reference
from runtime.hostroot import HostRoot
from runtime.policy import Policy, PolicyError
from runtime.server.model_registry import ActiveRelease, ModelSource, ReleaseError

_err = Console(stderr=True)

EXIT_CONFIG = 2
EXIT_REFUSED = 3


def _fail(message: str, code: int = EXIT_REFUSED) -> typer.Exit:
    _err.print(f"[bold red]sealbox serve: refused:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    root: Annotated[Path | None, typer.Option("--root", help="Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root).")] = None,
    model: Annotated[list[str], typer.Option("--model", help="Serve this local GGUF instead of the release's models (development); repeatable.")] = [],
    policy_file: Annotated[Path | None, typer.Option("--policy", help="Policy TOML (default: the release's, else the built-in one).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Listen address (default: the policy's, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Listen port (default: the policy's, 8080).")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without API keys; only on a loopback address.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse to start when `sealbox doctor` finds any failure.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads for llama.cpp (default: all).")] = None,
    no_audit: Annotated[bool, typer.Option("--no-audit", help="Development only: keep no audit log (refused with --strict).")] = False,
) -> None:
    """Serve the active release's models on an OpenAI-compatible API, with auth, admission control and an audit log."""
    apply_offline_environment()
    appliance = HostRoot.resolve(root)
    release: ActiveRelease | None = None
    release_error: ReleaseError | None = None
    if not model:  # read once: its policy is needed before the guard, its models only later
        try:
            release = ActiveRelease.load(appliance)
        except ReleaseError as exc:
            release_error = exc
    try:
        policy = _policy(policy_file, release)
    except PolicyError as exc:
        raise _fail(str(exc), EXIT_CONFIG) from exc
    guard = install_egress_guard(policy.egress)
    bind_host = host or policy.server.host
    bind_port = port or policy.server.port
    if no_auth and not _is_loopback(bind_host):
        raise _fail(f"--no-auth serves anyone who can reach {bind_host}; it is allowed on a loopback address only")
    if no_audit and strict:
        raise _fail("--no-audit and --strict contradict each other")
    if strict:
        from runtime.doctor import DoctorFailedError, run_doctor

        try:
            run_doctor(appliance, strict=True)
        except DoctorFailedError as exc:
            # The summaries count problems; the details name them (which model, which file, which digest).
            details = [f"  {check.title}: {line}" for check in exc.report.failures for line in check.details]
            raise _fail("\n".join([str(exc), *details])) from exc

    from runtime.api_keys import ApiKeyError, ApiKeyStore, Authenticator
    from runtime.audit.errors import AuditError
    from runtime.audit.log import AuditLog

    authenticator = None
    if not no_auth:
        authenticator = Authenticator(ApiKeyStore(appliance.api_keys))
        try:
            if not authenticator.active_keys():
                raise _fail(f"no API keys in {appliance.api_keys}: create one with `sealbox keys api create NAME`, "
                            "or use --no-auth on a loopback address")  # fmt: skip
        except ApiKeyError as exc:
            raise _fail(str(exc)) from exc
    if release is not None:
        sources, release_label = list(release.models), release.label
    elif release_error is not None:
        raise _fail(str(release_error))
    else:
        try:
            sources = [_local_source(reference) for reference in model]
        except (RemoteReferenceError, ValueError) as exc:
            raise _fail(str(exc)) from exc
        release_label = None
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise _fail(f"two models share a name: {names}")
    audit = None
    if not no_audit:
        try:
            audit = AuditLog.open(appliance.audit, policy.audit)
        except AuditError as exc:
            raise _fail(str(exc)) from exc
        guard.set_on_block(audit_log_reporter(audit))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import uvicorn

    from runtime.server.app import ServerConfig, create_app
    from runtime.server.model_registry import ModelRegistry

    def started(registry: ModelRegistry) -> None:
        guard.status().write(guard_status_path(appliance))
        for failed in registry.failed:
            _err.print(f"[bold yellow]model {escape(failed.name)} is not served:[/] {escape(str(failed.problem))}")
        if audit is not None:
            audit.append(
                "server.start", pid=os.getpid(), config_digest=policy.digest(), release=release_label,
                listen=f"{bind_host}:{bind_port}", auth=authenticator is not None,
                models=[{"name": m.name, "sha256": m.sha256 or None, "ready": m.ready, "problem": m.problem}
                        for m in registry.models.values()],
            )  # fmt: skip
        ready = ", ".join(m.name for m in registry.ready) or "none"
        _err.print(f"sealbox serving {escape(ready)} on http{'s' if policy.server.tls_cert else ''}://"
                   f"{escape(bind_host)}:{bind_port}/v1", highlight=False)  # fmt: skip

    def release_state() -> None:
        """Withdraw the guard report doctor reads and close the log (a final signed checkpoint). Idempotent."""
        guard_status_path(appliance).unlink(missing_ok=True)
        if audit is not None:
            audit.close()

    def stopping() -> None:
        if audit is not None:
            try:
                audit.append("server.stop", pid=os.getpid())
            except AuditError:
                pass
        release_state()

    config = ServerConfig(policy=policy, sources=sources, authenticator=authenticator, audit=audit, threads=threads,
                          on_started=started, on_stopping=stopping)  # fmt: skip
    try:
        listener = _listen(bind_host, bind_port)
    except OSError as exc:
        raise _fail(f"cannot listen on {bind_host}:{bind_port}: {exc.strerror}") from exc
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level="warning",
            access_log=False,
            ssl_certfile=policy.server.tls_cert or None,
            ssl_keyfile=policy.server.tls_key or None,
            timeout_graceful_shutdown=10,
        )
    )
    try:
        server.run(sockets=[listener])
    finally:
        release_state()  # also when start-up failed before the lifespan's `stopping` could run


def _listen(host: str, port: int) -> socket.socket:
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
