"""`sealbox serve` for a release whose policy names a vLLM model: the sealbox front over a supervised vLLM child.

Why `serve` and not a command of its own: the release's unit, the doctor and the operator's habits all know one
command, `sealbox serve`; which engine runs behind it is the policy's business (`[vllm] model_dir`). The front is
the gateway's (API keys, per-principal fairness, one audit record per request naming the engine and the model's
digest, 429 when the engine is full), over one engine host: the child, on loopback, reached with a key made for
this run only, so no other local process can use it.

The order is `serve`'s (its `prepare` runs the common steps: offline variables, the egress guard, the listen checks,
the doctor with --strict, the keys), then the audit log, then the socket; the child starts with the app (the
lifespan) and stops with it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import sys
from dataclasses import dataclass
from pathlib import Path


from sealbox.runtime.api_keys import Authenticator
from sealbox.runtime.egress.guard import EgressGuard, guard_status_path
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.gateway.engine_hosts import EngineHosts, engine_pool
from sealbox.runtime.gateway.startup import PreparedGateway
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import Policy
from sealbox.runtime.regular_file import file_kind, sha256_regular
from sealbox.runtime.release import ReleaseFileError, signed_payload
from sealbox.runtime.server.startup import (
    ServeOptions,
    ServeRefused,
    mutual_tls,
    open_audit_log,
    serve_until_stopped,
)
from sealbox.runtime.server.model_registry import ActiveRelease
from sealbox.runtime.vllm.engine_host import SupervisedEngines, VllmEngineHost
from sealbox.runtime.vllm.launch import CACHE_DIR, VllmConfigError, VllmLaunch, render_launch
from sealbox.runtime.vllm.supervisor import Backoff, RayHeadChild, VllmChild

def model_dir_digest(files: dict[str, str]) -> str:
    """One digest for a model directory: sha256 of `<sha256>  <relative path>` lines, sorted by path (sha256sum's
    format, so an auditor can recompute it with coreutils)."""
    lines = "".join(f"{digest}  {path}\n" for path, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def release_model_files(release: Path, model_dir: str) -> dict[str, str]:
    """The model directory's files and digests as the release's signed manifest names them (verified at install,
    re-checked by the doctor), so the start does not re-hash hundreds of GiB.

    Raises:
        ReleaseFileError: the manifest cannot be read.
    """
    prefix = model_dir.strip("/") + "/"
    files = {}
    for blob in signed_payload(release)["blobs"]:
        path = str(blob.get("path", ""))
        if path.startswith(prefix):
            files[path[len(prefix):]] = str(blob.get("sha256", ""))
    return files


def local_model_files(directory: Path) -> dict[str, str]:
    """Digests of a model directory outside a release (development): every regular file, hashed now."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            files[path.relative_to(directory).as_posix()] = sha256_regular(path)[0]
    return files


@dataclass
class PreparedVllmFront(PreparedGateway):
    """The gateway's front, listening where `serve` listens (the `[server]` section: address, TLS, client CA)."""

    guard: EgressGuard | None = None
    appliance: HostRoot | None = None

    def run(self) -> None:
        from sealbox.runtime.gateway.app import GatewayConfig, create_gateway_app
        from sealbox.runtime.server.connection import BoundedConnection

        config = GatewayConfig(policy=self.policy, engines=self.engines, authenticator=self.authenticator,
                               audit=self.audit, on_started=self._started, on_stopping=self._stopping)  # fmt: skip
        limits = self.policy.server
        serve_until_stopped(self.host, self.port, lambda: create_gateway_app(config), release=self._close,
                            http=BoundedConnection.configured(header_timeout_s=limits.header_timeout_seconds,
                                                              max_connections=limits.max_connections),
                            ssl_certfile=limits.tls_cert or None, ssl_keyfile=limits.tls_key or None,
                            **mutual_tls(limits.tls_client_ca),
                            timeout_keep_alive=limits.keep_alive_timeout_seconds)  # fmt: skip

    def _started(self, engines: EngineHosts) -> None:
        if self.guard is not None and self.appliance is not None:
            self.guard.status().write(guard_status_path(self.appliance))
        if self.audit is not None:
            child = engines.hosts[0]
            self.audit.append("server.start", pid=os.getpid(), config_digest=self.policy.digest(), engine="vllm",
                              listen=f"{self.host}:{self.port}", auth=self.authenticator is not None,
                              models=[{"name": self.policy.vllm.served_name or None,
                                       "sha256": getattr(child, "model_sha256", None)}])  # fmt: skip
        scheme = "https" if self.policy.server.tls_cert else "http"
        self.report(f"sealbox serving the vLLM engine (supervised child, starting) on {scheme}://{self.host}:{self.port}/v1")

    def _close(self) -> None:
        if self.appliance is not None:
            guard_status_path(self.appliance).unlink(missing_ok=True)
        super()._close()


def prepare_vllm_front(options: ServeOptions, appliance: HostRoot, policy: Policy, release: ActiveRelease | None, *,
                       guard: EgressGuard, host: str, port: int,
                       authenticator: Authenticator | None) -> PreparedVllmFront:  # fmt: skip
    """What the vLLM front needs beyond `serve`'s common start (guard, listen checks, doctor, keys, done by
    `prepare`): the launch, the model directory's digest, the audit log; the child itself starts with the app.

    Raises:
        ServeRefused: `--model` was given, the launch cannot be rendered, the model directory or the cache directory
            is not usable, or the audit log says no.
    """
    if options.models:
        raise ServeRefused("--model serves GGUF files with llama.cpp; this policy runs vLLM ([vllm] model_dir)",
                           ExitCode.USAGE)  # fmt: skip
    release_dir = release.directory if release is not None else Path.cwd()
    cache = _cache_dir(appliance)
    try:
        launch = render_launch(policy, release_dir=release_dir, python=Path(sys.executable), cache_dir=cache)
    except VllmConfigError as exc:
        raise ServeRefused(str(exc), ExitCode.USAGE) from exc
    model = Path(launch.argv[launch.argv.index("--model") + 1])
    if not model.is_dir():
        raise ServeRefused(f"{model}: the vLLM model directory does not exist")
    try:
        files = release_model_files(release.directory, policy.vllm.model_dir) if release else local_model_files(model)
    except (ReleaseFileError, OSError) as exc:
        raise ServeRefused(f"the vLLM model's digests cannot be read: {exc}") from exc
    audit = None if options.no_audit else open_audit_log(appliance, policy, guard)
    engines = _engines(policy, launch, model_dir_digest(files))
    return PreparedVllmFront(policy=policy, host=host, port=port, engines=engines, authenticator=authenticator,
                             audit=audit, guard=guard, appliance=appliance)  # fmt: skip


def _cache_dir(appliance: HostRoot) -> Path:
    """`<root>/run/vllm-cache`, a real directory of this account (never a symlink planted elsewhere).

    Raises:
        ServeRefused: it cannot be made, or something other than a directory holds its name.
    """
    cache = appliance.path / "run" / CACHE_DIR
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = cache.lstat()
    except OSError as exc:
        raise ServeRefused(f"{cache}: cannot make vLLM's cache directory: {exc.strerror or exc}") from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        what = file_kind(info.st_mode) if not stat.S_ISDIR(info.st_mode) else f"owned by uid {info.st_uid}"
        raise ServeRefused(f"{cache}: vLLM's cache must be a directory of this account; it is {what}")
    return cache


def _engines(policy: Policy, launch: VllmLaunch, model_sha256: str) -> SupervisedEngines:
    vllm = policy.vllm
    url = f"http://127.0.0.1:{vllm.port}"
    api_key = secrets.token_urlsafe(32)
    host = VllmEngineHost(url=url, api_key=api_key, pool=engine_pool(None, max_connections=vllm.max_num_seqs),
                          sequences=vllm.max_num_seqs, model_sha256=model_sha256)  # fmt: skip
    child = VllmChild(launch=launch, base_url=url, api_key=api_key,
                      backoff=Backoff(vllm.restart_backoff_s, vllm.restart_backoff_max_s))  # fmt: skip
    ray_head = None
    if launch.node == "head":
        ray_head = RayHeadChild(launch=launch, address=vllm.node_ip, port=vllm.ray_port,
                                backoff=Backoff(vllm.restart_backoff_s, vllm.restart_backoff_max_s))  # fmt: skip
    return SupervisedEngines(host, child, interval_s=policy.gateway.health_interval_s,
                             timeout_s=policy.gateway.connect_timeout_s, ray_head=ray_head)  # fmt: skip
