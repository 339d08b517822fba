"""Starting `sealbox gateway`: the same order as `sealbox serve` (offline variables and egress guard first, then
keys and audit log, then the socket), with the engine hosts in place of models.

The egress guard allows the policy's networks plus exactly each engine host on its own port: the gateway can
reach its engines and nothing else of them. Engine hosts are named by IP address (an isolated network has no
resolver the
guard would trust).
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sealbox.runtime.api_keys import Authenticator
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.egress.guard import install_egress_guard
from sealbox.runtime.egress.offline_env import apply_offline_environment
from sealbox.runtime.gateway.engine_hosts import EngineHostError, EngineHosts
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.policy import EgressPolicy, GatewayPolicy, Policy, PolicyError, is_loopback_host
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.server.startup import (
    ServeRefused,
    authenticator_for,
    open_audit_log,
    record_stop,
    serve_until_stopped,
)


@dataclass(frozen=True)
class GatewayOptions:
    root: Path | None = None
    policy_file: Path | None = None
    host: str | None = None
    port: int | None = None
    no_auth: bool = False
    no_audit: bool = False


def engine_egress(egress: EgressPolicy, gateway: GatewayPolicy) -> EgressPolicy:
    """The policy's egress allowlist plus exactly the engine hosts, each on its own port only (`[egress] peers`).

    Raises:
        PolicyError: an engine URL does not name an IP address and port.
    """
    peers = list(egress.peers)
    for engine in gateway.engines:
        parts = urlsplit(engine.url)
        try:
            address = ipaddress.ip_address(parts.hostname or "")
            port = parts.port or 443
        except ValueError as exc:
            raise PolicyError(f"gateway.engines.{engine.name}.url: name the host by IP address and port ({exc})") from exc
        peers.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    return egress.model_copy(update={"peers": tuple(dict.fromkeys(peers))})


@dataclass
class PreparedGateway:
    policy: Policy
    host: str
    port: int
    engines: EngineHosts
    authenticator: Authenticator | None
    audit: AuditLog | None
    report: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr))

    def run(self) -> None:
        from sealbox.runtime.gateway.app import GatewayConfig, create_gateway_app

        config = GatewayConfig(policy=self.policy, engines=self.engines, authenticator=self.authenticator,
                               audit=self.audit, on_started=self._started, on_stopping=self._stopping)  # fmt: skip
        gateway = self.policy.gateway
        serve_until_stopped(self.host, self.port, lambda: create_gateway_app(config), release=self._close,
                            ssl_certfile=gateway.tls_cert or None, ssl_keyfile=gateway.tls_key or None)  # fmt: skip

    def _started(self, engines: EngineHosts) -> None:
        if self.audit is not None:
            self.audit.append("gateway.start", pid=os.getpid(), config_digest=self.policy.digest(),
                              listen=f"{self.host}:{self.port}", auth=self.authenticator is not None,
                              engines=[{"name": h.name, "url": h.url, "fingerprint": h.fingerprint or None,
                                        "healthy": h.healthy, "problem": h.problem} for h in engines.hosts])  # fmt: skip
        for host in engines.hosts:
            if not host.healthy:
                self.report(f"engine host {host.name} is not in rotation yet: {host.problem}")
        scheme = "https" if self.policy.gateway.tls_cert else "http"
        self.report(f"sealbox serving through the gateway ({len(engines.healthy)}/{len(engines.hosts)} engine hosts "
                    f"in rotation) on {scheme}://{self.host}:{self.port}/v1")  # fmt: skip

    def _stopping(self) -> None:
        record_stop(self.audit, "gateway.stop")
        self._close()

    def _close(self) -> None:
        if self.audit is not None:
            self.audit.close()


def prepare_gateway(options: GatewayOptions) -> PreparedGateway:
    """Check and open everything the gateway needs.

    Raises:
        ServeRefused: the policy, the engine hosts' settings, the keys or the audit log say no.
    """
    apply_offline_environment()
    appliance = HostRoot.resolve(options.root)
    try:
        policy = Policy.load(options.policy_file) if options.policy_file is not None else Policy.default()
        egress = engine_egress(policy.egress, policy.gateway)
    except PolicyError as exc:
        raise ServeRefused(str(exc), ExitCode.USAGE) from exc
    if not policy.gateway.engines:
        raise ServeRefused("the policy names no engine hosts: add [[gateway.engines]] tables", ExitCode.USAGE)
    guard = install_egress_guard(egress)
    host = options.host or policy.gateway.host
    port = options.port or policy.gateway.port
    if options.no_auth and not is_loopback_host(host):
        raise ServeRefused(f"--no-auth serves anyone who can reach {host}; it is allowed on a loopback address only")
    authenticator = None if options.no_auth else authenticator_for(appliance)
    try:
        engines = EngineHosts.from_policy(policy.gateway)
    except (EngineHostError, OSError) as exc:
        raise ServeRefused(f"gateway: {exc}", ExitCode.USAGE) from exc
    audit = None if options.no_audit else open_audit_log(appliance, policy, guard)
    return PreparedGateway(policy=policy, host=host, port=port, engines=engines, authenticator=authenticator,
                           audit=audit)  # fmt: skip
